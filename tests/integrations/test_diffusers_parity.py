"""Oracle: without GMM, a full sampling loop equals diffusers' DDIMScheduler given the same variance_noise,
for every prediction type, clip on/off, eta 0 / 0.5 / 1, beta schedule and spacing. Our
schedules (make_betas, ddim_timesteps) are used, so they are checked against diffusers too."""

import itertools

import numpy as np
import pytest
import torch

import ddim_gmm_ext as dg
from ddim_gmm_ext import reference as ref
from tests.helpers import assert_close

diffusers = pytest.importorskip("diffusers")

SCHEDULES = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(trained_betas=np.linspace(1e-4, 0.03, 1000).tolist()),
]
SPACINGS = [("leading", 1), ("trailing", 0), ("linspace", 0)]
STEP_FNS = {"api": dg.ddim_step, "reference": ref.ddim_step}


def toy_model(x, t):
    """A smooth deterministic stand-in for a network output."""
    return 0.6 * torch.sin(x + 0.001 * t) + 0.2 * x


def run_loops(config, steps, eta, step_fn, use_clipped=False, shape=(2, 3, 5, 4)):
    sched = diffusers.DDIMScheduler(**config)
    sched.set_timesteps(steps)
    betas = ref.make_betas(
        1000,
        config.get("beta_start", 1e-4),
        config.get("beta_end", 0.02),
        config.get("beta_schedule", "linear"),
        config.get("trained_betas"),
        config.get("rescale_betas_zero_snr", False),
    )
    abar = ref.alphas_cumprod(betas)
    final = torch.tensor(1.0) if config.get("set_alpha_to_one", True) else abar[0]
    timesteps, prev = ref.ddim_timesteps(
        steps, 1000, config.get("timestep_spacing", "leading"), config.get("steps_offset", 0)
    )
    np.testing.assert_array_equal(timesteps, sched.timesteps.numpy())

    gen = torch.Generator().manual_seed(0)
    x_d = torch.randn(shape, generator=gen)
    x_o = x_d.clone()
    clip = config.get("clip_sample_range", 1.0) if config.get("clip_sample", True) else None
    for t, p in zip(timesteps, prev, strict=False):
        noise = torch.randn(shape, generator=gen)
        x_d = sched.step(
            toy_model(x_d, t), int(t), x_d, eta=eta, use_clipped_model_output=use_clipped, variance_noise=noise
        ).prev_sample
        out = step_fn(
            toy_model(x_o, t),
            x_o,
            abar[t],
            abar[p] if p >= 0 else final,
            eta=eta,
            prediction_type=config.get("prediction_type", "epsilon"),
            clip_sample_range=clip,
            use_clipped_model_output=use_clipped,
            noise=noise,
        )
        x_o = out.prev_sample
        assert out.components is None
    return x_d, x_o


@pytest.mark.parametrize("step_fn", STEP_FNS.values(), ids=STEP_FNS.keys())
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_loop_matches_diffusers(step_fn, prediction_type, clip_sample, eta):
    # every schedule x spacing combination, rotated so each appears with each prediction type
    for i, (schedule, (spacing, offset)) in enumerate(itertools.product(SCHEDULES, SPACINGS)):
        config = dict(
            schedule,
            prediction_type=prediction_type,
            clip_sample=clip_sample,
            timestep_spacing=spacing,
            steps_offset=offset,
            set_alpha_to_one=i % 2 == 0,
        )
        x_d, x_o = run_loops(config, steps=[5, 10, 7][i % 3], eta=eta, step_fn=step_fn)
        assert_close(x_o, x_d, kind="f32_loop_sweep", msg=lambda m, config=config: f"{config}: {m}")


@pytest.mark.parametrize("step_fn", STEP_FNS.values(), ids=STEP_FNS.keys())
def test_use_clipped_model_output_matches_diffusers(step_fn):
    for prediction_type in ["epsilon", "sample", "v_prediction"]:
        config = dict(prediction_type=prediction_type, clip_sample=True, clip_sample_range=0.7)
        x_d, x_o = run_loops(config, steps=8, eta=0.5, step_fn=step_fn, use_clipped=True)
        assert_close(x_o, x_d, kind="f32_loop_sweep")


def test_zero_terminal_snr_matches_diffusers():
    config = dict(
        rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False
    )
    for eta in (0.0, 0.5):
        x_d, x_o = run_loops(config, steps=6, eta=eta, step_fn=dg.ddim_step)
        assert_close(x_o, x_d, kind="f32_loop_sweep")
    # At eta = 1 diffusers (0.42) takes sqrt(1 - abar_prev - std^2) of a float32 value that rounds below zero
    # and returns NaN; the step clamps b_s^2 - c^2 at zero and stays finite.
    _, x_o = run_loops(config, steps=6, eta=1.0, step_fn=dg.ddim_step)
    assert torch.isfinite(x_o).all()


@pytest.mark.parametrize("config", SCHEDULES + [dict(rescale_betas_zero_snr=True)])
def test_alphas_cumprod_match_diffusers(config):
    sched = diffusers.DDIMScheduler(**config)
    betas = ref.make_betas(
        1000,
        config.get("beta_start", 1e-4),
        config.get("beta_end", 0.02),
        config.get("beta_schedule", "linear"),
        config.get("trained_betas"),
        config.get("rescale_betas_zero_snr", False),
    )
    assert torch.equal(ref.alphas_cumprod(betas), sched.alphas_cumprod)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 3, 10, 50, 999])
def test_timesteps_match_diffusers(spacing, steps):
    sched = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    sched.set_timesteps(steps)
    ts, prev = ref.ddim_timesteps(steps, 1000, spacing, 1 if spacing == "leading" else 0)
    np.testing.assert_array_equal(ts, sched.timesteps.numpy())
    np.testing.assert_array_equal(prev, ts - 1000 // steps)
