"""The table form of the step: ``dg.step_from_table`` (one op call for a [S, 6] coefficient table, a step index
that may live on the device, per-step GMM sets, the GMM scale g and the low-rank GMM) against
``reference.step_from_table``, and the properties that form exists for: nothing about the step number is
read on the host (a compiled loop compiles once), a device index out of range gives NaN rather than a read
out of bounds, and the old per-step API is the same computation."""

from __future__ import annotations

import math

import pytest
import torch

import ddim_gmm_ext as dg
from ddim_gmm_ext import reference as R
from tests.helpers import MC_SIGMAS_WIDE, assert_close, assert_within

SHAPE = (3, 4, 5, 7)  # D = 140: partial chunks
D = math.prod(SHAPE[1:])
S, K = 5, 4


def _rows(dtype, g=1.0, v_path=False):
    """[S, 6] rows of a 5-step DDIM schedule at eta 0.6 (or a VE path: a_t = 1, b_t = sigma)."""
    rows = []
    abar = torch.linspace(0.05, 0.95, S + 1, dtype=torch.float64)
    for i in range(S):
        if v_path:
            sig_t, sig_s = 3.0 / (i + 1), 3.0 / (i + 2)
            a_t, b_t, a_s, b_s = 1.0, sig_t, 1.0, sig_s
            c = 0.6 * sig_s
        else:
            a_t, b_t, a_s, b_s, c = (float(v) for v in R.ddim_coefficients(abar[i], abar[i + 1], 0.6))
        rows.append(R.coefficient_row(a_t, b_t, a_s, b_s, c, g))
    return torch.tensor(rows, dtype=dtype)


def _gmm(kind, dtype=torch.float32, shared=False, seed=0):
    """A GMM with per-step sets: "diag" (ORTHO-VUB tables) or "basis" (a low-rank form with an orthonormal
    basis of the offsets' span and per-component eigenvalues, some above c^2 so that clipping happens)."""
    n = 1 if shared else S
    if kind == "diag":
        return dg.GMM.create(D, n_components=K, n_steps=S, variant="ortho-vub", share_across_steps=shared, seed=seed,
                             dtype=dtype)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    priors = torch.full((n, K), 1.0 / K, dtype=torch.float64)
    raw = torch.randn(n, K, D, generator=g, dtype=torch.float64)
    offsets = 0.2 * (raw - raw.mean(1, keepdim=True))
    basis = torch.linalg.qr(offsets.transpose(1, 2)).Q.transpose(1, 2)[:, : K - 1]  # [n, K-1, D]
    var = torch.rand(n, K, K - 1, generator=g, dtype=torch.float64)
    return dg.GMM.from_params(priors.to(dtype), offsets.to(dtype), var.to(dtype), n_steps=S, basis=basis.to(dtype))


def _inputs(dtype, guided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64).to(dtype)
    m = torch.randn(((2 if guided else 1) * SHAPE[0],) + SHAPE[1:], generator=g, dtype=torch.float64).to(dtype)
    return x, m


CASES = [
    # (prediction, gmm kind, shared, g, guidance, clip, VE path)
    ("epsilon", None, False, 1.0, None, None, False),
    ("epsilon", "diag", False, 1.0, 3.0, 1.5, False),
    ("sample", "diag", True, 0.7, None, None, False),
    ("v_prediction", "basis", False, 1.0, None, None, False),
    ("v_prediction", "diag", False, 1.0, None, None, True),  # VE: n = sqrt(1 + sigma^2)
    ("flow", "basis", True, 0.5, 2.0, 0.9, False),
    ("epsilon", "diag", False, 0.0, None, None, False),  # g = 0: the Gaussian step
    ("epsilon", "basis", False, 0.0, None, None, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c))
def test_op_equals_reference(case, as_tensor, dtype):
    # Checked to fail under: the C++ projection using the wrong basis row, g applied to the variance offsets
    # linearly, the set index ignored (set 0 for every step), and the old VP-only v_prediction formula.
    pred, kind, shared, g, w, clip, ve = case
    x, m = _inputs(dtype, guided=w is not None)
    coeffs = _rows(dtype, g, ve)
    gmm = _gmm(kind, dtype, shared) if kind else None
    for i in (0, 3):
        index = torch.tensor(i) if as_tensor else i
        kwargs = dict(gmm=gmm, prediction_type=pred, guidance_scale=w, clip_sample_range=clip, seed=2**63 + 11)
        ours = dg.step_from_table(m, x, coeffs, index, **kwargs)
        ref = R.step_from_table(
            m.double(), x.double(), coeffs.double(), i, **{**kwargs, "gmm": gmm and gmm.to(dtype=torch.float64)}
        )
        assert_close(ours.prev_sample, ref.prev_sample, dtype, scale=10)
        assert_close(ours.pred_original_sample, ref.pred_original_sample, dtype, scale=10)
        if gmm is not None:
            assert torch.equal(ours.components, ref.components)


