"""FlowMatchEulerDiscreteGMMScheduler: parity with diffusers' FlowMatchEulerDiscreteScheduler over whole loops,
the RFIM-GMM one-step marginal, a tiny Stable Diffusion 3 pipeline, save / load, bad input."""

import inspect

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

import ddim_gmm_ext as dg  # noqa: E402
from ddim_gmm_ext.diffusers import FlowMatchEulerDiscreteGMMScheduler  # noqa: E402
from tests.helpers import MC_SIGMAS, assert_close, assert_within, is_close  # noqa: E402

SHAPE = (2, 4, 4, 4)
# float32 Euler x + (s - t) v against the fused (1 - s)(x - t v) + s (x + (1 - t) v): same value, other rounding
# (kind "f32_loop" in tests/helpers.py).


def _velocity(x, t):
    """A smooth stand-in for a transformer's velocity output."""
    return torch.cos(2 * x) - 0.3 * x + float(t) / 1000


def _loop(scheduler, x, set_kwargs, generator=None):
    scheduler.set_timesteps(**set_kwargs)
    for t in scheduler.timesteps:
        x = scheduler.step(_velocity(x, t), t, x, generator=generator).prev_sample
    return x


CASES = {
    "sd3-shift3": (dict(shift=3.0), dict(num_inference_steps=7)),
    "flux-dynamic-custom-sigmas": (
        dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, shift=3.0),
        dict(sigmas=torch.linspace(1.0, 1 / 9, 9).tolist(), mu=0.8),
    ),
    "shift-terminal": (dict(shift=3.0, shift_terminal=0.1), dict(num_inference_steps=6)),
    "custom-timesteps-and-sigmas": (
        dict(shift=3.0),
        dict(timesteps=[1000.0, 700.0, 420.0, 150.0], sigmas=[1.0, 0.7, 0.42, 0.15]),
    ),
    "karras": (dict(use_karras_sigmas=True), dict(num_inference_steps=5)),
    "exponential": (dict(use_exponential_sigmas=True), dict(num_inference_steps=5)),
    "invert": (dict(invert_sigmas=True), dict(num_inference_steps=5)),
    "linear-time-shift": (
        dict(use_dynamic_shifting=True, time_shift_type="linear"),
        dict(num_inference_steps=6, mu=1.2),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_gmm_off_eta_0_equals_the_base_class(case):
    config, set_kwargs = CASES[case]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    expected = _loop(FlowMatchEulerDiscreteScheduler(**config), x, set_kwargs)
    actual = _loop(FlowMatchEulerDiscreteGMMScheduler(**config), x, set_kwargs)
    assert_close(actual, expected, kind="f32_loop")


@pytest.mark.parametrize("ours", [dict(stochastic_sampling=True), dict(rfim_eta=1.0)])
def test_stochastic_sampling_with_a_generator_equals_the_base_class(ours):
    # Checked to fail with the noise std c = eta * t (the current time) instead of eta * s.
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    set_kwargs = dict(num_inference_steps=6)
    expected = _loop(
        FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True),
        x,
        set_kwargs,
        torch.Generator().manual_seed(5),
    )
    actual = _loop(
        FlowMatchEulerDiscreteGMMScheduler(shift=3.0, **ours), x, set_kwargs, torch.Generator().manual_seed(5)
    )
    assert_close(actual, expected, kind="f32_loop")


def test_keeps_every_base_config_key_default_and_step_argument():
    ours = inspect.signature(FlowMatchEulerDiscreteGMMScheduler.__init__).parameters
    for name, p in inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters.items():
        assert name in ours and ours[name].default == p.default, name
    for method in ("step", "set_timesteps"):
        assert (
            inspect.signature(getattr(FlowMatchEulerDiscreteGMMScheduler, method)).parameters.keys()
            == inspect.signature(getattr(FlowMatchEulerDiscreteScheduler, method)).parameters.keys()
        )


def _one_step_marginal(gmm_params=None, n=40000):
    """x_s of one RFIM-GMM step at eta 1 with the true velocity, x0 fixed, eps random: [n, D] and (x0, s)."""
    s = FlowMatchEulerDiscreteGMMScheduler(
        shift=2.0, rfim_eta=1.0, gmm_variant="ortho", gmm_n_components=2, gmm_scale=0.5, seed=11
    )
    s.set_timesteps(5)
    i = 2
    t, s_next = float(s.sigmas[i]), float(s.sigmas[i + 1])
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 1, 2, 2, generator=gen).expand(n, 1, 2, 2)
    eps = torch.randn(n, 1, 2, 2, generator=gen)
    x_t = (1 - t) * x0 + t * eps
    s.set_begin_index(i)
    if gmm_params is not None:
        s.set_gmm_params(gmm_params)
    x_s = s.step(eps - x0, s.timesteps[i], x_t).prev_sample
    return x_s.reshape(n, -1).double(), x0[0].reshape(-1).double(), s_next, s


