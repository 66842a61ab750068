"""EulerDiscreteGMMScheduler and EulerAncestralDiscreteGMMScheduler: whole-loop parity with diffusers' Euler
schedulers (same generator), fallbacks, config round trip, bad input."""

import pytest
import torch

pytest.importorskip("diffusers")
import diffusers  # noqa: E402

import ddim_gmm_ext as dg  # noqa: E402
from ddim_gmm_ext.diffusers import EulerAncestralDiscreteGMMScheduler, EulerDiscreteGMMScheduler  # noqa: E402
from tests.helpers import MC_SIGMAS_WIDE, assert_close, assert_within  # noqa: E402

SHAPE = (2, 3, 8, 8)


def _loop(scheduler, steps, seed=3, **step_kwargs):
    """Final sample of a whole loop as a pipeline runs it (scale_model_input, model, step) with one generator
    (none when ``seed`` is None)."""
    scheduler.set_timesteps(steps)
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        m = 0.5 * torch.sin(3 * inp) + 0.1 * float(t) / 1000
        x = scheduler.step(m, t, x, generator=gen, **step_kwargs).prev_sample
    return x


EULER_CONFIGS = [
    {},
    {"use_karras_sigmas": True},
    {"use_exponential_sigmas": True},
    {"use_beta_sigmas": True},
    {"timestep_spacing": "trailing", "beta_schedule": "scaled_linear"},
    {"timestep_spacing": "leading", "steps_offset": 1, "final_sigmas_type": "sigma_min"},
    {"prediction_type": "sample"},
    {"prediction_type": "v_prediction"},  # fused: the op's general v_prediction with a_t = 1, b_t = sigma
]


# Mutation checked: B = 1.01 sigma_next fails every fused
# config.
@pytest.mark.parametrize("config", EULER_CONFIGS)
@pytest.mark.parametrize("steps", [7, 30])
def test_euler_whole_loop_matches_diffusers(config, steps):
    pytest.importorskip("scipy") if config.get("use_beta_sigmas") else None
    ours = _loop(EulerDiscreteGMMScheduler(**config), steps)
    stock = _loop(diffusers.EulerDiscreteScheduler(**config), steps)
    assert_close(ours, stock, kind="f32_loop_upstream")


def test_euler_churn_falls_back_to_diffusers():
    kw = {"s_churn": 0.5, "s_tmin": 0.1, "s_tmax": 50.0}
    ours = _loop(EulerDiscreteGMMScheduler(), 9, **kw)
    stock = _loop(diffusers.EulerDiscreteScheduler(), 9, **kw)
    torch.testing.assert_close(ours, stock)


ANCESTRAL_CONFIGS = [
    {},
    {"timestep_spacing": "trailing", "beta_schedule": "scaled_linear"},
    {"timestep_spacing": "leading", "steps_offset": 1},
    {"prediction_type": "v_prediction"},  # fused: the op's general v_prediction with a_t = 1, b_t = sigma
]


# Mutation checked: dropping sigma_up (c = 0) fails every fused config.
@pytest.mark.parametrize("config", ANCESTRAL_CONFIGS)
@pytest.mark.parametrize("steps", [7, 30])
def test_euler_ancestral_whole_loop_matches_diffusers(config, steps):
    ours = _loop(EulerAncestralDiscreteGMMScheduler(**config), steps)
    stock = _loop(diffusers.EulerAncestralDiscreteScheduler(**config), steps)
    assert_close(ours, stock, kind="f32_loop_upstream")


def test_euler_ancestral_without_generator_is_seeded_by_torch():
    # Mutation checked: a constant stream seed makes a == c.
    torch.manual_seed(4)
    a = _loop(EulerAncestralDiscreteGMMScheduler(), 6, seed=None)
    torch.manual_seed(4)
    b = _loop(EulerAncestralDiscreteGMMScheduler(), 6, seed=None)
    torch.manual_seed(5)
    c = _loop(EulerAncestralDiscreteGMMScheduler(), 6, seed=None)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize(
    ("ours", "stock"),
    [
        (EulerDiscreteGMMScheduler, "EulerDiscreteScheduler"),
        (EulerAncestralDiscreteGMMScheduler, "EulerAncestralDiscreteScheduler"),
    ],
)
def test_save_load_round_trip_and_compatibles(tmp_path, ours, stock):
    s = ours(beta_schedule="scaled_linear", timestep_spacing="trailing")
    s.save_pretrained(tmp_path)
    back = ours.from_pretrained(tmp_path)
    assert back.config.beta_schedule == "scaled_linear" and back.config.timestep_spacing == "trailing"
    assert ours.__name__ not in [c.__name__ for c in getattr(diffusers, stock)().compatibles]  # unpatched
    assert isinstance(ours.from_config(getattr(diffusers, stock)().config), ours)