def test_non_contiguous_tables_are_read_as_their_values():
    # The kernel addresses a contiguous table's set directly and copies a strided one: both give the same bits
    # (checked to fail with the strided copy taken of the whole table rather than of its row / set i).
    x, m = _inputs(torch.float32)
    gmm = _gmm("basis")
    tables = (_rows(torch.float32), gmm.priors, gmm.offsets, gmm.var_offsets, gmm.basis)

    def strided(t):
        return t.transpose(0, -1).contiguous().transpose(0, -1)

    for i in (0, 3):
        outs = []
        for make in (lambda t: t.contiguous(), strided):
            coeffs, priors, offsets, var_offsets, basis = (make(t) for t in tables)
            outs.append(torch.ops.ddimgmm.step(m, x, coeffs, None, priors, offsets, var_offsets, basis, None, None,
                                               0, None, None, False, 5, 0, i, True))  # fmt: skip
        assert not strided(tables[2]).is_contiguous()
        assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))


def test_per_step_api_is_the_table_with_one_row():
    # dg.step builds the row with coefficient_row: the same samples as the table form at that row.
    x, m = _inputs(torch.float32)
    gmm = _gmm("diag")
    a_t, b_t, a_s, b_s, c = (float(v) for v in R.ddim_coefficients(0.3, 0.5, 0.8))
    row = torch.tensor([R.coefficient_row(a_t, b_t, a_s, b_s, c)] * S)
    one = dg.step(m, x, a_t, b_t, a_s, b_s, c, gmm=gmm, step_index=2, seed=5)
    table = dg.step_from_table(m, x, row, torch.tensor(2), gmm=gmm, seed=5)
    assert torch.equal(one.prev_sample, table.prev_sample)
    assert torch.equal(one.components, table.components)


@pytest.mark.parametrize("bad", [-1, S, 2**40])
def test_device_index_out_of_range_gives_nan(bad):
    # The op cannot raise on a device index without a sync: that call's samples are NaN, components -1.
    x, m = _inputs(torch.float32)
    out = dg.step_from_table(m, x, _rows(torch.float32), torch.tensor(bad), gmm=_gmm("diag"))
    assert out.prev_sample.isnan().all() and out.pred_original_sample.isnan().all()
    assert (out.components == -1).all()
    ref = R.step_from_table(m, x, _rows(torch.float32), torch.tensor(bad), gmm=_gmm("diag"))
    assert ref.prev_sample.isnan().all() and (ref.components == -1).all()


@pytest.mark.parametrize("table", [False, True], ids=["row", "table"])
def test_one_step_gmm_is_not_shared(table):
    # A per-step GMM of one step (n_steps=1, not shared) has no set 3. On 9e9d80e the op took
    # its [1, K] tables for shared ones and returned finite samples from set 0 (fails with the op's range check
    # back at n_sets <= 1, or with GMM.step_tables stacking a shared set).
    x, m = _inputs(torch.float32)
    gmm = dg.GMM.create(D, n_components=K, n_steps=1, variant="ortho-vub")
    coeffs = _rows(torch.float32) if table else _rows(torch.float32)[0]
    for fn in (dg.step_from_table, R.step_from_table):
        out = fn(m, x, coeffs, torch.tensor(3), gmm=gmm)
        assert out.prev_sample.isnan().all() and out.pred_original_sample.isnan().all(), fn
        assert (out.components == -1).all(), fn
    with pytest.raises(ValueError, match=r"step_index must be in \[0, 1\)"):
        dg.step_from_table(m, x, coeffs, 3, gmm=gmm)


def test_shared_gmm_serves_every_index():
    # The other side: a shared set (passed unstacked) is used at any step, on the host or the device.
    x, m = _inputs(torch.float32)
    gmm = dg.GMM.create(D, n_components=K, n_steps=S, variant="ortho-vub", share_across_steps=True)
    assert gmm.step_tables(x)[0].shape == (K,) and gmm.tables(x)[0].shape == (1, K)
    rows = _rows(torch.float32)
    out = dg.step_from_table(m, x, rows, torch.tensor(3), gmm=gmm, seed=4)
    host = dg.step_from_table(m, x, rows, 3, gmm=gmm, seed=4)
    ref = R.step_from_table(m, x, rows, 3, gmm=gmm, seed=4)
    assert torch.equal(out.prev_sample, host.prev_sample) and torch.equal(out.components, ref.components)
    assert_close(out.prev_sample, ref.prev_sample, kind="f32_step")


