"""ComfyUI's res_multistep / res_multistep_ancestral (sample_res_multistep_gmm, sample_res_multistep_ancestral_gmm)
and the few-step node (SamplerFewStepGMM: lcm, res_multistep, res_multistep_ancestral) inside a stand-in ComfyUI:
with the GMM off equal to ComfyUI's samplers (stand-ins written from their update rules) sample for sample, with
ComfyUI's default noise of the seed, for eps, v and flow models; with a GMM the Philox stream of the seed; the
res_multistep_ancestral-GMM moment oracle; the widget and argument checks."""

from __future__ import annotations

import importlib
import math
import sys
import types

import pytest
import torch

import ddim_gmm_ext as dg
from ddim_gmm_ext.gmm import matched_steps
from ddim_gmm_ext.k_diffusion import sample_lcm_gmm, sample_res_multistep_ancestral_gmm, sample_res_multistep_gmm
from tests.helpers import MC_SIGMAS, MC_SIGMAS_WIDE, assert_close, assert_within, is_close
from tests.integrations.test_comfy_flow import _comfy_default_noise_sampler, _wrapper
from tests.integrations.test_k_diffusion_lcm import (
    SHAPE,
    ConstSampling,
    EpsSampling,
    SharedNoise,
    comfy_lcm,
    flow_model,
    scale_for,
    ve_model,
)


def comfy_res_multistep(model, x, sigmas, eta, s_noise, noise_sampler):
    """ComfyUI's res_multistep (eta 0) / res_multistep_ancestral (cfg_pp off), from its update rule, in the sigmas'
    dtype: the ancestral step (sigma_down, sigma_up) of eta (eta 0: (s, 0)); the Euler step to sigma_down on the
    first step and where sigma_down is 0, else with lambda = -log sigma, h = lambda(sigma_down) - lambda(t),
    c2 = (lambda(previous sigma) - lambda(previous sigma_down)) / h, phi1 = expm1(-h) / (-h), phi2 = (phi1 - 1) /
    (-h): x = e^(-h) x + h ((phi1 - phi2 / c2) D + (phi2 / c2) D_prev), both weights through nan_to_num; then,
    for every next sigma > 0, the noise sampler's draw times s_noise sigma_up."""
    lam = lambda v: torch.as_tensor(v).log().neg()  # noqa: E731
    old_denoised = old_down = None
    for i in range(len(sigmas) - 1):
        t, s = sigmas[i], sigmas[i + 1]
        denoised = model(x, t * x.new_ones(x.shape[0]))
        if eta:
            up = min(s, eta * (s**2 * (t**2 - s**2) / t**2) ** 0.5)
            down = (s**2 - up**2) ** 0.5
        else:
            down, up = s, 0.0
        if down == 0 or old_denoised is None:
            x = x + (x - denoised) / t * (down - t)
        else:
            h = lam(down) - lam(t)
            c2 = (lam(sigmas[i - 1]) - lam(old_down)) / h
            phi1 = torch.expm1(-h) / -h
            phi2 = (phi1 - 1) / -h
            w1, w2 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0), torch.nan_to_num(phi2 / c2, nan=0.0)
            x = (-h).exp() * x + h * (w1 * denoised + w2 * old_denoised)
        if s > 0:
            x = x + noise_sampler(t, s) * s_noise * up
        old_denoised, old_down = denoised, down
    return x


SCHEDULES = {
    "karras-7": [14.6, 6.1, 2.4, 0.9, 0.3, 0.1, 0.03, 0.0],
    "partial": [14.6, 6.1, 2.4, 0.9, 0.3],  # ends above 0
    # ratios 0.68, 0.4, 0.875, 0.29, 0.9: at eta 1.5 the ancestral step clamps (sigma_down 0) on steps 0, 1 and 3,
    # so steps 2 and 4 follow a step whose sigma_down is 0 (lambda = inf there)
    "clamping": [14.6, 10.0, 4.0, 3.5, 1.0, 0.9, 0.0],
}
RES_CASES = {  # name -> (eta, s_noise); eta 0 is res_multistep
    "res_multistep": (0.0, 1.0),
    "ancestral": (1.0, 1.0),
    "ancestral-eta0.5-snoise0.8": (0.5, 0.8),
    "ancestral-eta1.5": (1.5, 1.2),
}


