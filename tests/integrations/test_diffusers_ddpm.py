"""DDPMGMMScheduler: whole-loop parity with diffusers' DDPMScheduler (GMM off), fallbacks, config round trip,
GMM one-step moments, bad input."""

import pytest
import torch

pytest.importorskip("diffusers")
import diffusers  # noqa: E402

import ddim_gmm_ext as dg  # noqa: E402
from ddim_gmm_ext.diffusers import DDPMGMMScheduler  # noqa: E402
from tests.helpers import MC_SIGMAS, assert_close, assert_within  # noqa: E402

SHAPE = (2, 3, 8, 8)


def _model(x, t):
    """A smooth stand-in for a UNet output, depending on the sample and the timestep."""
    return 0.5 * torch.sin(3 * x) + 0.1 * float(t) / 1000


def _loop(scheduler, steps, seed=3, channels_out=None, **set_kwargs):
    """Final sample of a whole sampling loop drawing its noise from one seeded generator."""
    scheduler.set_timesteps(steps, **set_kwargs)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps:
        m = _model(x, t)
        if channels_out is not None:  # learned variance: a second half of channels, the variance logits
            m = torch.cat([m, 0.02 * torch.sigmoid(x)], 1)  # > 0: "learned" takes its sqrt
        x = scheduler.step(m, t, x, generator=gen).prev_sample
    return x


CONFIGS = [
    {},
    {"variance_type": "fixed_small_log"},
    {"variance_type": "fixed_large"},
    {"prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    {"prediction_type": "sample", "clip_sample": False},
    {"timestep_spacing": "linspace", "beta_schedule": "squaredcos_cap_v2"},
    {
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "rescale_betas_zero_snr": True,
        "prediction_type": "v_prediction",
    },
    {"thresholding": True, "clip_sample": False},  # falls back to DDPMScheduler.step
]


# Mutation checked: zeroing the noise std column fails every fused config (all but the thresholding fallback).
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("steps", [7, 50])
def test_whole_loop_matches_ddpm_with_same_generator(config, steps):
    ours = _loop(DDPMGMMScheduler(**config), steps)
    stock = _loop(diffusers.DDPMScheduler(**config), steps)
    assert_close(ours, stock, kind="f32_ddpm_few_steps" if steps == 7 else "f32_loop_upstream")


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_learned_variance_falls_back_to_ddpm(variance_type):
    ours = _loop(DDPMGMMScheduler(variance_type=variance_type), 9, channels_out=6)
    stock = _loop(diffusers.DDPMScheduler(variance_type=variance_type), 9, channels_out=6)
    torch.testing.assert_close(ours, stock)


def test_fixed_large_log_is_fixed_large_not_nan():
    ours = _loop(DDPMGMMScheduler(variance_type="fixed_large_log"), 11)
    stock = _loop(diffusers.DDPMScheduler(variance_type="fixed_large"), 11)
    assert_close(ours, stock, kind="f32_loop_upstream")


def test_custom_timesteps_match():
    ts = [901, 650, 333, 120, 7, 0]
    ours = _loop(DDPMGMMScheduler(), None, timesteps=ts)
    stock = _loop(diffusers.DDPMScheduler(), None, timesteps=ts)
    assert_close(ours, stock, kind="f32_loop_upstream")


def test_save_load_round_trip_and_compatibles(tmp_path):
    s = DDPMGMMScheduler(gmm_variant="ortho-vub", gmm_n_components=4, seed=5, variance_type="fixed_large")
    s.save_pretrained(tmp_path)
    back = DDPMGMMScheduler.from_pretrained(tmp_path)
    assert back.config.gmm_variant == "ortho-vub" and back.config.seed == 5
    assert back.config.variance_type == "fixed_large"
    assert "DDPMGMMScheduler" not in [c.__name__ for c in diffusers.DDPMScheduler().compatibles]  # unpatched
    assert isinstance(DDPMGMMScheduler.from_config(diffusers.DDPMScheduler().config), DDPMGMMScheduler)


def test_bad_input_is_refused_before_work():
    s = DDPMGMMScheduler()
    for bad in (0, -3, True):
        with pytest.raises(ValueError, match="num_inference_steps"):
            s.set_timesteps(bad)
    s.set_timesteps(10)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="not in the schedule"):
        s.step(x, 1, x)
    with pytest.raises(ValueError, match="gmm_variant"):
        DDPMGMMScheduler(gmm_variant="ortho", variance_type="learned")


