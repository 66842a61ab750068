"""The multistep form of the step: 8-column coefficient rows (a_t, b_t, A, B, c, g, H1, H2) and up to two history
tensors, mean = A x0 + B eps + H1 h1 + H2 h2 (``history0`` = h1, ``history1`` = h2), against
``reference.step_from_table(history=...)`` on every backend: the C++ kernel, the fake kernel, the Triton kernel
(under the interpreter here, compiled on CUDA), autograd and torch.compile."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import ddim_gmm_ext as dg
from ddim_gmm_ext import reference as R
from ddim_gmm_ext.ops.step import ARGUMENTS, StepArgs
from tests.helpers import COMPARISONS, DEVICES, TOLERANCES, assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPE = (3, 4, 5, 7)  # D = 140: partial chunks
D = math.prod(SHAPE[1:])
S, K = 4, 3
PREDICTIONS = ("epsilon", "sample", "v_prediction", "flow")


def _rows(cdt, n_cols: int = 8) -> torch.Tensor:
    """[S, n_cols] rows of a DPM-Solver-like step on a VP path: A, B and H of order 1 in size, H1 != 0 from row 1
    on and H2 != 0 from row 2 on (a multistep table's first rows have no history)."""
    rows = []
    for i in range(S):
        a_t = 0.3 + 0.15 * i
        b_t = math.sqrt(1 - a_t * a_t)
        A, B, c = 0.7 + 0.05 * i, 0.4 - 0.05 * i, 0.3 - 0.05 * i
        rows.append([a_t, b_t, A, B, c, 1.0, 0.45 - 0.1 * i if i >= 1 else 0.0, -0.3 if i >= 2 else 0.0][:n_cols])
    return torch.tensor(rows, dtype=torch.float64).to(cdt)


def _gmm(cdt):
    return dg.GMM.create(D, n_components=K, n_steps=S, variant="ortho-vub", seed=3, dtype=cdt)


def _op_args(dtype=torch.float32, pred="epsilon", n_hist=2, hist_dtype=None, gmm=None, index=2, as_tensor=False,
             device="cpu", seed=0) -> dict:  # fmt: skip
    """A valid op call by argument name; histories in ``hist_dtype`` (default: the sample's)."""
    cdt = R.compute_dtype(dtype)
    g = torch.Generator().manual_seed(seed)
    x, m, h0, h1 = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(4))
    tables = gmm.tables(torch.empty(0, dtype=cdt, device=device)) if gmm is not None else (None,) * 4
    hist = [h.to(device, hist_dtype or dtype) for h in (h0, h1)[:n_hist]] + [None] * (2 - n_hist)
    values = [m.to(device, dtype), x.to(device, dtype), _rows(cdt).to(device)]
    values += [torch.tensor(index, device=device) if as_tensor else None, *tables, None, None]
    values += [PREDICTIONS.index(pred), None, None, False, 2**40 + 5, 3, 0 if as_tensor else index, True, *hist]
    return dict(zip(ARGUMENTS, values, strict=True))


def _reference(args: dict, gmm=None):
    """reference.step_from_table on the same arguments."""
    history = tuple(h for h in (args["history0"], args["history1"]) if h is not None)
    index = args["step_tensor"] if args["step_tensor"] is not None else args["step_index"]
    return R.step_from_table(
        args["model_output"],
        args["sample"],
        args["coeffs"],
        index,
        gmm=gmm,
        prediction_type=PREDICTIONS[args["prediction_type"]],
        seed=args["seed"],
        sample_offset=args["sample_offset"],
        history=history,
    )


def _op(args: dict):
    return torch.ops.ddimgmm.step(*args.values())