def test_host_index_out_of_range_raises():
    x, m = _inputs(torch.float32)
    with pytest.raises(ValueError, match=r"step_index 5 is outside the coefficient table \[5, 6\]"):
        dg.step_from_table(m, x, _rows(torch.float32), S)
    with pytest.raises(ValueError, match="step_index must be an int or a 0-d int64 tensor"):
        dg.step_from_table(m, x, _rows(torch.float32), torch.tensor([1]))
    with pytest.raises(ValueError, match="step_index must be an int or a 0-d int64 tensor"):
        dg.step_from_table(m, x, _rows(torch.float32), torch.tensor(1, dtype=torch.int32))


def test_seeds_take_the_full_unsigned_64_bit_range():
    # 2**64 - 1 is a valid Philox key (ComfyUI passes such seeds); it differs from seed 2**63 - 1 and from 0.
    x, m = _inputs(torch.float32)
    rows = _rows(torch.float32)
    outs = [dg.step_from_table(m, x, rows, 1, seed=s).prev_sample for s in (2**64 - 1, 2**63 - 1, 0)]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    expected = R.step_from_table(m, x, rows, 1, seed=2**64 - 1).prev_sample
    assert_close(outs[0], expected, torch.float32)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 18446744073709551616\)"):
        dg.step_from_table(m, x, rows, 1, seed=2**64)


def test_low_rank_kernel_matches_the_moments():
    # One low-rank GMM step with the exact eps as model output: E[x_s] = a_s x0 and Cov[x_s] = b_s^2 I both
    # per coordinate and inside the basis' span (the mixture's covariance is exact there, eigenvalues clipped
    # only where g^2 v > c^2; here they are not). Checked to fail when the (sd - c) correction is dropped
    # (in-span variance 1 + v/c^2 too large) and when the basis rows are permuted in the kernel.
    N = 40000
    dim, k = 24, 4
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(1, k, dim, generator=gen, dtype=torch.float64)
    priors = torch.full((1, k), 1 / k, dtype=torch.float64)
    offsets = 0.1 * (raw - raw.mean(1, keepdim=True))
    # exact moment matching inside the span: M = sum_k pi_k delta_k delta_k^T = W^T diag(lam) W
    M = (priors[0, :, None, None] * offsets[0, :, :, None] * offsets[0, :, None, :]).sum(0)
    lam, vecs = torch.linalg.eigh(M)
    basis = vecs[:, -(k - 1) :].T[None].contiguous()  # [1, k-1, dim]
    var = lam[-(k - 1) :].expand(1, k, k - 1).contiguous()
    gmm = dg.GMM.from_params(priors, offsets, var, n_steps=1, basis=basis)
    a_t, b_t, a_s, b_s = 0.6, 0.8, 0.8, 0.6
    c = b_s  # eta = 1: the whole variance is the kernel's
    assert lam.max() < c * c  # no eigen-direction clipped: the moments are exact
    x0 = torch.randn(1, dim, generator=gen, dtype=torch.float64).expand(N, dim)
    eps = torch.randn(N, dim, generator=gen, dtype=torch.float64)
    row = torch.tensor(R.coefficient_row(a_t, b_t, a_s, b_s, c), dtype=torch.float64)
    out = dg.step_from_table(eps, a_t * x0 + b_t * eps, row, 0, gmm=gmm, seed=1).prev_sample
    centred = out - a_s * x0
    tol = MC_SIGMAS_WIDE * math.sqrt(2 / N) * b_s**2
    assert (centred.mean(0).abs() < MC_SIGMAS_WIDE * b_s / math.sqrt(N)).all()
    assert_within(centred.var(0), torch.full((dim,), b_s**2, dtype=torch.float64), tol)
    in_span = centred @ basis[0].T  # [N, k-1]
    cov = in_span.T @ in_span / N
    assert_within(cov, b_s**2 * torch.eye(k - 1, dtype=torch.float64), tol)


def test_a_compiled_loop_over_a_device_index_compiles_once():
    # The step index is a tensor: every step reuses one graph, and the compiled loop runs first (a fresh GMM
    # whose tables were never converted). Checked to fail with a Python int index (dynamo specialises on it)
    # and with GMM.tables filling its cache inside the graph (a recompile at step 2).
    x, m = _inputs(torch.float32)
    rows, gmm = _rows(torch.float32), _gmm("diag")

    def loop_step(x, i):
        return dg.step_from_table(torch.tanh(x), x, rows, i, gmm=gmm, seed=3).prev_sample

    torch._dynamo.reset()
    compiled = torch.compile(loop_step, fullgraph=True)
    y_comp = x
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(S):
            y_comp = compiled(y_comp, torch.tensor(i))
    y_eager = x
    for i in range(S):
        y_eager = loop_step(y_eager, torch.tensor(i))
    assert_close(y_comp, y_eager, torch.float32)