def test_one_step_marginal_with_the_true_velocity_has_the_exact_moments():
    # E[x_s | x0] = (1 - s) x0 and Var = s^2 per coordinate (paper eq. 18-21, diagonal variance offsets).
    # n = 40000: the variance estimate has relative std sqrt(2 / n) = 0.7%; tolerance 4% (~6 sigma).
    x_s, x0, s_next, sched = _one_step_marginal()
    n = x_s.shape[0]
    assert sched.gmm is not None and float(sched.gmm.offsets.abs().max()) > 0.1
    assert_within(x_s.mean(0), (1 - s_next) * x0, MC_SIGMAS * s_next / n**0.5)
    rel = (x_s.var(0) / s_next**2 - 1).abs().max()
    assert rel < 0.04, rel
    # The same statistic with the variance offsets dropped (offsets kept): the test must see it.
    g = sched.gmm
    dropped = dg.GMM.from_params(g.priors, g.offsets, torch.zeros_like(g.var_offsets))
    x_bad, *_ = _one_step_marginal(dropped)
    assert (x_bad.var(0) / s_next**2 - 1).abs().max() > 0.08


def _tiny_sd3(scheduler):
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(pipe, steps=4, seed=0):
    gen = torch.Generator().manual_seed(1)
    embeds, pooled = torch.randn(2, 5, 16, generator=gen), torch.randn(2, 8, generator=gen)
    return pipe(
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        negative_prompt_embeds=embeds.flip(0),
        negative_pooled_prompt_embeds=pooled.flip(0),
        height=16,
        width=16,
        num_inference_steps=steps,
        guidance_scale=2.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(seed),
    ).images


def test_stable_diffusion_3_pipeline_end_to_end_with_and_without_gmm(tmp_path):
    from diffusers import DiffusionPipeline

    pipe = _tiny_sd3(FlowMatchEulerDiscreteScheduler(shift=3.0))
    stock = _latents(pipe)
    pipe.scheduler = FlowMatchEulerDiscreteGMMScheduler.from_config(pipe.scheduler.config)
    assert_close(_latents(pipe), stock, kind="f32_loop_upstream")
    pipe.scheduler = FlowMatchEulerDiscreteGMMScheduler.from_config(
        pipe.scheduler.config, rfim_eta=1.0, gmm_variant="ortho-vub", gmm_n_components=4, seed=2
    )
    gmm = _latents(pipe)
    assert torch.isfinite(gmm).all() and not is_close(gmm, stock, "distinct")
    assert_close(_latents(pipe), gmm, kind="exact")  # same seed, same samples
    # the round trip needs no patch_diffusers (the import leaves the stock classes as they are)
    assert FlowMatchEulerDiscreteGMMScheduler not in FlowMatchEulerDiscreteScheduler().compatibles

    pipe.save_pretrained(tmp_path)
    absent = {f"{kind}{n}": None for kind in ("text_encoder", "tokenizer") for n in ("", "_2", "_3")}
    loaded = DiffusionPipeline.from_pretrained(tmp_path, **absent)
    assert type(loaded.scheduler) is FlowMatchEulerDiscreteGMMScheduler
    assert loaded.scheduler.config.gmm_variant == "ortho-vub" and loaded.scheduler.config.rfim_eta == 1.0
    loaded.set_progress_bar_config(disable=True)
    assert_close(_latents(loaded), gmm, kind="exact")
    stock_loaded = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert type(stock_loaded) is FlowMatchEulerDiscreteScheduler and stock_loaded.config.shift == 3.0


def test_mid_schedule_start_with_set_begin_index_and_from_the_timestep():
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))

    def run(begin=None):
        s = FlowMatchEulerDiscreteGMMScheduler(shift=3.0, rfim_eta=1.0, gmm_variant="ortho", gmm_n_components=2, seed=4)
        s.set_timesteps(6)
        if begin is not None:
            s.set_begin_index(begin)
        t = s.timesteps[3]
        return s.step(_velocity(x, t), t, x).prev_sample, s.step_index

    (a, ia), (b, ib) = run(), run(3)
    assert ia == ib == 4
    assert_close(a, b, kind="exact")


@pytest.mark.parametrize(
    "config, error, match",
    [
        (dict(rfim_eta=1.5), ValueError, r"rfim_eta must be a number in \[0, 1\]"),
        (dict(rfim_eta=-0.1), ValueError, "rfim_eta must be"),
        (dict(rfim_eta=0.5, stochastic_sampling=True), ValueError, "stochastic_sampling=True is rfim_eta = 1"),
        (dict(gmm_variant="orthogonal"), ValueError, "gmm_variant must be"),
        (dict(time_shift_type="cubic"), ValueError, "time_shift_type"),
        (dict(shift=0.0), ValueError, "shift must be a finite number > 0"),
        (dict(shift_terminal=1.5), ValueError, "shift_terminal must be"),
        (dict(seed=-2), ValueError, "seed must be"),
    ],
)
def test_bad_config(config, error, match):
    with pytest.raises(error, match=match):
        FlowMatchEulerDiscreteGMMScheduler(**config)


