"""Flow models through the k-diffusion / ComfyUI path: sample_rfim_gmm against ComfyUI's flow samplers (Euler
and euler_ancestral_RF, written here from their update rules), the exact-denoiser Gaussian spread, the node's
dispatch on the model's sampling type, its noise (ComfyUI's own noise sampler with the GMM off) and its
widget checks."""

from __future__ import annotations

import importlib
import math
import sys
import types

import pytest
import torch

from ddim_gmm_ext.integrations.comfy import is_flow_model, sample_ddim_gmm_any
from ddim_gmm_ext.k_diffusion import sample_rfim_gmm
from tests.helpers import assert_close

SHAPE = (3, 2, 4, 4)


def _flow_denoiser(s0: float = 0.5):
    """The exact x0 of Gaussian data x0 ~ N(0, s0^2 I) on x_t = (1 - t) x0 + t eps."""

    def model(x, sigma, **extra_args):  # ComfyUI passes extra_args (its seed, model options) to the model
        t = sigma.to(x.dtype)[:, None, None, None]
        return (1 - t) * s0**2 / ((1 - t) ** 2 * s0**2 + t**2) * x

    return model


def _comfy_ancestral_rf(model, x, sigmas, eta, noise_sampler, s_noise=1.0):
    """ComfyUI's euler_ancestral_RF update (eta 0: its flow Euler), from its formulas: Euler to
    sigma_down = s (1 + (s / t - 1) eta), then rescale by (1 - s) / (1 - sigma_down) and renoise to s."""
    for i in range(len(sigmas) - 1):
        t, s = sigmas[i], sigmas[i + 1]
        denoised = model(x, t * x.new_ones(x.shape[0]))
        if s == 0:
            x = denoised
            continue
        sigma_down = s * (1 + (s / t - 1) * eta)
        ratio = sigma_down / t
        x = ratio * x + (1 - ratio) * denoised
        if eta > 0:
            renoise = (s**2 - sigma_down**2 * (1 - s) ** 2 / (1 - sigma_down) ** 2) ** 0.5
            x = (1 - s) / (1 - sigma_down) * x + noise_sampler(t, s) * s_noise * renoise
    return x


class _SharedNoise:
    def __init__(self):
        self.gen = torch.Generator().manual_seed(5)

    def __call__(self, sigma, sigma_next):
        return torch.randn(SHAPE, generator=self.gen, dtype=torch.float64)


def _shift(t, shift=3.0):
    return shift * t / (1 + (shift - 1) * t)