@pytest.mark.parametrize("cls", [EulerDiscreteGMMScheduler, EulerAncestralDiscreteGMMScheduler])
def test_bad_step_counts_are_refused(cls):
    s = cls()
    for bad in (0, -3, True):
        with pytest.raises(ValueError, match="num_inference_steps"):
            s.set_timesteps(bad)


@pytest.mark.parametrize("variant", ["rand", "ortho-lr"])
def test_euler_ancestral_gmm_one_step_moments(variant):
    # The exact eps as model output on the VE path (x = x0 + sigma eps): the mixture step must keep
    # E[x_next] = x0 and Var[x_next] = sigma_next^2 per coordinate (the GMM tables are in VP units and enter
    # scaled by g = sqrt(1 + sigma_next^2); at this step and s = 1 no direction is clipped: g^2 v <= 0.42 <
    # sigma_up^2 = 0.46). Checked to fail with the variance offsets dropped (g is checked below).
    n = 20000
    s = EulerAncestralDiscreteGMMScheduler(gmm_variant=variant, gmm_n_components=4, gmm_scale=1.0, seed=5,
                                           final_step="gmm")  # fmt: skip
    s.set_timesteps(10)
    i = 6
    sigma, sigma_next = float(s.sigmas[i]), float(s.sigmas[i + 1])
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 48, generator=g, dtype=torch.float64).expand(n, 48).reshape(n, 3, 4, 4)
    eps = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    s._step_index = i
    out = s.step(eps.float(), s.timesteps[i], (x0 + sigma * eps).float()).prev_sample.double()
    centred = (out - x0).flatten(1)
    tol = MC_SIGMAS_WIDE * (2 / n) ** 0.5
    assert (centred.mean(0).abs() < MC_SIGMAS_WIDE * sigma_next / n**0.5).all()
    assert_within(centred.var(0) / sigma_next**2, torch.ones(48, dtype=torch.float64), tol)
    assert s.gmm is not None and s.gmm.variant == variant


def test_euler_ancestral_gmm_final_step_and_round_trip(tmp_path):
    def run(final_step):
        sched = EulerAncestralDiscreteGMMScheduler(gmm_variant="ortho", gmm_n_components=3, seed=1,
                                                   final_step=final_step)  # fmt: skip
        return _loop(sched, 7, seed=None), sched

    gauss, sched = run("gaussian")
    mixed, _ = run("gmm")
    plain = _loop(EulerAncestralDiscreteGMMScheduler(seed=1), 7, seed=None)
    assert not torch.allclose(gauss, mixed) and not torch.allclose(gauss, plain)
    sched.save_pretrained(tmp_path)
    loaded = EulerAncestralDiscreteGMMScheduler.from_pretrained(tmp_path)
    assert loaded.config.gmm_variant == "ortho" and loaded.config.final_step == "gaussian"
    torch.testing.assert_close(_loop(loaded, 7, seed=None), gauss)


def test_euler_ancestral_gmm_step_is_the_vp_ddim_gmm_step():
    # Euler ancestral is DDIM at eta = 1 on the VP path x_VP = x_VE / sqrt(1 + sigma^2): with the same GMM
    # tables, seed and step, the fused VE step equals dg.ddim_step on the VP sample, mapped back. Checked to
    # fail with g = 1 instead of sqrt(1 + sigma_next^2) (the offsets would be too small in VE units).
    s = EulerAncestralDiscreteGMMScheduler(gmm_variant="ortho", gmm_n_components=3, seed=7, final_step="gmm")
    s.set_timesteps(9)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    m = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    i = 4
    s._step_index = i
    ours = s.step(m.float(), s.timesteps[i], x.float()).prev_sample.double()
    sigma, sigma_next = s.sigmas[i].double(), s.sigmas[i + 1].double()
    abar_t, abar_s = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
    vp = dg.ddim_step(m.float(), (x * abar_t.sqrt()).float(), abar_t, abar_s, eta=1.0, gmm=s.gmm, step_index=i,
                      seed=s._stream_seed)  # fmt: skip
    assert_close(ours, vp.prev_sample.double() / abar_s.sqrt(), kind="f32_vs_f64_loop")
