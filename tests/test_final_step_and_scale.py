"""The final-step policy and the per-coordinate scale, one rule each, the same through every sampler."""

from __future__ import annotations

import math

import pytest
import torch

import ddim_gmm_ext as dg


def test_scale_per_dim_is_the_paper_scale_over_sqrt_d():
    a = dg.GMM.create(64, n_components=4, n_steps=2, scale_per_dim=0.5, seed=1)
    b = dg.GMM.create(64, n_components=4, n_steps=2, scale=0.5 * math.sqrt(64), seed=1)
    assert torch.equal(a.offsets, b.offsets) and a.scale == b.scale == 4.0
    with pytest.raises(ValueError, match="pass scale or scale_per_dim, not both"):
        dg.GMM.create(64, n_components=4, n_steps=2, scale=1.0, scale_per_dim=0.5)
    with pytest.raises(ValueError, match="scale_per_dim must be a finite number >= 0"):
        dg.GMM.create(64, n_components=4, n_steps=2, scale_per_dim=-1.0)


def test_ortho_lr_needs_fewer_components_than_dimensions():
    with pytest.raises(ValueError, match="must be < dim"):
        dg.GMM.create(4, n_components=4, n_steps=2, variant="ortho-lr")


def _scheduler_loop(final_step, **config):
    from ddim_gmm_ext.diffusers import DDIMGMMScheduler

    s = DDIMGMMScheduler(clip_sample=False, gmm_variant="ortho", gmm_n_components=3, seed=4, final_step=final_step,
                         **config)  # fmt: skip
    s.set_timesteps(7)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = []
    for t in s.timesteps:
        x = s.step(torch.tanh(x), t, x, eta=0.5).prev_sample
        out.append(x)
    return out, s


def test_scheduler_final_step():
    # "gaussian" (default) and "gmm" agree on every step but the last, where only "gmm" adds offsets.
    pytest.importorskip("diffusers")
    gauss, s = _scheduler_loop("gaussian")
    mixed, _ = _scheduler_loop("gmm")
    for a, b in zip(gauss[:-1], mixed[:-1], strict=True):
        assert torch.equal(a, b)
    assert not torch.allclose(gauss[-1], mixed[-1])
    assert s.config.final_step == "gaussian"
    with pytest.raises(ValueError, match="final_step must be one of"):
        _scheduler_loop("last")


def test_scheduler_scale_per_dim_round_trips(tmp_path):
    pytest.importorskip("diffusers")
    from ddim_gmm_ext.diffusers import DDIMGMMScheduler

    _, s = _scheduler_loop("gaussian", gmm_scale_per_dim=0.25)
    assert s.gmm.scale == pytest.approx(0.25 * math.sqrt(48))
    s.save_pretrained(tmp_path)
    loaded = DDIMGMMScheduler.from_pretrained(tmp_path)
    assert loaded.config.gmm_scale_per_dim == 0.25 and loaded.config.final_step == "gaussian"


@pytest.mark.parametrize("final_step", ["gaussian", "gmm"])
def test_samplers_apply_the_same_rule(final_step):
    # sample_rfim and the k-diffusion sampler with GMM at a tiny c: "gaussian" leaves the last step free of
    # offsets, so its result equals the run with GMM off at the last step only.
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    times = dg.reference.rf_times(4)
    run = dg.sample_rfim(lambda x, t: -x, x, times, eta=0.3, gmm="ortho", n_components=3, seed=1,
                         progress=False, final_step=final_step)  # fmt: skip
    gmm = dg.GMM.create(16, n_components=3, n_steps=4, variant="ortho", seed=1)
    y = x
    for i in range(4):
        step_gmm = None if final_step == "gaussian" and i == 3 else gmm
        y = dg.rfim_step(-y, y, times[i], times[i + 1], eta=0.3, gmm=step_gmm, step_index=i, seed=1).prev_sample
    torch.testing.assert_close(run, y)


def _scale_pair_callers():
    """Every sampler and scheduler that takes both the paper's scale and scale_per_dim, called with both."""
    from ddim_gmm_ext import DDIMSampler
    from ddim_gmm_ext.diffusers import (
        DDIMGMMScheduler,
        DDPMGMMScheduler,
        EulerAncestralDiscreteGMMScheduler,
        FlowMatchEulerDiscreteGMMScheduler,
    )
    from ddim_gmm_ext.k_diffusion import sample_ddim_gmm, sample_rfim_gmm

    x = torch.randn(2, 16)
    both = dict(gmm_variant="ortho", gmm_scale=2.0, gmm_scale_per_dim=0.1)
    yield "DDIMGMMScheduler", lambda: DDIMGMMScheduler(**both)
    yield "DDPMGMMScheduler", lambda: DDPMGMMScheduler(**both)
    yield "EulerAncestralDiscreteGMMScheduler", lambda: EulerAncestralDiscreteGMMScheduler(**both)
    yield "FlowMatchEulerDiscreteGMMScheduler", lambda: FlowMatchEulerDiscreteGMMScheduler(**both)
    kd = dict(gmm="ortho", n_components=3, scale=2.0, scale_per_dim=0.1, disable=True)
    yield "sample_ddim_gmm", lambda: sample_ddim_gmm(lambda x, s: x, x, torch.tensor([5.0, 1.0, 0.0]), **kd)
    yield "sample_rfim_gmm", lambda: sample_rfim_gmm(lambda x, s: x, x, torch.tensor([1.0, 0.5, 0.0]), **kd)
    rf = dict(gmm="ortho", n_components=3, scale=2.0, scale_per_dim=0.1, progress=False)
    yield "sample_rfim", lambda: dg.sample_rfim(lambda x, t: x, x, dg.reference.rf_times(3), **rf)
    model = type("Model", (), {"apply_model": None, "alphas_cumprod": torch.linspace(0.99, 0.01, 1000)})()
    yield "DDIMSampler", lambda: DDIMSampler(model, gmm="ortho", scale=2.0, scale_per_dim=0.1)


def test_scale_and_scale_per_dim_together_are_refused_everywhere():
    # scale_per_dim replaces the scale (default 1): both set is ambiguous. Before this check the schedulers
    # and the k-diffusion / rectified-flow samplers took scale_per_dim silently.
    pytest.importorskip("diffusers")
    for name, call in _scale_pair_callers():
        with pytest.raises(ValueError, match="scale_per_dim, not both"):
            call()
        assert name