# ---- the op against the reference --------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("n_hist", [1, 2])
@pytest.mark.parametrize("pred", PREDICTIONS)
def test_op_equals_reference(pred, n_hist, dtype, device):
    # Checked to fail (reference mutated): with H2 applied to history0.
    index = 2 if n_hist == 2 else 1
    args = _op_args(dtype, pred, n_hist, index=index, device=device)
    prev, x0, _ = _op(args)
    ref = _reference({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()})
    assert_close(prev.cpu(), ref.prev_sample, dtype)
    assert_close(x0.cpu(), ref.pred_original_sample, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_the_history_keyword_of_the_api(device):
    # dg.step_from_table(history=...) -> api.fused_step -> ops.step.step(history=...): the package's keyword path
    # to history0 / history1 (the op itself is tested above). Checked to fail with fused_step not passing
    # history= on (the op then refuses the row's H1 != 0 without h1); a history in float64 for a float32 sample
    # (neither its dtype nor the compute dtype) is converted, and a third history is refused.
    args = _op_args(torch.float32, "sample", 2, index=2, device=device)
    ref = _reference({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()})
    hist = (args["history0"].double(), args["history1"])
    kw = dict(prediction_type="sample", seed=args["seed"], sample_offset=args["sample_offset"], history=hist)
    out = dg.step_from_table(args["model_output"], args["sample"], args["coeffs"], 2, **kw)
    assert_close(out.prev_sample.cpu(), ref.prev_sample, torch.float32)
    with pytest.raises(ValueError, match="at most 2 tensors"):
        dg.step_from_table(args["model_output"], args["sample"], args["coeffs"], 2, history=(*hist, hist[0]))
    with pytest.raises(ValueError, match="H1 = .* but history0 is None"):
        dg.step_from_table(args["model_output"], args["sample"], args["coeffs"], 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_history_in_the_compute_dtype(dtype, device):
    # A half-precision sample takes its history in float32 as well (what a float32 x0 output gives).
    args = _op_args(dtype, "v_prediction", 2, hist_dtype=torch.float32, device=device)
    ref = _reference({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()})
    assert_close(_op(args)[0].cpu(), ref.prev_sample, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_with_a_gmm_and_a_step_tensor(as_tensor, dtype, device):
    # The history joins the GMM's offsets and clipped noise; the row, the parameter set and the Philox step come
    # from the (possibly device) index. Checked to fail with the reference adding the history only without a GMM.
    cdt = R.compute_dtype(dtype)
    gmm = _gmm(cdt)
    for index in range(S):
        n_hist = min(index, 2)
        args = _op_args(dtype, "epsilon", n_hist, gmm=gmm, index=index, as_tensor=as_tensor, device=device)
        prev, x0, k = _op(args)
        cpu = {n: v.cpu() if isinstance(v, torch.Tensor) else v for n, v in args.items()}
        ref = _reference(cpu, gmm=_gmm(cdt))
        assert torch.equal(k.cpu(), ref.components)
        assert_close(prev.cpu(), ref.prev_sample, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_step_tensor_out_of_range_gives_nan(device):
    for bad in (S, -1):
        args = _op_args(n_hist=2, gmm=_gmm(torch.float32), as_tensor=True, device=device)
        args["step_tensor"] = torch.tensor(bad, device=device)
        prev, x0, k = _op(args)
        assert prev.isnan().all() and x0.isnan().all() and (k == -1).all(), bad


def test_history_does_not_change_a_six_column_step():
    # The existing callers' 6-column rows: the same bits as before the history existed (the op without history).
    args = _op_args(n_hist=0)
    args["coeffs"] = _rows(torch.float32, 6)
    six = _op(args)
    args["coeffs"] = torch.cat([_rows(torch.float32, 6), torch.zeros(S, 2)], dim=1)
    eight = _op(args)
    assert_close(eight[0], six[0], kind="exact")


def test_a_row_needing_a_missing_history_is_refused_on_cpu():
    # Row 2 has H2 != 0: without history1 the host path names the term (CUDA: NaN outputs, below).
    args = _op_args(n_hist=1, index=2)
    with pytest.raises(ValueError, match=r"coeffs row 2 has H2 = -0.3\d* but history1 is None"):
        _op(args)
    args = _op_args(n_hist=1, index=2, as_tensor=True)
    with pytest.raises(ValueError, match="H2 = .* but history1 is None"):
        _op(args)
    args = _op_args(n_hist=0, index=1)
    with pytest.raises(ValueError, match="H1 = .* but history0 is None"):
        _op(args)


# ---- bad input: one table, every backend, the same message ---------------------------------------------------

BAD_CALLS = [
    ("history1 given without history0", dict(history0=None)),
    (r"history0 must have the sample's shape \[3, 4, 5, 7\] .* got \[2, 4, 5, 7\]",
     dict(history0=lambda a: a["history0"][:2])),  # another batch size
    (r"history1 must have the sample's shape", dict(history1=lambda a: a["history1"].flatten(1))),
    (r"history0 must have the sample's dtype \(float32\) or the compute dtype \(float32\), got float64",
     dict(history0=lambda a: a["history0"].double())),
    (r"on the sample's device .*; history0 is on", dict(history0=lambda a: a["history0"].to("meta"))),
    # dtypes outside torch's floating and index types are named as c10 names them (the C++ kernel's spelling);
    # checked to fail with ops/step.py's _name returning str(dtype) ("got bool" on meta, "got Bool" on CPU).
    (r"history0 must have the sample's dtype \(float32\) or the compute dtype \(float32\), got Bool",
     dict(history0=lambda a: a["history0"].bool())),
    (r"history0 must have the sample's dtype \(float32\) or the compute dtype \(float32\), got ComplexFloat",
     dict(history0=lambda a: a["history0"].to(torch.complex64))),
    ("history0 given with 6-column coeffs", dict(coeffs=lambda a: a["coeffs"][:, :6])),
    (r"coeffs must be one row \[6\] or \[8\]", dict(coeffs=lambda a: a["coeffs"][:, :7])),
    (r"step_index 4 is outside the coefficient table \[4, 8\]", dict(step_index=4)),
]  # fmt: skip


def _bad_call(device, changes, dtype=torch.float32):
    args = _op_args(dtype, device="cpu" if device == "meta" else device)
    for name, value in changes.items():
        args[name] = value(args) if callable(value) else value
    if device == "meta":  # cpu <-> meta, so that a tensor put on another device stays on another device

        def swap(a):
            return torch.empty_like(a, device="cpu") if a.device.type == "meta" else a.to("meta")

        args = {n: swap(a) if isinstance(a, torch.Tensor) else a for n, a in args.items()}
    return args


@pytest.mark.parametrize("device", [*DEVICES, "meta"])
@pytest.mark.parametrize(("match", "changes"), BAD_CALLS, ids=[c[0][:40] for c in BAD_CALLS])
def test_bad_input(device, match, changes):
    # meta runs the fake kernel (what torch.compile traces), with ops/step.py's checks; CPU the C++ checks.
    with pytest.raises(ValueError, match=match) as info:
        _op(_bad_call(device, changes))
    assert type(info.value) is ValueError


@pytest.mark.parametrize(("match", "changes"), BAD_CALLS, ids=[c[0][:40] for c in BAD_CALLS])
def test_bad_input_same_message_on_every_backend(match, changes):
    messages = set()
    for device in ["cpu", "meta"]:
        with pytest.raises(ValueError) as info:
            _op(_bad_call(device, changes))
        messages.add(str(info.value).split("\n")[0].replace("meta", "X").replace("cpu", "X"))
    assert len(messages) == 1, messages


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_mixed_history_dtypes_refused(device):
    changes = dict(history1=lambda a: a["history1"].float())
    with pytest.raises(ValueError, match=r"history1 must have history0's dtype \(float16\), got float32"):
        _op(_bad_call(device, changes, torch.float16))


# ---- autograd, opcheck, compile -------------------------------------------------------------------------------


def test_gradients_match_the_reference():
    # d x_s / d h_j = H_j: checked against autograd through the reference in float64 (and to fail with the
    # history's gradient left out of _backward).
    args = _op_args(torch.float64, "v_prediction", 2, index=2)
    args["noise"] = torch.randn(SHAPE, dtype=torch.float64)
    leaves = {n: args[n].clone().requires_grad_() for n in ("model_output", "sample", "history0", "history1")}
    op_args = args | leaves
    weight = torch.randn(SHAPE, dtype=torch.float64)
    grads = torch.autograd.grad((_op(op_args)[0] * weight).sum(), list(leaves.values()))
    ref_args = args | {n: v.detach().clone().requires_grad_() for n, v in leaves.items()}
    ref_prev = R.step_from_table(
        ref_args["model_output"],
        ref_args["sample"],
        args["coeffs"],
        2,
        prediction_type="v_prediction",
        noise=args["noise"],
        history=(ref_args["history0"], ref_args["history1"]),
    ).prev_sample
    ref_grads = torch.autograd.grad((ref_prev * weight).sum(), [ref_args[n] for n in leaves])
    for name, got, want in zip(leaves, grads, ref_grads, strict=True):
        assert_close(got, want, kind="f64", msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_opcheck(as_tensor, device):
    args = _op_args(n_hist=2, gmm=_gmm(torch.float32), as_tensor=as_tensor, device=device)
    torch.library.opcheck(torch.ops.ddimgmm.step, tuple(args.values()))
    args = _op_args(torch.float64, n_hist=1, index=1, device=device)
    args["noise"] = torch.randn(SHAPE, dtype=torch.float64, device=device)
    for name in ("model_output", "sample", "history0"):
        args[name] = args[name].requires_grad_()
    torch.library.opcheck(torch.ops.ddimgmm.step, tuple(args.values()))


def test_compiled_step_with_history_compiles_once():
    # The step index from a device tensor and the history as graph inputs: one graph for every step.
    torch._dynamo.reset()
    args = _op_args(n_hist=2, as_tensor=True)
    rest = {n: v for n, v in args.items() if n not in ("step_tensor", "history0", "history1")}

    def step(i, h0, h1):
        named = rest | dict(step_tensor=i, history0=h0, history1=h1)
        return torch.ops.ddimgmm.step(*(named[n] for n in ARGUMENTS))[0]

    compiled = torch.compile(step, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(S):
            h0, h1 = args["history0"] * (i + 1), args["history1"] - i
            assert_close(compiled(torch.tensor(i), h0, h1), step(torch.tensor(i), h0, h1), kind="exact")


# ---- Triton ------------------------------------------------------------------------------------------------------


def check_triton(device: str) -> None:
    """The Triton launcher against the C++ op (and the reference) with history: every prediction type, one or two
    histories, no GMM / diagonal / low-rank GMM, float16 with a float32 history, float64, a step tensor; a row
    needing a history that is not passed gives NaN (the C++ kernel raises instead)."""
    from ddim_gmm_ext._triton import load_step_launcher

    triton_step = load_step_launcher()
    cases = [
        # (dtype, hist dtype, prediction, n_hist, gmm, step as tensor)
        (torch.float32, None, "epsilon", 2, None, False),
        (torch.float32, None, "sample", 1, "diag", True),
        (torch.float64, None, "v_prediction", 2, "basis", True),
        (torch.float16, torch.float32, "flow", 2, None, True),
        (torch.bfloat16, None, "epsilon", 2, "diag", False),
    ]
    for dtype, hist_dtype, pred, n_hist, kind, as_tensor in cases:
        cdt = R.compute_dtype(dtype)
        gmm = None
        if kind == "diag":
            gmm = _gmm(cdt)
        elif kind == "basis":
            gmm = dg.GMM.create(D, n_components=K, n_steps=S, variant="ortho-lr", seed=3, dtype=cdt)
        index = 2 if n_hist == 2 else 1
        args = _op_args(dtype, pred, n_hist, hist_dtype, gmm, index, as_tensor)
        cpp = torch.ops.ddimgmm.step(*args.values())
        moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args.values()]
        tri = [t.cpu() for t in triton_step(StepArgs(*moved))]
        name = f"{dtype} {pred} {n_hist} {kind}"
        if gmm is not None:
            assert torch.equal(tri[2], cpp[2]), name
        atol, rtol = TOLERANCES[dtype]
        for got, want in zip(tri[:2], cpp[:2], strict=True):
            torch.testing.assert_close(
                got.double(), want.double(), atol=max(COMPARISONS["f32_step"][0], atol), rtol=rtol, msg=name
            )
    # H2 != 0 on row 2 with one history passed; H1 != 0 on row 1 with none: NaN samples, x0 still written.
    for n_hist, index in ((1, 2), (0, 1)):
        args = _op_args(n_hist=n_hist, index=index, as_tensor=True)
        prev, x0, _ = triton_step(
            StepArgs(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in args.values()])
        )
        assert prev.isnan().all() and not x0.isnan().any(), (n_hist, index)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_with_history(device):
    # Checked to fail (kernel mutated): with hist1 read through hist0's pointer, and with the missing-history
    # check removed (the NaN case).
    pytest.importorskip("triton")
    if device == "cuda":
        check_triton("cuda")
        return
    from tests.ops.test_step_triton import INTERPRETER_UNUSABLE

    env = dict(os.environ, TRITON_INTERPRET="1")
    code = (
        "from tests.ops import test_step_triton as T, test_step_history as H; "
        "T.CHECKS['history'] = H.check_triton; T.run_interpreted('history')"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == INTERPRETER_UNUSABLE:
        pytest.skip(f"the Triton interpreter cannot run a loop with a runtime bound here: {proc.stdout.strip()}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
