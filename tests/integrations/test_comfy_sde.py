"""The DPM++ SDE / 2S ancestral node (SamplerDPMPPSDEGMM) inside a stand-in ComfyUI: with the variant off it equals
ComfyUI's own dpmpp_sde / dpmpp_2s_ancestral sample for sample, with its noise of the seed (its Brownian tree; its
default noise sampler), for eps and v models and for flow models (its CONST handling: dpmpp_sde's half-log-SNR
lambda and moved first sigma, dpmpp_2s_ancestral_RF), ComfyUI's code written here from its update rules; the
mixture's moments on the flow path; the widget checks."""

from __future__ import annotations

import math
import sys

import pytest
import torch

import ddim_gmm_ext as dg
from ddim_gmm_ext.gmm import matched_steps
from ddim_gmm_ext.integrations.k_diffusion_sde import _plan
from tests.helpers import MC_SIGMAS, MC_SIGMAS_WIDE, assert_close, assert_within, is_close
from tests.integrations.test_comfy_dpmpp import V_PREDICTION, _ComfyBrownian, _Const, _ve_model, comfy_node  # noqa: F401
from tests.integrations.test_comfy_flow import EPS, _flow_denoiser, _shift, _wrapper

SHAPE = (2, 2, 4, 4)


def _comfy_default_noise(x, seed=None):
    """ComfyUI's default_noise_sampler(x, seed), from its behaviour: normals like x from a generator on x's device
    seeded once with ``seed``, one draw per call."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(x.size(), dtype=x.dtype, device=x.device, generator=gen)


@pytest.fixture
def node(comfy_node, monkeypatch):  # noqa: F811  (the stand-in ComfyUI, with its default noise sampler too)
    monkeypatch.setattr(
        sys.modules["comfy.k_diffusion.sampling"], "default_noise_sampler", _comfy_default_noise, raising=False
    )
    return comfy_node


WIDGETS = dict(sampler="dpmpp_sde", eta=1.0, s_noise=1.0, r=0.5, variant="off", n_components=4, scale=1.0)


def _run_node(node, model, x, sigmas, seed, **widgets):
    """The node's SAMPLER as ComfyUI's KSAMPLER.sample runs it (seed in extra_args)."""
    ((fn, options),) = node.NODE_CLASS_MAPPINGS["SamplerDPMPPSDEGMM"]().get_sampler(**(WIDGETS | widgets))
    return fn(model, x, sigmas, extra_args={"seed": seed}, callback=None, disable=True, **options)


def _ancestral(sigma_from, sigma_to, eta):
    from tests.integrations.kdiffusion_upstream import load_sampling

    return load_sampling().get_ancestral_step(sigma_from, sigma_to, eta)


def _comfy_dpmpp_sde(model, x, sigmas, flow, eta, s_noise, r, noise_sampler, sampling=None):
    """ComfyUI's sample_dpmpp_sde from its update rules: half-log-SNR lambda (-log sigma; flow: log((1 - sigma) /
    sigma), its first sigma >= 1 moved to percent_to_sigma(1e-4)), alpha = sigma e^lambda, the noise drawn only
    where eta > 0 and s_noise > 0 (times the model sampling's noise_scale), a last step to 0 is x = D."""
    if flow:
        s_noise = s_noise * getattr(sampling, "noise_scale", 1.0)
        if sigmas[0] >= 1:
            sigmas = sigmas.clone()
            sigmas[0] = sampling.percent_to_sigma(1e-4)
    lam = (lambda v: v.logit().neg()) if flow else (lambda v: v.log().neg())  # noqa: E731
    sig = (lambda h: h.neg().sigmoid()) if flow else (lambda h: h.neg().exp())  # noqa: E731
    for i in range(len(sigmas) - 1):
        den = model(x, sigmas[i] * x.new_ones(x.shape[0]))
        if sigmas[i + 1] == 0:
            x = den
            continue
        l_s, l_t = lam(sigmas[i]), lam(sigmas[i + 1])
        l_1 = l_s + r * (l_t - l_s)
        s_1 = sig(l_1)
        a_s, a_1, a_t = sigmas[i] * l_s.exp(), s_1 * l_1.exp(), sigmas[i + 1] * l_t.exp()
        sd, su = _ancestral(l_s.neg().exp(), l_1.neg().exp(), eta)
        h_ = sd.log().neg() - l_s
        x_2 = (a_1 / a_s) * (-h_).exp() * x - a_1 * (-h_).expm1() * den
        if eta > 0 and s_noise > 0:
            x_2 = x_2 + a_1 * noise_sampler(sigmas[i], s_1) * s_noise * su
        den_2 = model(x_2, s_1 * x.new_ones(x.shape[0]))
        sd, su = _ancestral(l_s.neg().exp(), l_t.neg().exp(), eta)
        h_ = sd.log().neg() - l_s
        blend = (1 - 1 / (2 * r)) * den + den_2 / (2 * r)
        x = (a_t / a_s) * (-h_).exp() * x - a_t * (-h_).expm1() * blend
        if eta > 0 and s_noise > 0:
            x = x + a_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * su
    return x


def _comfy_2s_rf(model, x, sigmas, eta, s_noise, noise_sampler, sampling=None):
    """ComfyUI's sample_dpmpp_2s_ancestral_RF from its update rules: sigma_down = s (1 + (s / t - 1) eta), the
    intermediate sigma at the half-log-SNR midpoint of t and sigma_down (0.9999 from t = 1), Euler steps in the
    flow's data form, the landing rescaled by (1 - s) / (1 - sigma_down) and renoised to s where eta > 0."""
    s_noise = s_noise * getattr(sampling, "noise_scale", 1.0)
    lam = lambda v: ((1 - v) / v).log()  # noqa: E731
    for i in range(len(sigmas) - 1):
        t, s = sigmas[i], sigmas[i + 1]
        den = model(x, t * x.new_ones(x.shape[0]))
        down = s * (1 + (s / t - 1) * eta)
        if s == 0:
            x = x + (x - den) / t * (down - t)
            continue
        mid = torch.tensor(0.9999) if t == 1.0 else 1 / ((lam(t) + (lam(down) - lam(t)) / 2).exp() + 1)
        u = mid / t * x + (1 - mid / t) * den
        den_2 = model(u, mid * x.new_ones(x.shape[0]))
        x = down / t * x + (1 - down / t) * den_2
        if eta > 0:
            renoise = (s**2 - down**2 * (1 - s) ** 2 / (1 - down) ** 2) ** 0.5
            x = (1 - s) / (1 - down) * x + noise_sampler(t, s) * s_noise * renoise
    return x


def _flow_model(sampling):
    flow, denoiser = _wrapper(sampling), _flow_denoiser()
    flow.__class__.__call__ = lambda self, x, sigma, **kw: denoiser(x, sigma)
    return flow, denoiser


SCHEDULES = {  # flow: shift-3 times from 1 (the first-sigma rules apply), and the high half of a split schedule
    "flow-shift-3": _shift(torch.linspace(1, 0, 8, dtype=torch.float64)).float(),
    "flow-split-high": _shift(torch.linspace(1, 0, 8, dtype=torch.float64)).float()[2:6],
}
CONFIGS = {
    "eta1": dict(eta=1.0),
    "eta0.6-r0.3": dict(eta=0.6, s_noise=0.9, r=0.3),
    "eta0": dict(eta=0.0, r=0.7),
}
SAMPLINGS = {"eps": EPS, "v": V_PREDICTION, "flow": _Const, "flow-noise_scale": lambda: _Const(0.5)}


@pytest.mark.filterwarnings("ignore:Should have t:UserWarning")  # torchsde: float32 times outside by a rounding
@pytest.mark.parametrize("schedule", ["ve-karras", "split-high"])
@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("sampler", ["dpmpp_sde", "dpmpp_2s_ancestral"])
def test_node_off_equals_comfyui(node, sampler, config, sampling, schedule):
    # Variant off: ComfyUI's sampler of the name with its noise of the seed, for eps / v models (dpmpp_2s_ancestral:
    # k-diffusion's own code, which ComfyUI's VE form is) and flow models. Checked to fail with (failing cases of
    # 48): the node's own Philox noise (32: every case with eta > 0), k-diffusion's sigma_fn(t_fn(sigma)) as
    # dpmpp_sde's noise-sampler arguments (8), the flow path's alpha left out of dpmpp_sde's stage-1 noise (8), the
    # first flow sigma not moved (6), the noise_scale factor dropped (8), 2S_RF's rescale (1 - s) / (1 - sigma_down)
    # dropped (8).
    from tests.integrations.kdiffusion_upstream import load_sampling

    widgets = WIDGETS | {"sampler": sampler} | CONFIGS[config]
    model_sampling = SAMPLINGS[sampling]()
    flow = sampling.startswith("flow")
    if flow:
        model, denoiser = _flow_model(model_sampling)
        sigmas = SCHEDULES["flow-shift-3" if schedule == "ve-karras" else "flow-split-high"]
    else:
        model = denoiser = _ve_model(model_sampling)
        sigmas = load_sampling().get_sigmas_karras(7, 0.03, 14.6)
        sigmas = sigmas if schedule == "ve-karras" else sigmas[:4]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * (1 if flow else sigmas[0])
    eta, s_noise, r = widgets["eta"], widgets["s_noise"], widgets["r"]
    if sampler == "dpmpp_sde":
        tree = _ComfyBrownian(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=7, cpu=True)
        expected = _comfy_dpmpp_sde(denoiser, x, sigmas, flow, eta, s_noise, r, tree, model_sampling)
    elif flow:
        expected = _comfy_2s_rf(denoiser, x, sigmas, eta, s_noise, _comfy_default_noise(x, 7), model_sampling)
    else:
        expected = load_sampling().sample_dpmpp_2s_ancestral(
            denoiser, x, sigmas, disable=True, eta=eta, s_noise=s_noise, noise_sampler=_comfy_default_noise(x, 7)
        )
    assert_close(_run_node(node, model, x, sigmas, 7, **widgets), expected, kind="f32_loop_upstream")


@pytest.mark.parametrize("sampler", ["dpmpp_sde", "dpmpp_2s_ancestral"])
def test_node_with_a_gmm_keeps_the_philox_stream(node, sampler):
    # With a variant the node runs the k-diffusion sampler's loop on the Philox stream of ComfyUI's seed (eps
    # models: the same samples as the public function of that seed); on flow models the mixture changes the samples.
    from ddim_gmm_ext.k_diffusion import sample_dpmpp_2s_ancestral_gmm, sample_dpmpp_sde_gmm

    public = {"dpmpp_sde": sample_dpmpp_sde_gmm, "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral_gmm}[sampler]
    sigmas = torch.tensor([14.6, 3.0, 0.7, 0.1, 0.0])
    model = _ve_model(EPS())
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    ours = _run_node(node, model, x, sigmas, 2**64 - 1, sampler=sampler, variant="ortho-lr", r=0.4)
    extra = {"r": 0.4} if sampler == "dpmpp_sde" else {}
    expected = public(model, x, sigmas, gmm="ortho-lr", n_components=4, seed=2**64 - 1, disable=True, **extra)
    assert_close(ours, expected, kind="f32_loop_upstream")  # the last step: VE's Euler to 0 vs ComfyUI's x = D
    flow, _ = _flow_model(_Const())
    on = _run_node(node, flow, x / 14.6, SCHEDULES["flow-shift-3"], 5, sampler=sampler, variant="ortho")
    off = _run_node(node, flow, x / 14.6, SCHEDULES["flow-shift-3"], 5, sampler=sampler)
    assert torch.isfinite(on).all() and not is_close(on, off, "distinct")


def _flow_step_moments(sampler, denoiser, x0, sigmas, eta, s_noise, r, sampling):
    """Mean and per-coordinate variance of ComfyUI's flow step (the stand-ins above, float64): the output with zero
    noise, and the gain of each draw (the stand-in with that draw 1, the others 0)."""

    def run(hot):
        calls = []

        def noise(sigma, sigma_next):
            calls.append(None)
            return torch.full_like(x0, 1.0 if len(calls) - 1 == hot else 0.0)

        if sampler == "dpmpp_sde":
            return _comfy_dpmpp_sde(denoiser, x0, sigmas, True, eta, s_noise, r, noise, sampling), len(calls)
        return _comfy_2s_rf(denoiser, x0, sigmas, eta, s_noise, noise, sampling), len(calls)

    mean, n_calls = run(None)
    gains = [float((run(k)[0] - mean).flatten()[0]) for k in range(n_calls)]
    return mean, sum(g * g for g in gains)


@pytest.mark.parametrize("sampler", ["dpmpp_sde", "dpmpp_2s_ancestral"])
def test_flow_gmm_step_matches_comfyuis_step_moments(node, sampler):
    # One flow step (t 0.9 -> 0.5) of an affine denoiser (x0 = x / 2 + d per sigma), N copies of one x: mean and
    # per-coordinate variance of the node's sampler with a GMM equal ComfyUI's step's (its code with unit draws)
    # within Monte Carlo bounds, nothing clipping (checked); the mixture is active. Planted mutations (failing
    # cases of 2): dpmpp_sde's stage noise without the flow's alpha_m (1: dpmpp_sde), 2S_RF's renoise level without
    # s_noise (1: 2S), the noise_scale factor dropped (2).
    n, eta, s_noise, r = 20000, 0.7, 0.9, 0.4
    sampling = _Const(0.8)
    sigmas = torch.tensor([0.9, 0.5], dtype=torch.float64)
    gen = torch.Generator().manual_seed(8)
    x0 = torch.randn(1, 1, 4, 4, dtype=torch.float64, generator=gen)
    d = torch.randn(2, 1, 1, 4, 4, dtype=torch.float64, generator=gen)

    def denoiser(x, sigma, **kw):
        return 0.5 * x + d[int(float(sigma[0]) < 0.9 - 1e-9)]

    flow = _wrapper(sampling)
    flow.__class__.__call__ = lambda self, x, sigma, **kw: denoiser(x, sigma)
    mean, var = _flow_step_moments(sampler, denoiser, x0, sigmas, eta, s_noise, r, sampling)
    _, rows = _plan(sigmas, sigmas.tolist(), sampler, eta, s_noise * 0.8, r, "comfy", "flow")
    gmm = dg.GMM.create(16, n_components=4, n_steps=2, variant="ortho-lr", scale=0.3, seed=2, dtype=torch.float64)
    assert all(matched_steps(gmm, rows[:, 4], rows[:, 5]))
    fn = node.sample_sde_gmm_any
    options = dict(sampler=sampler, eta=eta, s_noise=s_noise, r=r, final_step="gmm", disable=True)
    got = fn(flow, x0.expand(n, 1, 4, 4), sigmas, {"seed": 4}, gmm=gmm, **options)
    off = fn(flow, x0.expand(n, 1, 4, 4), sigmas, {"seed": 4}, gmm=gmm, gmm_steps=[], **options)  # Gaussian
    flat = got.reshape(n, -1)
    assert_within(flat.mean(0), mean.reshape(-1), MC_SIGMAS * math.sqrt(var / n))
    assert_within(flat.var(0), torch.full((16,), var, dtype=torch.float64), MC_SIGMAS_WIDE * var * math.sqrt(2 / n))
    assert not is_close(got, off, "distinct")


@pytest.mark.filterwarnings("ignore:Should have t:UserWarning")
@pytest.mark.parametrize("sampler", ["dpmpp_sde", "dpmpp_2s_ancestral"])
def test_node_takes_a_flow_schedule_starting_above_1(node, sampler):
    # ModelSamplingSD3 at shift 0.01 (sigmas[0] 816 ulps above 1): dpmpp_sde moves it to percent 1e-4 as ComfyUI's;
    # 2S's intermediate sigma from it is 0.9999, as ComfyUI's at 1 (its lambda gives NaN above 1). Checked to fail
    # with the intermediate sigma of 2S_RF computed from lambda above 1 (NaN samples).
    from tests.integrations.test_comfy_flow import _comfy_sd3_schedule

    flow, _ = _flow_model(_Const())
    sigmas = _comfy_sd3_schedule(0.01, 6, False).double()
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(_run_node(node, flow, x, sigmas, 5, sampler=sampler, eta=0.5)).all()


@pytest.mark.parametrize("sampling", [_Const, EPS])
@pytest.mark.parametrize("sigmas", [[0.0], [1.0], [14.6]], ids=["last-step-low-half", "flow-high-half", "ve-high"])
@pytest.mark.parametrize("sampler", ["dpmpp_sde", "dpmpp_2s_ancestral"])
def test_node_returns_the_latent_for_a_single_sigma(node, sigmas, sampling, sampler):
    # ComfyUI's dpmpp_sde returns x for len(sigmas) <= 1, its 2S loops zero times (comfy.takes_no_step).
    # Checked to fail (12 of 12) without the takes_no_step test in sample_sde_gmm_any.
    model = _wrapper(sampling())
    model.__class__.__call__ = lambda self, x, sigma, **kw: pytest.fail("the model is called")
    x = torch.randn(SHAPE)
    assert _run_node(node, model, x, torch.tensor(sigmas), 3, sampler=sampler) is x


@pytest.mark.parametrize(
    ("widgets", "error", "match"),
    [
        (dict(sampler="dpmpp_2m"), ValueError, "sampler must be one of"),
        (dict(eta=math.nan), ValueError, "eta must be a finite number >= 0"),
        (dict(eta=-1.0), ValueError, "eta must be a finite number >= 0"),
        (dict(s_noise=math.nan), ValueError, "s_noise must be a finite number"),
        (dict(r=0.0), ValueError, "r must be a finite number > 0"),
        (dict(r=math.nan), ValueError, "r must be a finite number > 0"),
        (dict(r=True), TypeError, "r must be a number, got bool"),
        (dict(eta="1"), TypeError, "eta must be a number, got str"),
        (dict(variant="vub"), ValueError, "variant must be one of"),
        (dict(n_components=0), ValueError, "n_components must be an int >= 1"),
        (dict(scale=math.nan), ValueError, "scale must be a finite number"),
        (dict(gmm_steps="some"), ValueError, "gmm_steps must be one of"),
        (dict(eta=0.0, variant="ortho"), ValueError, "eta or s_noise is 0"),
        (dict(s_noise=0.0, variant="ortho", sampler="dpmpp_2s_ancestral"), ValueError, "eta or s_noise is 0"),
    ],
)
def test_node_refuses_bad_widget_values_naming_the_widget(node, widgets, error, match):
    # Checked to fail (14 of 14) with get_sampler passing the values unchecked.
    with pytest.raises(error, match=match):
        node.NODE_CLASS_MAPPINGS["SamplerDPMPPSDEGMM"]().get_sampler(**(WIDGETS | widgets))


def test_flow_eta_beyond_sigma_down_zero_is_refused(node):
    # 2S_RF's sigma_down = s (1 + (s / t - 1) eta) is below 0 for eta > t / (t - s): ComfyUI gives NaN there; the
    # node refuses naming eta before the model runs. Checked to fail without the check (the model ran).
    flow, _ = _flow_model(_Const())
    flow.__class__.__call__ = lambda self, x, sigma, **kw: pytest.fail("the model is called")
    with pytest.raises(ValueError, match="eta=5.0 takes sigma_down"):
        _run_node(
            node, flow, torch.zeros(SHAPE), torch.tensor([0.9, 0.5, 0.0]), 1, sampler="dpmpp_2s_ancestral", eta=5.0
        )