SCHEDULES = {
    "sd3-shift-7": _shift(torch.linspace(1, 0, 8, dtype=torch.float64)),
    "split-high": _shift(torch.linspace(1, 0, 8, dtype=torch.float64))[:4],  # ends above 0
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_equals_comfyui_flow_samplers(schedule, eta):
    # Checked to fail with noise="rfim" at eta > 0 (another kernel of the same marginal) and with the VE
    # sampler applied to flow sigmas (the node's old behaviour).
    sigmas = SCHEDULES[schedule]
    model = _flow_denoiser()
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = _comfy_ancestral_rf(model, x, sigmas, eta, _SharedNoise())
    ours = sample_rfim_gmm(
        model, x, sigmas, eta=eta, noise="ancestral_rf", gmm=None, disable=True, noise_sampler=_SharedNoise()
    )
    assert_close(ours, expected, kind="f64_loop")


@pytest.mark.parametrize(("noise", "eta"), [("rfim", 0.0), ("ancestral_rf", 1.0), ("ancestral_rf", 0.5)])
def test_exact_denoiser_gives_the_data_spread(noise, eta):
    # Data N(0, 0.5^2): with the exact denoiser the samples' std is 0.5 (the node measured 0.66 through the
    # VE path). Tolerance: Monte Carlo (N = 4000 x 32 coordinates) plus the first-order discretisation error
    # of 300 steps (about 1%; 30 steps give 0.45-0.48).
    # (RFIM at eta = 1 renoises fully, x_s = (1 - s) x0_hat + s z, and loses the posterior variance at every
    # step: 0.32 here. That is the kernel the paper defines, not a defect of the sampler.)
    N, s0 = 4000, 0.5
    sigmas = torch.linspace(1, 0, 301, dtype=torch.float64)
    x = torch.randn(N, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = sample_rfim_gmm(_flow_denoiser(s0), x, sigmas, eta=eta, noise=noise, gmm=None, seed=3, disable=True)
    assert abs(out.std().item() - s0) < 0.02 * s0


def test_gmm_on_a_flow_model_runs_with_64_bit_seeds():
    # ComfyUI passes seeds up to 2**64 - 1 in extra_args; the GMM changes the samples and they stay finite.
    sigmas = _shift(torch.linspace(1, 0, 9, dtype=torch.float64))
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    args = dict(eta=0.5, noise="ancestral_rf", n_components=4, disable=True, extra_args={"seed": 2**64 - 1})
    plain = sample_rfim_gmm(_flow_denoiser(), x, sigmas, gmm=None, **args)
    mixed = sample_rfim_gmm(_flow_denoiser(), x, sigmas, gmm="ortho", **args)
    assert torch.isfinite(mixed).all() and not torch.allclose(plain, mixed)


class CONST:  # the name ComfyUI's flow model sampling class has
    pass


class EPS:
    pass


def _wrapper(sampling):
    inner = type("Model", (), {"model_sampling": sampling})()
    cfg = type("CFGGuider", (), {"inner_model": inner})()
    return type("KSamplerX0Inpaint", (), {"inner_model": cfg})()


def test_node_dispatches_on_the_model_sampling_type():
    assert is_flow_model(_wrapper(CONST())) and not is_flow_model(_wrapper(EPS())) and not is_flow_model(object())
    model = _flow_denoiser()
    flow = _wrapper(CONST())
    flow.__class__.__call__ = lambda self, x, sigma, **kw: model(x, sigma)
    sigmas = SCHEDULES["sd3-shift-7"]
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ours = sample_ddim_gmm_any(flow, x, sigmas, disable=True, eta=0.5, gmm=None, noise_sampler=_SharedNoise())
    expected = _comfy_ancestral_rf(model, x, sigmas, 0.5, _SharedNoise())
    assert_close(ours, expected, kind="f64_loop")
    assert math.isfinite(ours.sum().item())


@pytest.mark.parametrize("ulps", [1, 8, 16])
def test_flow_schedule_starting_at_float32_rounding_above_1(ulps):
    # ComfyUI's float32 time_snr_shift gives sigmas[0] = 1 + 2^-23 for 63 of 1000 ModelSamplingSD3 shifts (1.32,
    # 4.03, ...) and up to 1 + 8 * 2^-23 for shifts below 1; its own samplers run them, and so does
    # sample_rfim_gmm, with ComfyUI's arithmetic on t > 1 (float64 tolerance; taking t as 1 failed it). Checked to
    # fail with the old check (sigmas[0] > 1 refused).
    sigmas = _shift(torch.linspace(1, 0, 8, dtype=torch.float64), 1.32)
    sigmas[0] = 1 + ulps * 2.0**-23
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    expected = _comfy_ancestral_rf(_flow_denoiser(), x, sigmas, 0.5, _SharedNoise())
    ours = sample_rfim_gmm(
        _flow_denoiser(), x, sigmas, eta=0.5, noise="ancestral_rf", gmm=None, disable=True, noise_sampler=_SharedNoise()
    )
    assert_close(ours, expected, kind="f64_loop")
    tables = sample_rfim_gmm(_flow_denoiser(), x, sigmas, eta=0.5, gmm="ortho-lr", n_components=4, seed=0, disable=True)
    assert torch.isfinite(tables).all()


@pytest.mark.parametrize("start", [1 + 17 * 2.0**-23, 1.001, 2.0])
def test_flow_schedule_above_1_beyond_rounding_is_refused(start):
    sigmas = torch.tensor([start, 0.5, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"times in \[0, 1\].*sigmas\[0\]"):
        sample_rfim_gmm(_flow_denoiser(), torch.zeros(SHAPE, dtype=torch.float64), sigmas, gmm=None, disable=True)


# ---- the node inside a stand-in ComfyUI --------------------------------------------------------------------


def _comfy_default_noise_sampler(x, seed=None):
    """ComfyUI's default_noise_sampler, from its behaviour (comfy/k_diffusion/sampling.py): a torch.Generator on
    x's device seeded with the seed (+ 1 on the CPU), then torch.randn of x's size, dtype and device per call."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device=x.device).manual_seed(seed + 1 if x.device.type == "cpu" else seed)
    return lambda sigma, sigma_next: torch.randn(x.size(), dtype=x.dtype, device=x.device, generator=generator)


@pytest.fixture
def comfy_node(monkeypatch):
    """The node module as ComfyUI loads it: comfy.samplers.KSAMPLER records (sampler function, extra_options)
    and comfy.k_diffusion.sampling has ComfyUI's default noise sampler."""
    import ddim_gmm_ext.comfy as node

    comfy = types.ModuleType("comfy")
    comfy.samplers = types.ModuleType("comfy.samplers")
    comfy.samplers.KSAMPLER = lambda fn, extra_options: (fn, extra_options)
    comfy.k_diffusion = types.ModuleType("comfy.k_diffusion")
    comfy.k_diffusion.sampling = types.ModuleType("comfy.k_diffusion.sampling")
    comfy.k_diffusion.sampling.default_noise_sampler = _comfy_default_noise_sampler
    modules = [comfy, comfy.samplers, comfy.k_diffusion, comfy.k_diffusion.sampling]
    for module in modules:
        monkeypatch.setitem(sys.modules, module.__name__, module)
    importlib.reload(node)
    yield node
    monkeypatch.undo()
    importlib.reload(node)


def _run_node(node, model, x, sigmas, seed, **widgets):
    """The node's SAMPLER run as ComfyUI's KSAMPLER.sample calls it: fn(model, noise, sigmas, extra_args=...,
    callback=..., disable=..., **extra_options), the seed in extra_args."""
    values = dict(eta=0.5, s_noise=1.0, variant="off", n_components=8, scale=1.0) | widgets
    ((fn, extra_options),) = node.NODE_CLASS_MAPPINGS["SamplerDDIMGMM"]().get_sampler(**values)
    return fn(model, x, sigmas, extra_args={"seed": seed}, callback=None, disable=True, **extra_options)


def _ve_wrapper(s0: float = 0.5):
    """An eps-model wrapper (model_sampling EPS) whose denoiser is the exact x0 of N(0, s0^2 I) data on
    x = x0 + sigma eps."""
    wrapper = _wrapper(EPS())
    wrapper.__class__.__call__ = lambda self, x, sigma, **kw: x * s0**2 / (s0**2 + sigma[:, None, None, None] ** 2)
    return wrapper


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_node_off_equals_comfyui_euler_ancestral_sample_for_sample(comfy_node, eta):
    # ComfyUI passes its samplers no noise sampler: they draw default_noise_sampler(x, extra_args["seed"]). With
    # the variant off the node uses that one, so a seed gives ComfyUI's samples. Checked to fail with the node's
    # own Philox noise (comfy_noise_sampler returning None).
    from tests.integrations.kdiffusion_upstream import load_sampling

    K = load_sampling()
    model = _ve_wrapper()
    sigmas = K.get_sigmas_karras(6, 0.03, 14.6, device="cpu").double()
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    expected = K.sample_euler_ancestral(
        model, x, sigmas, eta=eta, disable=True, noise_sampler=_comfy_default_noise_sampler(x, seed=42)
    )
    assert_close(_run_node(comfy_node, model, x, sigmas, 42, eta=eta), expected, kind="f64_loop_ve")


@pytest.mark.parametrize("noise_scale", [None, 0.5])
def test_node_off_equals_comfyui_euler_ancestral_rf_sample_for_sample(comfy_node, noise_scale):
    # Flow models: ComfyUI's euler_ancestral_RF with its default noise sampler, its noise scaled by the model
    # sampling's noise_scale when it has one. Checked to fail with the node's own Philox noise and without the
    # noise_scale factor.
    sampling = CONST()
    if noise_scale is not None:
        sampling.noise_scale = noise_scale
    flow, model = _wrapper(sampling), _flow_denoiser()
    flow.__class__.__call__ = lambda self, x, sigma, **kw: model(x, sigma)
    sigmas = SCHEDULES["sd3-shift-7"]
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    noise = _comfy_default_noise_sampler(x, seed=2**40)
    expected = _comfy_ancestral_rf(model, x, sigmas, 0.5, noise, s_noise=noise_scale or 1.0)
    assert_close(_run_node(comfy_node, flow, x, sigmas, 2**40), expected, kind="f64_loop")


def test_node_with_a_gmm_keeps_the_philox_stream(comfy_node):
    # With a GMM on, the noise and the components come from the Philox stream of the seed (not ComfyUI's
    # generator): the node's run equals sample_ddim_gmm's with that seed.
    from ddim_gmm_ext.k_diffusion import sample_ddim_gmm

    model = _ve_wrapper()
    sigmas = torch.tensor([14.6, 3.0, 0.7, 0.1, 0.0], dtype=torch.float64)
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    ours = _run_node(comfy_node, model, x, sigmas, 7, variant="ortho-lr", n_components=4)
    expected = sample_ddim_gmm(model, x, sigmas, eta=0.5, gmm="ortho-lr", n_components=4, seed=7, disable=True)
    assert_close(ours, expected, kind="exact")


@pytest.mark.parametrize(
    ("widget", "value", "match"),
    [
        ("eta", math.nan, "eta must be a number in"),
        ("eta", 1.5, "eta must be a number in"),
        ("s_noise", math.nan, "s_noise must be a finite number"),
        ("s_noise", math.inf, "s_noise must be a finite number"),
        ("scale", math.nan, "scale must be a finite number"),
        ("n_components", 0, "n_components must be an int >= 1"),
        ("variant", "vub", "variant must be one of"),
    ],
)
@pytest.mark.parametrize("variant", ["off", "ortho-lr"])
def test_node_refuses_bad_widget_values_naming_the_widget(comfy_node, widget, value, match, variant):
    # NaN passes ComfyUI's min / max widget validation (its comparisons are false); the node used to hand it on
    # and fail inside SamplerCustom. Checked to fail with get_sampler passing the values unchecked.
    values = dict(eta=0.5, s_noise=1.0, variant=variant, n_components=8, scale=1.0) | {widget: value}
    with pytest.raises(ValueError, match=match):
        comfy_node.NODE_CLASS_MAPPINGS["SamplerDDIMGMM"]().get_sampler(**values)


def test_node_off_takes_unused_gmm_widgets_as_the_schedulers_do():
    # With the variant off, n_components and scale are checked but unused: DDIMGMMScheduler(gmm_variant=None,
    # gmm_scale=5) is accepted too, and a ComfyUI widget cannot be left empty.
    from ddim_gmm_ext.integrations.comfy import node_options

    assert node_options(0.5, 1.0, "off", 3, 5.0)["gmm"] is None
    with pytest.raises(ValueError, match="scale must be a finite number"):
        node_options(0.5, 1.0, "off", 3, math.nan)


def _comfy_sd3_schedule(shift: float, steps: int, sgm: bool) -> torch.Tensor:
    """ComfyUI's ModelSamplingSD3 sigmas under its normal (``sgm=False``) / sgm_uniform scheduler, from its
    behaviour, in its float32: the model's table time_snr_shift(shift, i / 1000) for i = 1..1000, timesteps
    from 1000 sigma_max to 1000 sigma_min, each mapped back through time_snr_shift, a 0 appended. Its first
    sigma lies above 1 by the float32 rounding of sigma_max times about 1 / shift (816 ulps at shift 0.01)."""

    def time_snr_shift(t):
        return shift * t / (1 + (shift - 1) * t)

    table = time_snr_shift(torch.arange(1, 1001) / 1000)
    start, end = table[-1] * 1000, table[0] * 1000
    timesteps = torch.linspace(start, end, steps + 1)[:-1] if sgm else torch.linspace(start, end, steps)
    return torch.tensor([float(time_snr_shift(t / 1000)) for t in timesteps] + [0.0])


@pytest.mark.parametrize("sgm", [False, True])
@pytest.mark.parametrize(("shift", "ulps"), [(0.09, 33), (0.03, 282), (0.01, 816)])
def test_node_runs_comfyui_flow_schedules_starting_above_1_as_comfyui(comfy_node, shift, ulps, sgm):
    # ModelSamplingSD3 at small shifts puts sigmas[0] 33-816 float32 ulps above 1; ComfyUI's euler_ancestral_RF
    # (and the DPM++ node) run it, the node refused it ("flow sigmas are times in [0, 1]"). Now it runs ComfyUI's
    # arithmetic on t > 1 (eps_hat = (x - (1 - t) x0) / t), checked against its update rule in float64. Checked
    # to fail with the node's max_start at 1 + FLOW_TIME_ROUNDING (refused, 6 of 6) and with the first time taken
    # as 1 (the old rounding rule: 6 of 6, by about 1e-4 relative at 816 ulps, 4e-6 at 33).
    sigmas = _comfy_sd3_schedule(shift, 6, sgm)
    assert round((float(sigmas[0]) - 1) / 2**-23) == ulps
    sigmas = sigmas.double()  # its float32 values, exactly
    flow, model = _wrapper(CONST()), _flow_denoiser()
    flow.__class__.__call__ = lambda self, x, sigma, **kw: model(x, sigma)
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    expected = _comfy_ancestral_rf(model, x, sigmas, 0.5, _comfy_default_noise_sampler(x, seed=9))
    assert_close(_run_node(comfy_node, flow, x, sigmas, 9), expected, kind="f64_loop")


@pytest.mark.parametrize("sampling", [CONST, EPS])
@pytest.mark.parametrize("sigmas", [[0.0], [1.0], [14.6]], ids=["last-step-low-half", "flow-high-half", "ve-high"])
@pytest.mark.parametrize("variant", ["off", "ortho"])
def test_node_returns_the_latent_for_a_single_sigma(comfy_node, sigmas, sampling, variant):
    # ComfyUI's samplers take no step on a schedule of one sigma (SplitSigmas at step 0, or [0.] at the end) and
    # return x; the node raised "at least 2 entries". Checked to fail (12 of 12) without the takes_no_step test.
    model = _wrapper(sampling())
    model.__class__.__call__ = lambda self, x, sigma, **kw: pytest.fail("the model is called")
    x = torch.randn(SHAPE)
    assert _run_node(comfy_node, model, x, torch.tensor(sigmas), 3, variant=variant) is x
