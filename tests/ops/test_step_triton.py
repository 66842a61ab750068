"""The Triton step kernels against a pure-torch reading of the ``ddimgmm::step`` schema, the v1 reference and,
where they take the same schema, the C++ op and ``reference.step_from_table``: bit-identical components,
values to float32 rounding.

On CPU the kernels run under TRITON_INTERPRET=1 in a subprocess of their own (triton reads the flag when a
kernel is decorated, so it cannot be switched on in this process); on CUDA they run compiled, in process.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import COMPARISONS, DEVICES, TOLERANCES, assert_close

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPE = (3, 5, 11, 13)  # 715 per sample: a partial last block
SEED = 2**63 + 2**33 + 5  # >= 2**63: passed to the op as its int64 bit pattern
V1_SEED = 2**33 + 5
PREDICTIONS = ("epsilon", "sample", "v_prediction", "flow")


def schema_step(m, x, coeffs, i, tables, noise, comps, pred, w, clip, use_clipped, seed, offset):
    """The schema in plain torch: (prev_sample, x0, components or None). tables = (priors, offsets,
    var_offsets, basis or None), stacked (set i) or unstacked (one shared set); seed in [0, 2**64)."""
    from ddim_gmm_ext import reference as R

    cdt = coeffs.dtype
    a_t, b_t, A, Bc, c, g = (coeffs if coeffs.dim() == 1 else coeffs[i]).unbind()
    x, m = x.to(cdt).flatten(1), m.to(cdt).flatten(1)
    if w is not None:
        m_u, m_c = m.chunk(2)
        m = m_u + w * (m_c - m_u)
    if pred == 0:
        x0, eps = (x - b_t * m) / a_t, m
    elif pred == 1:
        x0, eps = m, (x - a_t * m) / b_t
    elif pred == 2:
        n2 = a_t * a_t + b_t * b_t
        n = n2.sqrt()
        x0, eps = (a_t * x - b_t * n * m) / n2, (b_t * x + a_t * n * m) / n2
    else:
        x0, eps = x - b_t * m, x + a_t * m
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
        if use_clipped:
            eps = (x - a_t * x0) / b_t
    mean = A * x0 + Bc * eps
    B, D = x.shape
    z = noise.to(cdt).flatten(1) if noise is not None else R.gaussian_noise((B, D), seed, offset, i, cdt, x.device)
    k = None
    if tables[0] is None:
        prev = mean + c * z
    else:
        priors, offsets, var, basis = tables
        stacked = priors.dim() == 2
        s = i if stacked else None
        priors, offsets, var, basis = (t if t is None or s is None else t[s] for t in (priors, offsets, var, basis))
        k = comps.to(torch.int64) if comps is not None else R.draw_components(priors, B, seed, offset, i)
        kk = k.clamp(0, priors.shape[0] - 1)
        if basis is None:
            v = torch.zeros(B, D, dtype=cdt)
            v[:, : var.shape[1]] = var[kk]
            prev = mean + g * offsets[kk] + (c * c - g * g * v).clamp(min=0).sqrt() * z
        else:
            p = z @ basis.T  # [B, r]
            sd = (c * c - g * g * var[kk]).clamp(min=0).sqrt()
            prev = mean + g * offsets[kk] + c * z + ((sd - c) * p) @ basis
        prev = torch.where(((k >= 0) & (k < priors.shape[0]))[:, None], prev, torch.nan)
    return prev, x0, k


def _tables(kind, D, K, S, cdt, gen):
    """GMM tables: "diag" [S, K] / [S, K, D] / [S, K, Dv] (Dv < D); "basis" with an orthonormal [S, r, D]."""
    priors = torch.rand(S, K, generator=gen, dtype=torch.float64) + 0.2
    priors = (priors / priors.sum(-1, keepdim=True)).to(cdt)
    offsets = 0.3 * torch.randn(S, K, D, generator=gen, dtype=torch.float64).to(cdt)
    if kind == "diag":
        return priors, offsets, 0.2 * torch.rand(S, K, D - 100, generator=gen, dtype=torch.float64).to(cdt), None
    r = K - 1
    q = torch.linalg.qr(torch.randn(S, D, r, generator=gen, dtype=torch.float64)).Q.transpose(1, 2)
    var = torch.rand(S, K, r, generator=gen, dtype=torch.float64)  # some above c^2 / g^2: clipped at 0
    return priors, offsets, var.to(cdt), q.contiguous().to(cdt)


def _row(a_t, b_t, a_s, b_s, c, g=1.0):
    return [a_t, b_t, a_s, math.sqrt(max(b_s * b_s - c * c, 0.0)), c, g]


# (name, prediction, gmm, dtype, guidance, clip, step given as a tensor, explicit noise / components, g)
CASES = [
    ("v1-ddim", 0, None, torch.float32, None, None, False, False, 1.0),
    ("table-diag", 1, "diag", torch.float32, 3.0, 0.8, True, False, 1.0),
    ("table-basis", 2, "basis", torch.float64, None, None, True, False, 0.7),
    ("basis-explicit", 3, "basis", torch.float32, None, 1.5, False, True, 1.3),
    ("gaussian-g0", 0, "diag", torch.float32, None, None, True, False, 0.0),
    ("fp16-explicit", 0, "diag", torch.float16, 2.0, 0.8, False, True, 1.0),
    ("bf16-flow", 3, None, torch.bfloat16, None, None, True, False, 1.0),
    ("shared-diag", 0, "diag-shared", torch.float32, None, None, True, False, 1.0),  # unstacked: any index
]


def _cpp_has_v2_schema() -> bool:
    import ddim_gmm_ext  # noqa: F401 (registers the op)

    return any(a.name == "step_tensor" for a in torch.ops.ddimgmm.step.default._schema.arguments)


def check_parity(device: str) -> None:
    """Launch the Triton kernels on ``device`` for every case and compare them with the references."""
    from ddim_gmm_ext import reference as R
    from ddim_gmm_ext._triton import load_step_launcher
    from ddim_gmm_ext.ops.step import StepArgs

    triton_step = load_step_launcher()
    step_from_table = getattr(R, "step_from_table", None)
    cpp_v2 = _cpp_has_v2_schema()
    S, K, i = 4, 4, 2
    for name, pred, gmm, dtype, w, clip, as_tensor, explicit, g_scale in CASES:
        gen = torch.Generator().manual_seed(len(name))
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        x = torch.randn(SHAPE, generator=gen).to(dtype)
        m = torch.randn(((2 if w else 1) * SHAPE[0],) + SHAPE[1:], generator=gen).to(dtype)
        D = math.prod(SHAPE[1:])
        rows = [_row(0.6, 0.8, 0.8, 0.6, 0.45, g_scale), _row(0.9, 0.43, 0.95, 0.31, 0.31, g_scale)] * 2
        if pred == 2:  # VE path (a = 1, b = sigma): the generalised v_prediction
            rows[i] = _row(1.0, 2.5, 1.0, 1.2, 0.9, g_scale)
        coeffs = torch.tensor(rows, dtype=cdt)
        if name == "v1-ddim":
            coeffs = coeffs[i]
        tables = _tables(gmm.removesuffix("-shared"), D, K, S, cdt, gen) if gmm else (None,) * 4
        if gmm and gmm.endswith("-shared"):  # one set, unstacked ([K], [K, D], ...): the op's shared form
            tables = tuple(None if t is None else t[0] for t in tables)
        noise = torch.randn(SHAPE, generator=gen) if explicit else None
        comps = torch.tensor([3, 0, 1]) if explicit and gmm else None
        step_tensor = torch.tensor(i) if as_tensor else None
        seed = V1_SEED if name == "v1-ddim" else SEED  # the v1 reference takes seeds < 2**63
        word = seed - 2**64 if seed >= 2**63 else seed
        args = [m, x, coeffs, step_tensor, *tables, noise, comps, pred, w, clip, True, word, 7]
        args += [0 if as_tensor else i, True]
        moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
        tri = [t.cpu() for t in triton_step(StepArgs(*moved))]
        exp = schema_step(m, x, coeffs, i, tables, noise, comps, pred, w, clip, True, seed, 7)
        if gmm:
            assert torch.equal(tri[2], exp[2]), (name, tri[2], exp[2])
        else:
            assert tri[2].numel() == 0
        atol, rtol = TOLERANCES[dtype]
        for got, want in zip(tri[:2], exp[:2], strict=True):
            torch.testing.assert_close(got.double().flatten(1), want.double(), atol=atol, rtol=rtol, msg=name)
        if name == "v1-ddim":  # a [6] row (a_t, b_t, a_s, sqrt(b_s^2 - c^2), c, 1) is the v1 step
            ref = R.step(m, x, 0.6, 0.8, 0.8, 0.6, 0.45, step_index=i, seed=seed, sample_offset=7)
            assert_close(tri[0], ref.prev_sample, kind="f32_step")
        if name == "gaussian-g0":  # g = 0: the GMM step is the Gaussian step (components still drawn)
            plain = triton_step(StepArgs(*moved[:4], None, None, None, None, *moved[8:]))
            assert_close(tri[0], plain[0].cpu(), kind="exact")
        if cpp_v2:
            cpp = torch.ops.ddimgmm.step(*args)
            assert torch.equal(tri[2], cpp[2]), name
            for got, want in zip(tri[:2], cpp[:2], strict=True):
                torch.testing.assert_close(
                    got.double(), want.double(), atol=max(COMPARISONS["f32_step"][0], atol), rtol=rtol, msg=name
                )
        if step_from_table is not None and gmm is None:  # the GMM cases are covered by schema_step
            ref = step_from_table(
                m.double(),
                x.double(),
                coeffs.double(),
                i,
                prediction_type=PREDICTIONS[pred],
                guidance_scale=w,
                clip_sample_range=clip,
                use_clipped_model_output=True,
                seed=seed,
                sample_offset=7,
                noise=noise,
            )
            assert_close(tri[0], ref.prev_sample, dtype=dtype, scale=4)


def check_invalid_step(device: str) -> None:
    """A device step index outside the coefficient table or the GMM sets: every output NaN, components -1
    (and nothing read out of bounds: the interpreter would raise)."""
    from ddim_gmm_ext._triton import load_step_launcher
    from ddim_gmm_ext.ops.step import StepArgs

    triton_step = load_step_launcher()
    gen = torch.Generator().manual_seed(0)
    D = math.prod(SHAPE[1:])
    x, m = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    coeffs = torch.tensor([_row(0.6, 0.8, 0.8, 0.6, 0.45)] * 4)
    for gmm in (None, "diag", "basis"):
        tables = _tables(gmm, D, 3, 4, torch.float32, gen) if gmm else (None,) * 4
        for bad in (4, -1, 2**32 + 1):
            args = [m, x, coeffs, torch.tensor(bad), *tables, None, None, 0, None, None, False, 5, 0, 0, True]
            prev, x0, comps = triton_step(StepArgs(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in args]))
            assert prev.isnan().all() and x0.isnan().all(), (gmm, bad)
            if gmm:
                assert comps.tolist() == [-1] * SHAPE[0], (gmm, bad, comps)
        if gmm:  # the table path alone (coeffs [6]): a step past the 4 GMM sets is invalid too
            args = [m, x, coeffs[0], torch.tensor(4), *tables, None, None, 0, None, None, False, 5, 0, 0, True]
            prev = triton_step(StepArgs(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in args]))[0]
            assert prev.isnan().all(), gmm
            # One stacked set [1, ...] is one step's set, not a shared one: index 1 is past it. On
            # 9e9d80e the kernel took S_g == 1 for shared and returned set 0's finite samples.
            one = tuple(None if t is None else t[:1] for t in tables)
            args = [m, x, coeffs[0], torch.tensor(1), *one, None, None, 0, None, None, False, 5, 0, 0, True]
            prev, _, comps = triton_step(StepArgs(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in args]))
            assert prev.isnan().all() and comps.tolist() == [-1] * SHAPE[0], gmm


CHECKS = {"parity": check_parity, "invalid_step": check_invalid_step}

# Exit status of the interpreter subprocess when this triton's interpreter cannot run the kernels at all.
INTERPRETER_UNUSABLE = 77


def run_interpreted(check: str) -> None:
    """Runs CHECKS[check] on the CPU (in a TRITON_INTERPRET=1 process), after probing the interpreter.

    triton 3.6's interpreter (the GPU machine's) holds a scalar argument as a 1-element array and takes a loop
    bound with ``int(array)``, which numpy >= 2.4 refuses: no kernel with a runtime trip count runs there. That is
    the interpreter's defect, not the kernels' (on that machine the CUDA variant runs them compiled), so the
    subprocess exits with INTERPRETER_UNUSABLE and the test skips, naming the versions."""
    import numpy as np
    import triton
    import triton.language as tl

    @triton.jit
    def count(out_ptr, n):
        acc = tl.zeros([], dtype=tl.int32)
        for _ in range(n):
            acc += 1
        tl.store(out_ptr, acc)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count[(1,)](out, 3)
    except Exception as e:
        if "only 0-dimensional arrays can be converted" not in repr(e):
            raise
        print(f"triton {triton.__version__}'s interpreter with numpy {np.__version__}: {type(e).__name__}: {e}")
        sys.exit(INTERPRETER_UNUSABLE)
    assert out.item() == 3, out
    CHECKS[check]("cpu")


@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize("device", DEVICES)
def test_triton_step(device, check):
    # Checked to fail: with the basis correction's "- c" dropped (table-basis, basis-explicit), with g left out
    # of the variance offsets (table-basis), with v_prediction's n dropped (table-basis: VE row), with the
    # step-range check removed (invalid_step).
    if device == "cuda":
        CHECKS[check]("cuda")
        return
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = f"from tests.ops.test_step_triton import run_interpreted; run_interpreted({check!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == INTERPRETER_UNUSABLE:
        pytest.skip(f"the Triton interpreter cannot run a loop with a runtime bound here: {proc.stdout.strip()}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
