"""EulerDiscreteGMMScheduler and EulerAncestralDiscreteGMMScheduler: whole-loop parity with diffusers' Euler
schedulers (same generator), fallbacks, config round trip, bad input."""

import pytest
import torch

pytest.importorskip("diffusers")
import diffusers  # noqa: E402

from ddim_gmm_ext.diffusers import EulerAncestralDiscreteGMMScheduler, EulerDiscreteGMMScheduler  # noqa: E402

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
    {"prediction_type": "v_prediction"},  # falls back to the base step
]


# Mutation checked: B = 1.01 sigma_next fails every fused
# config.
@pytest.mark.parametrize("config", EULER_CONFIGS)
@pytest.mark.parametrize("steps", [7, 30])
def test_euler_whole_loop_matches_diffusers(config, steps):
    pytest.importorskip("scipy") if config.get("use_beta_sigmas") else None
    ours = _loop(EulerDiscreteGMMScheduler(**config), steps)
    stock = _loop(diffusers.EulerDiscreteScheduler(**config), steps)
    torch.testing.assert_close(ours, stock, atol=1e-4, rtol=1e-4)


def test_euler_churn_falls_back_to_diffusers():
    kw = {"s_churn": 0.5, "s_tmin": 0.1, "s_tmax": 50.0}
    ours = _loop(EulerDiscreteGMMScheduler(), 9, **kw)
    stock = _loop(diffusers.EulerDiscreteScheduler(), 9, **kw)
    torch.testing.assert_close(ours, stock)


ANCESTRAL_CONFIGS = [
    {},
    {"timestep_spacing": "trailing", "beta_schedule": "scaled_linear"},
    {"timestep_spacing": "leading", "steps_offset": 1},
    {"prediction_type": "v_prediction"},  # falls back to the base step
]


# Mutation checked: dropping sigma_up (c = 0) fails every fused config.
@pytest.mark.parametrize("config", ANCESTRAL_CONFIGS)
@pytest.mark.parametrize("steps", [7, 30])
def test_euler_ancestral_whole_loop_matches_diffusers(config, steps):
    ours = _loop(EulerAncestralDiscreteGMMScheduler(**config), steps)
    stock = _loop(diffusers.EulerAncestralDiscreteScheduler(**config), steps)
    torch.testing.assert_close(ours, stock, atol=1e-4, rtol=1e-4)


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
    assert ours.__name__ in [c.__name__ for c in getattr(diffusers, stock)().compatibles]
    assert isinstance(ours.from_config(getattr(diffusers, stock)().config), ours)


@pytest.mark.parametrize("cls", [EulerDiscreteGMMScheduler, EulerAncestralDiscreteGMMScheduler])
def test_bad_step_counts_are_refused(cls):
    s = cls()
    for bad in (0, -3, True):
        with pytest.raises(ValueError, match="num_inference_steps"):
            s.set_timesteps(bad)