def _res(eta, s_noise, model, x, sigmas, **kwargs):
    if eta == 0:
        return sample_res_multistep_gmm(model, x, sigmas, s_noise=s_noise, disable=True, **kwargs)
    return sample_res_multistep_ancestral_gmm(model, x, sigmas, eta=eta, s_noise=s_noise, disable=True, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("case", RES_CASES)
def test_res_multistep_gmm_off_equals_comfyui(case, schedule, dtype):
    # Whole loops with the same noise sampler, called at the same sigmas (at eta 0 too). Checked to fail with
    # (failing cases of 24): b2 = phi2 c2 instead of phi2 / c2 (20; at eta 1.5 every karras step clamps to Euler),
    # c2 with lambda(t) in place of the previous step's lambda(sigma_down) (14: eta > 0), c = sigma_up without
    # s_noise (12), the Euler branch taken only where sigma_down is 0 (12), the noise sampler called only where
    # c != 0 (6: eta 0, the call records).
    eta, s_noise = RES_CASES[case]
    sigmas = torch.tensor(SCHEDULES[schedule], dtype=dtype)
    x = torch.randn(SHAPE, dtype=dtype, generator=torch.Generator().manual_seed(2)) * sigmas[0]
    upstream, ours = SharedNoise(dtype), SharedNoise(dtype)
    expected = comfy_res_multistep(ve_model, x, sigmas, eta, s_noise, upstream)
    got = _res(eta, s_noise, ve_model, x, sigmas, gmm=None, noise_sampler=ours)
    assert got.dtype == dtype
    assert_close(got, expected, kind="f64_loop_ve" if dtype == torch.float64 else "f32_loop_upstream")
    assert ours.calls == upstream.calls


def test_res_multistep_callback_and_seeded_noise():
    sigmas = torch.tensor(SCHEDULES["karras-7"], dtype=torch.float64)
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    seen = []
    a = sample_res_multistep_ancestral_gmm(
        ve_model, x, sigmas, extra_args={"seed": 9}, gmm=None, disable=True, callback=seen.append
    )
    assert [d["i"] for d in seen] == list(range(7)) and all(d["sigma"] == sigmas[d["i"]] for d in seen)
    assert_close(
        a, sample_res_multistep_ancestral_gmm(ve_model, x, sigmas, seed=9, gmm=None, disable=True), kind="exact"
    )
    alone = sample_res_multistep_ancestral_gmm(ve_model, x[1:], sigmas, seed=9, gmm=None, disable=True, sample_offset=1)
    assert_close(alone, a[1:], kind="f64_loop_ve")


# ---- the mixture's moments ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["ortho-lr", "rand"])
def test_res_multistep_ancestral_gmm_steps_match_the_moments(variant):
    # Two steps (the first-order Euler step, then the multistep one with the history) of a denoiser that ignores x
    # (outputs d0, d1), from one x_T repeated N times: the sample mean after each step equals the stand-in's run with
    # zero noise, the per-coordinate variance c0^2, then (sigma_down1 / sigma1)^2 c0^2 + c1^2 with c = s_noise
    # sigma_up, within Monte Carlo bounds, at a GMM scale where no step clips (0.9 of the limit); the mixture acts.
    # Planted mutations, each checked to fail (2 of 2): the rows' g = 1 + s^2 (the kernel clips: variance too
    # large), c = sigma_up without s_noise (the variance of the level without s_noise).
    n, eta, s_noise, sigmas = 20000, 0.8, 0.9, (10.0, 3.0, 1.0)
    gen = torch.Generator().manual_seed(3)
    x0, d0, d1 = (torch.randn(1, 1, 4, 4, dtype=torch.float64, generator=gen) * 2 for _ in range(3))
    outs = {10.0: d0, 3.0: d1}

    def model(x, sigma):
        return outs[round(float(sigma[0]), 6)].expand_as(x)

    steps = []
    for t, s in zip(sigmas, sigmas[1:], strict=False):
        up = min(s, eta * s * math.sqrt(t * t - s * s) / t)
        steps.append((math.sqrt(s * s - up * up) / t, s_noise * up, math.sqrt(1 + s * s)))  # (x coef, c, g)
    cs, gs = [c for _, c, _ in steps], [g for _, _, g in steps]
    gmm = dg.GMM.create(
        16, n_components=4, n_steps=2, variant=variant, scale=scale_for(variant, cs, gs, 0.9), seed=2,
        dtype=torch.float64,
    )  # fmt: skip
    assert matched_steps(gmm, cs, gs) == [True, True]
    zero = lambda t, s: torch.zeros(1, 1, 4, 4, dtype=torch.float64)  # noqa: E731
    sig = torch.tensor(sigmas, dtype=torch.float64)
    means = [comfy_res_multistep(model, x0, sig[: k + 2], eta, s_noise, zero) for k in range(2)]
    variances = [cs[0] ** 2, steps[1][0] ** 2 * cs[0] ** 2 + cs[1] ** 2]
    runs = {}
    for name, mixture in (("gmm", gmm), ("off", None)):
        seen = []
        last = sample_res_multistep_ancestral_gmm(
            model, x0.expand(n, 1, 4, 4), sig, eta=eta, s_noise=s_noise, gmm=mixture, final_step="gmm", seed=21,
            disable=True, callback=seen.append,
        )  # fmt: skip
        runs[name] = [seen[1]["x"], last]
    for got, mean, var in zip(runs["gmm"], means, variances, strict=True):
        flat = got.reshape(n, -1)
        assert_within(flat.mean(0), mean.reshape(-1), MC_SIGMAS * math.sqrt(var / n))
        assert_within(flat.var(0), torch.full((16,), var, dtype=torch.float64), MC_SIGMAS_WIDE * var * math.sqrt(2 / n))
    assert not is_close(runs["gmm"][0], runs["off"][0], "distinct")


# ---- the node inside a stand-in ComfyUI --------------------------------------------------------------------


class VPredictionSampling(EpsSampling):
    """ComfyUI's V_PREDICTION model sampling: EPS's noise_scaling."""


class ImgToImgFlowSampling(ConstSampling):
    """ComfyUI's IMG_TO_IMG_FLOW model sampling (a CONST subclass), from its behaviour: noise_scaling returns the
    latent, so its lcm adds no noise."""

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return latent_image


@pytest.fixture
def comfy_node(monkeypatch):
    """The node module as ComfyUI loads it (test_comfy_flow's stand-in): comfy.samplers.KSAMPLER records (sampler
    function, extra_options) and comfy.k_diffusion.sampling has ComfyUI's default noise sampler."""
    import ddim_gmm_ext.comfy as node

    comfy = types.ModuleType("comfy")
    comfy.samplers = types.ModuleType("comfy.samplers")
    comfy.samplers.KSAMPLER = lambda fn, extra_options: (fn, extra_options)
    comfy.k_diffusion = types.ModuleType("comfy.k_diffusion")
    comfy.k_diffusion.sampling = types.ModuleType("comfy.k_diffusion.sampling")
    comfy.k_diffusion.sampling.default_noise_sampler = _comfy_default_noise_sampler
    for module in (comfy, comfy.samplers, comfy.k_diffusion, comfy.k_diffusion.sampling):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    importlib.reload(node)
    yield node
    monkeypatch.undo()
    importlib.reload(node)


WIDGETS = dict(sampler="lcm", eta=1.0, s_noise=1.0, variant="off", n_components=4, scale=1.0)


def _run_node(node, model, x, sigmas, seed, **widgets):
    """The node's SAMPLER as ComfyUI's KSAMPLER.sample runs it (seed in extra_args)."""
    ((fn, options),) = node.NODE_CLASS_MAPPINGS["SamplerFewStepGMM"]().get_sampler(**(WIDGETS | widgets))
    return fn(model, x, sigmas, extra_args={"seed": seed}, callback=None, disable=True, **options)


def _comfy_model(sampling, denoiser):
    wrapper = _wrapper(sampling)
    wrapper.__class__.__call__ = lambda self, x, sigma, **kw: denoiser(x, sigma)
    return wrapper


FLOW_SIGMAS = [1.0, 0.955, 0.9, 0.818, 0.692, 0.5, 0.25, 0.0]
MODELS = {  # name -> (model sampling, denoiser, sigmas)
    "eps": (EpsSampling, ve_model, SCHEDULES["karras-7"]),
    "v": (VPredictionSampling, ve_model, SCHEDULES["partial"]),
    "flow": (ConstSampling, flow_model, FLOW_SIGMAS),
    "flow-noise-scale-0.5": (lambda: ConstSampling(0.5), flow_model, FLOW_SIGMAS[2:]),
    "img-to-img-flow": (ImgToImgFlowSampling, flow_model, FLOW_SIGMAS[1:]),
}
NODE_CASES = {  # name -> (widgets, stand-in run(model, x, sigmas, sampling, noise))
    "lcm": (dict(sampler="lcm"), lambda m, x, s, sampling, noise: comfy_lcm(m, x, s, sampling, noise)),
    "res_multistep": (
        dict(sampler="res_multistep", s_noise=0.7),
        lambda m, x, s, sampling, noise: comfy_res_multistep(m, x, s, 0.0, 0.7, noise),
    ),
    "res_multistep_ancestral": (
        dict(sampler="res_multistep_ancestral", eta=0.6, s_noise=0.9),
        lambda m, x, s, sampling, noise: comfy_res_multistep(m, x, s, 0.6, 0.9, noise),
    ),
}


@pytest.mark.parametrize("model_type", MODELS)
@pytest.mark.parametrize("case", NODE_CASES)
def test_node_off_equals_comfyui_sample_for_sample(comfy_node, case, model_type):
    # ComfyUI passes its samplers no noise sampler: they draw default_noise_sampler(x, extra_args["seed"]). With
    # the variant off the node uses that one, so a seed gives ComfyUI's samples, for eps, v and flow models (lcm
    # re-noises with the model sampling's noise_scaling; res_multistep runs its VE arithmetic on flow sigmas).
    # Checked to fail with (failing cases of 15): the node's own Philox noise (no ComfyUI noise sampler: 9, all
    # but res_multistep and lcm on the image-to-image flow), lcm_renoise ignoring the model sampling (the VE form:
    # 3, the flow models; the flow form: 2, noise_scale and the image-to-image flow), res_multistep run with the
    # eta widget (5).
    widgets, upstream = NODE_CASES[case]
    make_sampling, denoiser, sigmas = MODELS[model_type]
    sampling = make_sampling()
    sigmas = torch.tensor(sigmas, dtype=torch.float64)
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * sigmas[0]
    expected = upstream(denoiser, x, sigmas, sampling, _comfy_default_noise_sampler(x, seed=2**40))
    got = _run_node(comfy_node, _comfy_model(sampling, denoiser), x, sigmas, 2**40, **widgets)
    assert_close(got, expected, kind="f64_loop_ve")


def test_node_with_a_gmm_keeps_the_philox_stream(comfy_node):
    # With a GMM on, the noise and the components come from the Philox stream of the seed (not ComfyUI's
    # generator): the node's run equals the public sampler's with that seed (lcm on a flow model: the flow path).
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    flow_sigmas = torch.tensor(FLOW_SIGMAS)
    ours = _run_node(comfy_node, _comfy_model(ConstSampling(), flow_model), x, flow_sigmas, 2**64 - 1, variant="ortho")
    expected = sample_lcm_gmm(
        flow_model, x, flow_sigmas, path="flow", gmm="ortho", n_components=4, seed=2**64 - 1, disable=True
    )
    assert_close(ours, expected, kind="exact")
    sigmas = torch.tensor(SCHEDULES["karras-7"])
    widgets = dict(sampler="res_multistep_ancestral", eta=0.7, variant="ortho-lr")
    ours = _run_node(comfy_node, _comfy_model(EpsSampling(), ve_model), x * 14.6, sigmas, 5, **widgets)
    expected = sample_res_multistep_ancestral_gmm(
        ve_model, x * 14.6, sigmas, eta=0.7, gmm="ortho-lr", n_components=4, seed=5, disable=True
    )
    assert_close(ours, expected, kind="exact")
    off = _run_node(
        comfy_node, _comfy_model(EpsSampling(), ve_model), x * 14.6, sigmas, 5, **(widgets | {"variant": "off"})
    )
    assert torch.isfinite(ours).all() and not is_close(ours, off, "distinct")


@pytest.mark.parametrize(
    ("widgets", "error", "match"),
    [
        (dict(sampler="euler"), ValueError, "sampler must be one of"),
        (dict(eta=math.nan), ValueError, "eta must be a finite number >= 0"),
        (dict(eta=-1.0), ValueError, "eta must be a finite number >= 0"),
        (dict(s_noise=math.nan), ValueError, "s_noise must be a finite number"),
        (dict(variant="vub"), ValueError, "variant must be one of"),
        (dict(n_components=0), ValueError, "n_components must be an int >= 1"),
        (dict(scale=math.nan), ValueError, "scale must be a finite number"),
        (dict(gmm_steps="some"), ValueError, "gmm_steps must be one of"),
        (dict(sampler="res_multistep", variant="ortho"), ValueError, "no noise to replace: sampler 'res_multistep'"),
        (dict(sampler="res_multistep_ancestral", eta=0.0, variant="ortho"), ValueError, "no noise to replace"),
        (dict(sampler="res_multistep_ancestral", s_noise=0.0, variant="rand"), ValueError, "no noise to replace"),
        (dict(eta=True), TypeError, "eta must be a number, got bool"),
        (dict(s_noise="1"), TypeError, "s_noise must be a number, got str"),
        (dict(scale=False), TypeError, "scale must be a number, got bool"),
    ],
)
def test_node_refuses_bad_widget_values_naming_the_widget(comfy_node, widgets, error, match):
    # Checked to fail (14 of 14) with get_sampler passing the values unchecked.
    with pytest.raises(error, match=match):
        comfy_node.NODE_CLASS_MAPPINGS["SamplerFewStepGMM"]().get_sampler(**(WIDGETS | widgets))


def test_node_takes_lcm_with_a_gmm_and_unused_widgets():
    # lcm always adds noise: every variant is taken; eta and s_noise are checked and unused there, as
    # n_components and scale are with the variant off.
    from ddim_gmm_ext.integrations.comfy import fewstep_node_options

    options = fewstep_node_options("lcm", 0.0, 0.0, "ortho-lr", 4, 1.0)
    assert options["gmm"] == "ortho-lr" and options["sampler"] == "lcm"
    assert fewstep_node_options("res_multistep", 1.0, 1.0, "off", 4, 1.0)["gmm"] is None


@pytest.mark.parametrize("sampling", [ConstSampling, EpsSampling])
@pytest.mark.parametrize("sigmas", [[0.0], [1.0], [14.6]], ids=["last-step-low-half", "flow-high-half", "ve-high"])
@pytest.mark.parametrize("sampler", ["lcm", "res_multistep", "res_multistep_ancestral"])
def test_node_returns_the_latent_for_a_single_sigma(comfy_node, sigmas, sampling, sampler):
    # ComfyUI's samplers loop zero times on a schedule of one sigma. Checked to fail (18 of 18) without the
    # takes_no_step test in sample_fewstep_gmm_any.
    model = _wrapper(sampling())
    model.__class__.__call__ = lambda self, x, sigma, **kw: pytest.fail("the model is called")
    x = torch.randn(SHAPE)
    assert _run_node(comfy_node, model, x, torch.tensor(sigmas), 3, sampler=sampler) is x


def test_node_runs_lcm_on_a_flow_schedule_starting_above_1(comfy_node):
    # ComfyUI's float32 ModelSamplingSD3 at small shifts starts 816 ulps above 1 (test_comfy_flow); its lcm calls
    # the model there and re-noises to the next sigma. The public sample_lcm_gmm refuses such a start.
    from tests.integrations.test_comfy_flow import _comfy_sd3_schedule

    sigmas = _comfy_sd3_schedule(0.01, 6, False).double()
    sampling = ConstSampling()
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    expected = comfy_lcm(flow_model, x, sigmas, sampling, _comfy_default_noise_sampler(x, seed=9))
    assert_close(_run_node(comfy_node, _comfy_model(sampling, flow_model), x, sigmas, 9), expected, kind="f64_loop")


# ---- bad input of the public samplers -------------------------------------------------------------------------


def _never_called(x, sigma, **kwargs):
    raise AssertionError("the model was called before the arguments were checked")


@pytest.mark.parametrize(
    ("fn", "kwargs", "error", "match"),
    [
        ("res", dict(gmm="ortho"), ValueError, "has no noise to replace: res_multistep is deterministic"),
        ("anc", dict(eta=0.0), ValueError, "no noise to replace: eta=0.0, s_noise=1.0 give noise std 0"),
        ("anc", dict(s_noise=0.0), ValueError, "no noise to replace"),
        ("anc", dict(eta=-0.5), ValueError, "eta must be a finite number >= 0"),
        ("anc", dict(eta=math.inf), ValueError, "eta must be a finite number >= 0"),
        ("res", dict(s_noise=math.nan), ValueError, "s_noise must be a finite number"),
        ("anc", dict(sigmas=torch.tensor([2.0, 1.0, 1.0, 0.0])), ValueError, r"strictly decrease.*sigmas\[1\]"),
        ("res", dict(sigmas=torch.tensor([1.0, 2.0, 0.0])), ValueError, r"must not increase"),
        ("res", dict(sigmas=torch.tensor([2.0])), ValueError, "at least 2 entries"),
        ("anc", dict(noise_sampler=3), TypeError, "noise_sampler must be callable"),
        ("res", dict(model=3), TypeError, "model must be callable"),
        ("anc", dict(callback="x"), TypeError, "callback must be callable or None"),
        ("anc", dict(gmm="vub"), ValueError, "GMM variant"),
        ("anc", dict(gmm_steps=[5]), ValueError, "gmm_steps"),
        ("anc", dict(sample_offset=-1), ValueError, "sample_offset must be in"),
        ("res", dict(x=torch.zeros(SHAPE, dtype=torch.int64)), TypeError, "x must have a floating dtype"),
    ],
)
def test_res_multistep_bad_input_is_refused_before_any_work(fn, kwargs, error, match):
    # Each argument checked with a message naming it, before the model is called (the model raises), as the DPM++
    # twins refuse it; a GMM on the deterministic configurations says there is no noise to replace. Checked to
    # fail (3 of 3 GMM cases) without the refusal in _sample_res_multistep (the runs went on).
    fns = {"res": sample_res_multistep_gmm, "anc": sample_res_multistep_ancestral_gmm}
    args = dict(model=_never_called, sigmas=torch.tensor([2.0, 1.0, 0.0]), x=torch.zeros(SHAPE)) | kwargs
    with pytest.raises(error, match=match):
        fns[fn](disable=True, **args)