def _one_step(variant, gmm_params=None, n=40000, d=6):
    """x_s of one DDPM-GMM step with the exact noise as model output, x0 fixed, eps random: [n, d], and the
    schedule's (a_s, b_s) for it."""
    s = DDPMGMMScheduler(gmm_variant=variant, gmm_n_components=2, gmm_scale=1.0, seed=11, clip_sample=False)
    s.set_timesteps(4)  # long steps: the noise std c is a large part of b_s, so the GMM term shows
    if gmm_params is not None:
        s.set_gmm_params(gmm_params)
    i = 1
    t, t_prev = int(s.timesteps[i]), int(s.timesteps[i + 1])
    abar = s.alphas_cumprod.double()
    a_t, b_t, a_s, b_s = abar[t].sqrt(), (1 - abar[t]).sqrt(), abar[t_prev].sqrt(), (1 - abar[t_prev]).sqrt()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.linspace(-1, 1, d, dtype=torch.float64).expand(n, 1, 1, d)
    eps = torch.randn(n, 1, 1, d, dtype=torch.float64, generator=gen)
    x_s = s.step(eps, t, a_t * x0 + b_t * eps).prev_sample
    return x_s.reshape(n, d), x0[0].reshape(d), a_s.item(), b_s.item(), s


# ORTHO-VUB is left out: its variance offsets do not match per-coordinate moments (documented in the design).
@pytest.mark.parametrize("variant", ["ortho", "rand"])
def test_gmm_one_step_moments_match_forward_marginal(variant):
    """DDPM's posterior averaged over eps is the forward marginal: E[x_s] = a_s x0, Var[x_s] = b_s^2 per
    coordinate. n = 40000: relative std of the variance estimate 0.7%; tolerance 4%."""
    x_s, x0, a_s, b_s, sched = _one_step(variant)
    n = x_s.shape[0]
    assert float(sched.gmm.offsets.abs().max()) > 0.1
    assert_within(x_s.mean(0), a_s * x0, MC_SIGMAS * b_s / n**0.5)
    assert (x_s.var(0) / b_s**2 - 1).abs().max() < 0.04
    # Mutation: the same statistic with the variance offsets dropped (offsets kept) must fail.
    g = sched.gmm
    dropped = dg.GMM.from_params(g.priors, g.offsets, torch.zeros_like(g.var_offsets))
    x_bad, *_ = _one_step(variant, dropped)
    assert (x_bad.var(0) / b_s**2 - 1).abs().max() > 0.08


# Mutation checked: ignoring g on the host path (always passing the GMM) makes the "gaussian" run equal the "gmm"
# one.
def test_final_step_gaussian_drops_the_mixture_only_on_the_last_step():
    def run(**kw):
        s = DDPMGMMScheduler(gmm_variant="ortho", gmm_n_components=2, seed=3, timestep_spacing="trailing", **kw)
        s.set_timesteps(5)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
        xs = []
        for t in s.timesteps:
            x = s.step(_model(x, t), t, x).prev_sample
            xs.append(x)
        return xs

    gauss, gmm = run(), run(final_step="gmm")
    for a, b in zip(gauss[:-1], gmm[:-1], strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(gauss[-1], gmm[-1])
    with pytest.raises(ValueError, match="final_step"):
        DDPMGMMScheduler(final_step="last")