def test_bad_use():
    s = FlowMatchEulerDiscreteGMMScheduler(rfim_eta=1.0)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, torch.tensor(500.0), x)
    for steps in (0, -3, True):
        with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1"):
            s.set_timesteps(steps)
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="is not in the schedule"):
        s.step(x, torch.tensor(123.0), x)
    with pytest.raises(ValueError, match="integer indices"):
        s.step(x, 1, x)
    three = dg.GMM.create(64, n_components=2, n_steps=3)
    with pytest.raises(ValueError, match="gmm_params has parameter sets for 3 steps but sampling takes 4"):
        s.set_gmm_params(three)
    s.set_timesteps(3)
    s.set_gmm_params(three)
    with pytest.raises(ValueError, match="gmm_params has parameter sets for 3 steps but sampling takes 4"):
        s.set_timesteps(4)
    s.set_timesteps(3)
    with pytest.raises(ValueError, match="gmm_params was built for dim=64"):
        s.step(torch.zeros(1, 2, 2, 2), s.timesteps[0], torch.zeros(1, 2, 2, 2))
    s.set_begin_index(0)
    for t in s.timesteps:
        s.step(x, t, x)
    with pytest.raises(ValueError, match="past the end"):
        s.step(x, s.timesteps[-1], x)


@pytest.mark.parametrize("gmm_variant", ["ortho-vub", "rand"])
def test_gmm_loop_equals_sample_rfim_with_the_same_seed(gmm_variant):
    # The scheduler's RFIM-GMM (tables from the config, Philox stream of the seed) is the library's sampler:
    # checked to fail with the Philox step index off by one.
    sigmas = [1.0, 0.8, 0.55, 0.3, 0.1]
    s = FlowMatchEulerDiscreteGMMScheduler(rfim_eta=1.0, gmm_variant=gmm_variant, gmm_n_components=4, seed=3)
    s.set_timesteps(sigmas=sigmas)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    y = x
    for t in s.timesteps:
        y = s.step(_velocity(y, t), t, y).prev_sample
    expected = dg.sample_rfim(
        lambda z, t: _velocity(z, t[0] * 1000),
        x,
        s.sigmas,
        eta=1.0,
        gmm=gmm_variant,
        n_components=4,
        seed=3,
        progress=False,
    )
    assert_close(y, expected, kind="f32")


def test_flux_pipeline_dynamic_shifting_end_to_end_with_and_without_gmm():
    # Flux passes its own sigmas and mu (resolution-dependent shift) to set_timesteps.
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    config = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, shift=3.0)
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**config),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
    )
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(1)
    embeds, pooled = torch.randn(1, 5, 16, generator=gen), torch.randn(1, 8, generator=gen)

    def latents():
        return pipe(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            height=16,
            width=16,
            num_inference_steps=5,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).images

    stock = latents()
    pipe.scheduler = FlowMatchEulerDiscreteGMMScheduler.from_config(pipe.scheduler.config)
    assert_close(latents(), stock, kind="f32_loop_upstream")
    pipe.scheduler = FlowMatchEulerDiscreteGMMScheduler.from_config(
        pipe.scheduler.config, rfim_eta=0.8, gmm_variant="ortho", gmm_n_components=3, seed=0
    )
    gmm = latents()
    assert torch.isfinite(gmm).all() and not is_close(gmm, stock, "distinct")


@pytest.mark.parametrize("gmm_variant", [None, "ortho-vub"])
def test_digits_flow_model_through_the_scheduler_equals_the_eval_sampler(gmm_variant):
    # The shipped digits rectified-flow model sampled by FlowMatchEulerDiscreteGMMScheduler (uniform sigmas,
    # the eval's GMM tables) gives the samples of `ddim-gmm eval --family rfim`'s loop: the eval's RFIM / RFIM-GMM
    # tables are this scheduler's. Checked to fail with the eval's final step set to "gmm" (the scheduler's
    # default is "gaussian").
    from ddim_gmm_ext.quality import digits
    from ddim_gmm_ext.quality.sampling import sample_rfim

    model = digits.load("flow")
    steps, eta, seed = 5, 0.5, 2
    gmm = (
        None
        if gmm_variant is None
        else dg.GMM.create(64, n_components=8, n_steps=steps, variant=gmm_variant, seed=seed)
    )
    x_T = torch.randn(64, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        (expected,) = sample_rfim(model, x_T, steps, eta, [gmm], seed)
        s = FlowMatchEulerDiscreteGMMScheduler(rfim_eta=eta, seed=seed)
        s.set_gmm_params(gmm_params=gmm)
        s.set_timesteps(sigmas=dg.reference.rf_times(steps)[:-1].tolist())
        x = x_T
        for t in s.timesteps:
            x = s.step(model(x, (t / 1000).expand(len(x))), t, x).prev_sample
    assert_close(x, expected, kind="f32_loop")
