"""Gradients through the fused step: the op's registered backward against finite differences (gradcheck in
float64), against autograd through the pure-torch reference, under opcheck, and
through a scheduler step as diffusers' own DDIMScheduler gives them."""

from __future__ import annotations

import pytest
import torch

import ddim_gmm_ext as dg
from ddim_gmm_ext import reference as R
from tests.helpers import assert_close

S = 3
ROWS = torch.tensor([R.coefficient_row(0.6, 0.8, 0.8, 0.6, 0.3)] * S, dtype=torch.float64)


def _inputs(guided: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    m = torch.randn(4 if guided else 2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    return m, x


OPTIONS = [
    dict(prediction_type=p, guidance_scale=w, clip_sample_range=clip, use_clipped_model_output=uc)
    for p in ("epsilon", "sample", "v_prediction", "flow")
    for w, clip, uc in ((None, None, False), (2.0, 1.0, False), (None, 1.0, True))
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_gradcheck_and_reference(options):
    # Checked to fail when the backward ignores the clamp mask, swaps q_x / q_m, or drops the guidance split.
    m, x = _inputs(options["guidance_scale"] is not None)
    gmm = dg.GMM.create(12, 3, S, variant="ortho", dtype=torch.float64)

    def fused(m, x):
        out = dg.step_from_table(m, x, ROWS, torch.tensor(1), gmm=gmm, seed=3, **options)
        return out.prev_sample, out.pred_original_sample

    assert torch.autograd.gradcheck(fused, (m, x))
    ours = fused(m, x)
    ref = R.step_from_table(m, x, ROWS, 1, gmm=gmm, seed=3, **options)
    loss_ours = ours[0].sum() + ours[1].square().sum()
    loss_ref = ref.prev_sample.sum() + ref.pred_original_sample.square().sum()
    for a, b in zip(torch.autograd.grad(loss_ours, (m, x)), torch.autograd.grad(loss_ref, (m, x)), strict=True):
        assert_close(a, b, kind="f64")


def test_gradient_of_an_epsilon_step():
    # With the exact derivative of the epsilon path: d x_s / d x_t = A / a_t when the model output is fixed.
    # (torch.func transforms do not reach ops whose autograd is registered with torch.library in
    # torch 2.11-2.13; differentiate through dg.reference there.)
    m, x = _inputs(False)
    (g,) = torch.autograd.grad(dg.step_from_table(m.detach(), x, ROWS, 1, seed=0).prev_sample.sum(), x)
    a_t, b_t, A, B = ROWS[1, :4]
    torch.testing.assert_close(g, torch.full_like(x, float(A / a_t)))


def test_opcheck_with_gradients():
    m, x = _inputs(True)
    args = (m, x, ROWS, None, None, None, None, None, None, None, 0, 1.5, 1.0, False, 3, 0, 1, True)
    torch.library.opcheck(torch.ops.ddimgmm.step, args)


def test_no_gradient_for_coefficients_is_an_error():
    m, x = _inputs(False)
    rows = ROWS.clone().requires_grad_()
    with pytest.raises(NotImplementedError, match="no gradient with respect to coeffs"):
        dg.step_from_table(m, x, rows, 1)


@pytest.mark.parametrize("name", ["coeffs", "noise", "offsets"])
def test_no_gradient_for_constants_even_without_a_differentiable_input(name):
    # With model_output and sample not requiring grad, 9e9d80e's fast path went below autograd
    # and returned a detached output (the raw op raised). Fails with ops.step.step's _refuse_gradient call removed.
    m, x = (t.detach() for t in _inputs(False))
    gmm = dg.GMM.create(12, 3, S, variant="ortho", dtype=torch.float64)
    rows, noise = ROWS, torch.zeros_like(x)
    if name == "coeffs":
        rows = ROWS.clone().requires_grad_()
    elif name == "noise":
        noise = noise.requires_grad_()
    else:
        offsets = gmm.offsets.clone().requires_grad_()
        gmm = dg.GMM.from_params(gmm.priors, offsets, gmm.var_offsets)
    for index in (1, torch.tensor(1)):
        with pytest.raises(NotImplementedError, match=f"no gradient with respect to {name}"):
            dg.step_from_table(m, x, rows, index, gmm=gmm, noise=noise)
    with pytest.raises(NotImplementedError, match=f"no gradient with respect to {name}"):
        torch.ops.ddimgmm.step(m, x, rows, None, *gmm.step_tables(x), noise, None, 0, None, None, False, 0, 0, 1, True)
    with torch.no_grad():  # nothing to record: no error
        assert dg.step_from_table(m, x, rows, 1, gmm=gmm, noise=noise).prev_sample.isfinite().all()


def test_no_gradient_for_step_coefficients():
    # dg.step's coefficients: a CPU tensor that requires grad was read as a float and its gradient dropped.
    m, x = _inputs(False)
    a_t = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="no gradient with respect to a_t"):
        dg.step(m, x, a_t, 0.8, 0.8, 0.6, 0.3)
    (g,) = torch.autograd.grad(R.step(m, x, a_t, 0.8, 0.8, 0.6, 0.3, seed=1).prev_sample.sum(), a_t)
    assert g.isfinite() and g != 0  # the reference differentiates through it (it was dropped there too)


@pytest.mark.parametrize("bad", [S, -1, 2**32 + 1])
@pytest.mark.parametrize("one_set_gmm", [False, True])
def test_gradient_of_an_out_of_range_step_tensor_is_nan(bad, one_set_gmm):
    # The forward is all NaN, so is the gradient (9e9d80e clamped the index and gave a finite
    # one; fails with the backward's torch.where removed). one_set_gmm: a single row, the GMM's one set bounds it.
    m, x = _inputs(True)
    gmm = dg.GMM.create(12, 3, 1, variant="ortho", dtype=torch.float64) if one_set_gmm else None
    coeffs = ROWS[0] if one_set_gmm else ROWS
    out = dg.step_from_table(m, x, coeffs, torch.tensor(bad), gmm=gmm, guidance_scale=2.0)
    assert out.prev_sample.isnan().all()
    gm, gx = torch.autograd.grad(out.prev_sample.sum() + out.pred_original_sample.sum(), (m, x))
    assert gm.isnan().all() and gx.isnan().all()
    ok = dg.step_from_table(m, x, coeffs, torch.tensor(0), gmm=gmm, guidance_scale=2.0)  # in range: finite
    assert all(g.isfinite().all() for g in torch.autograd.grad(ok.prev_sample.sum(), (m, x)))


def test_scheduler_gradient_equals_diffusers():
    # The issue's case: d prev / d x_t through a scheduler step, as diffusers' DDIMScheduler gives it (it was
    # None with a warning before autograd was registered).
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler

    from ddim_gmm_ext.diffusers import DDIMGMMScheduler

    grads = []
    for cls in (DDIMScheduler, DDIMGMMScheduler):
        s = cls(clip_sample=False)
        s.set_timesteps(10)
        x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
        m = torch.tanh(x)  # a model output that depends on x_t
        t = s.timesteps[4]
        (g,) = torch.autograd.grad(s.step(m, t, x, eta=0.0).prev_sample.sum(), x)
        grads.append(g)
    assert_close(grads[1], grads[0], kind="f32")
