"""The DPM++ node (SamplerDPMPPGMM) inside a stand-in ComfyUI: with the variant off it equals ComfyUI's own
dpmpp_2m / dpmpp_2m_sde (midpoint, heun) / dpmpp_3m_sde sample for sample, with ComfyUI's Brownian-tree noise of
the seed, for eps and v models (k-diffusion's VE formulas, k-diffusion's samplers as the oracle) and flow models
(ComfyUI's CONST handling, written here from its update rules); with a GMM the Philox stream of the seed; the
widget checks."""

from __future__ import annotations

import importlib
import math
import sys
import types

import pytest
import torch

from ddim_gmm_ext.k_diffusion import sample_dpmpp_2m_sde_gmm
from tests.helpers import assert_close, is_close
from tests.integrations.test_comfy_flow import CONST, EPS, _flow_denoiser, _shift, _wrapper

SHAPE = (2, 2, 4, 4)


class V_PREDICTION:  # noqa: N801  (the name ComfyUI's v-prediction model sampling class has)
    pass


class _Const(CONST):
    """A flow model sampling (SD3 shift 3): percent_to_sigma as ComfyUI's ModelSamplingDiscreteFlow."""

    def __init__(self, noise_scale=None):
        if noise_scale is not None:
            self.noise_scale = noise_scale

    def percent_to_sigma(self, percent):
        return float(_shift(torch.tensor(1.0 - percent, dtype=torch.float64)))


class _ComfyBrownian:
    """ComfyUI's BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed, cpu=True), from its behaviour: one
    torchsde.BrownianTree on the CPU over the sorted interval with entropy ``seed`` (no + 1), queried at the
    float32 times, the increment over sqrt(|sigma_next - sigma|), in the query's dtype."""

    def __init__(self, x, sigma_min, sigma_max, seed=None, transform=None, cpu=False):
        import torchsde

        assert cpu and seed is not None
        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        self.tree = torchsde.BrownianTree(t0.cpu(), torch.zeros_like(x).cpu(), t1.cpu(), entropy=seed)

    def __call__(self, sigma, sigma_next):
        a, b = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        lo, hi, sign = (a, b, 1) if a < b else (b, a, -1)
        w = self.tree(lo.cpu().float(), hi.cpu().float()).to(a.dtype) * sign
        return w / (b - a).abs().sqrt()


@pytest.fixture
def comfy_node(monkeypatch):
    import ddim_gmm_ext.comfy as node

    comfy = types.ModuleType("comfy")
    comfy.samplers = types.ModuleType("comfy.samplers")
    comfy.samplers.KSAMPLER = lambda fn, extra_options: (fn, extra_options)
    comfy.k_diffusion = types.ModuleType("comfy.k_diffusion")
    comfy.k_diffusion.sampling = types.ModuleType("comfy.k_diffusion.sampling")
    comfy.k_diffusion.sampling.BrownianTreeNoiseSampler = _ComfyBrownian
    for module in (comfy, comfy.samplers, comfy.k_diffusion, comfy.k_diffusion.sampling):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    importlib.reload(node)
    yield node
    monkeypatch.undo()
    importlib.reload(node)


WIDGETS = dict(sampler="dpmpp_2m_sde", solver_type="midpoint", eta=1.0, s_noise=1.0, variant="off", n_components=4,
               scale=1.0)  # fmt: skip


def _run_node(node, model, x, sigmas, seed, **widgets):
    """The node's SAMPLER as ComfyUI's KSAMPLER.sample runs it (seed in extra_args)."""
    ((fn, options),) = node.NODE_CLASS_MAPPINGS["SamplerDPMPPGMM"]().get_sampler(**(WIDGETS | widgets))
    return fn(model, x, sigmas, extra_args={"seed": seed}, callback=None, disable=True, **options)


def _ve_model(sampling):
    wrapper = _wrapper(sampling)
    wrapper.__class__.__call__ = lambda self, x, sigma, **kw: torch.tanh(x / (1 + sigma[:, None, None, None] ** 2))
    return wrapper


NODE_CASES = {  # widgets -> (upstream sampler name, its keyword arguments)
    "2m": (dict(sampler="dpmpp_2m"), "sample_dpmpp_2m", {}),
    "2m_sde": (dict(eta=0.8, s_noise=0.9), "sample_dpmpp_2m_sde", dict(eta=0.8, s_noise=0.9)),
    "2m_sde_heun": (dict(solver_type="heun"), "sample_dpmpp_2m_sde", dict(solver_type="heun")),
    "3m_sde": (dict(sampler="dpmpp_3m_sde", eta=0.6), "sample_dpmpp_3m_sde", dict(eta=0.6)),
}


@pytest.mark.filterwarnings("ignore:Should have t:UserWarning")  # torchsde: float32 times outside by a rounding
@pytest.mark.parametrize("sampling", [EPS, V_PREDICTION])
@pytest.mark.parametrize("case", NODE_CASES)
def test_node_off_equals_comfyui_on_eps_and_v_models(comfy_node, case, sampling):
    # eps / v models: ComfyUI's DPM++ samplers are k-diffusion's VE formulas with its Brownian tree of the seed.
    # Checked to fail with the node's own Philox noise (no ComfyUI noise sampler: the 6 SDE cases).
    from tests.integrations.kdiffusion_upstream import load_sampling

    widgets, upstream, kwargs = NODE_CASES[case]
    K = load_sampling()
    sigmas = K.get_sigmas_karras(7, 0.03, 14.6)
    model = _ve_model(sampling())
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    noise = {} if case == "2m" else {"noise_sampler": _ComfyBrownian(x, sigmas[-2], sigmas[0], seed=42, cpu=True)}
    expected = getattr(K, upstream)(model, x, sigmas, disable=True, **kwargs, **noise)
    assert_close(_run_node(comfy_node, model, x, sigmas, 42, **widgets), expected, kind="f32_loop_upstream")


def _comfy_flow_sde(model, x, sigmas, sampling, eta, s_noise, noise_sampler, solver_type="midpoint", three=False):
    """ComfyUI's dpmpp_2m_sde / dpmpp_3m_sde on a CONST model, from its update rules: a first sigma >= 1 moved to
    percent_to_sigma(1e-4), lambda = log((1 - sigma) / sigma), alpha_s = 1 - s, s_noise times noise_scale."""
    if sigmas[0] >= 1:
        sigmas = sigmas.clone()
        sigmas[0] = sampling.percent_to_sigma(1e-4)
    s_noise = s_noise * getattr(sampling, "noise_scale", 1.0)
    lam = lambda v: ((1 - v) / v).log()  # noqa: E731
    d1 = d2 = h = h1 = h2 = None
    for i in range(len(sigmas) - 1):
        t, s = sigmas[i], sigmas[i + 1]
        den = model(x, t * x.new_ones(x.shape[0]))
        if s == 0:
            x = den
        else:
            h = lam(s) - lam(t)
            hh, alpha = h * (eta + 1), 1 - s
            x = s / t * (-h * eta).exp() * x + alpha * (-hh).expm1().neg() * den
            phi2 = (-hh).expm1() / hh + 1
            if three and h2 is not None:
                r0, r1 = h1 / h, h2 / h
                d10, d11 = (den - d1) / r0, (d1 - d2) / r1
                x = (
                    x
                    + alpha * phi2 * (d10 + (d10 - d11) * r0 / (r0 + r1))
                    - alpha * (phi2 / hh - 0.5) * ((d10 - d11) / (r0 + r1))
                )
            elif h1 is not None:
                first = alpha * phi2 if three or solver_type == "heun" else 0.5 * alpha * (-hh).expm1().neg()
                x = x + first * (den - d1) / (h1 / h)
            if eta > 0 and s_noise > 0:
                x = x + noise_sampler(t, s) * s * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        d1, d2, h1, h2 = den, d1, h, h1
    return x


FLOW_SCHEDULES = {
    "shift-3": _shift(torch.linspace(1, 0, 8, dtype=torch.float64)).float(),  # starts at 1: the offset applies
    "split-high": _shift(torch.linspace(1, 0, 8, dtype=torch.float64)).float()[2:6],  # below 1, ends above 0
}


@pytest.mark.filterwarnings("ignore:Should have t:UserWarning")
@pytest.mark.parametrize("schedule", FLOW_SCHEDULES)
@pytest.mark.parametrize("noise_scale", [None, 0.5])
@pytest.mark.parametrize("case", NODE_CASES)
def test_node_off_equals_comfyui_on_flow_models(comfy_node, case, noise_scale, schedule):
    # Flow models (CONST). Checked to fail with the VE path for the SDE samplers (lambda = -log sigma, alpha 1:
    # 12 of 16), without the first-sigma offset (6: the schedule starting at 1) and without the noise_scale
    # factor (6).
    from tests.integrations.kdiffusion_upstream import load_sampling

    widgets, upstream, kwargs = NODE_CASES[case]
    sampling, denoiser = _Const(noise_scale), _flow_denoiser()
    flow = _wrapper(sampling)
    flow.__class__.__call__ = lambda self, x, sigma, **kw: denoiser(x, sigma)
    sigmas = FLOW_SCHEDULES[schedule]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    if case == "2m":  # ComfyUI's dpmpp_2m runs k-diffusion's VE formulas on flow sigmas too
        expected = load_sampling().sample_dpmpp_2m(denoiser, x, sigmas, disable=True)
    else:
        noise = _ComfyBrownian(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=7, cpu=True)
        expected = _comfy_flow_sde(
            denoiser, x, sigmas, sampling, kwargs.get("eta", 1.0), kwargs.get("s_noise", 1.0), noise,
            kwargs.get("solver_type", "midpoint"), three=case == "3m_sde",
        )  # fmt: skip
    assert_close(_run_node(comfy_node, flow, x, sigmas, 7, **widgets), expected, kind="f32_loop_upstream")


def test_node_with_a_gmm_keeps_the_philox_stream(comfy_node):
    sigmas = torch.tensor([14.6, 3.0, 0.7, 0.1, 0.0])
    model = _ve_model(EPS())
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    ours = _run_node(comfy_node, model, x, sigmas, 2**64 - 1, variant="ortho-lr", solver_type="heun")
    expected = sample_dpmpp_2m_sde_gmm(
        model, x, sigmas, gmm="ortho-lr", n_components=4, solver_type="heun", seed=2**64 - 1, disable=True
    )
    assert_close(ours, expected, kind="exact")
    flow, denoiser = _wrapper(_Const()), _flow_denoiser()
    flow.__class__.__call__ = lambda self, x, sigma, **kw: denoiser(x, sigma)
    on = _run_node(comfy_node, flow, x / 14.6, FLOW_SCHEDULES["shift-3"], 5, sampler="dpmpp_3m_sde", variant="ortho")
    off = _run_node(comfy_node, flow, x / 14.6, FLOW_SCHEDULES["shift-3"], 5, sampler="dpmpp_3m_sde")
    assert torch.isfinite(on).all() and not is_close(on, off, "distinct")


@pytest.mark.parametrize(
    ("widgets", "match"),
    [
        (dict(eta=math.nan), "eta must be a finite number >= 0"),
        (dict(eta=-1.0), "eta must be a finite number >= 0"),
        (dict(s_noise=math.nan), "s_noise must be a finite number"),
        (dict(solver_type="euler"), "solver_type must be one of"),
        (dict(sampler="dpmpp_sde"), "sampler must be one of"),
        (dict(variant="vub"), "variant must be one of"),
        (dict(n_components=0), "n_components must be an int >= 1"),
        (dict(scale=math.nan), "scale must be a finite number"),
        (dict(gmm_steps="some"), "gmm_steps must be one of"),
        (dict(sampler="dpmpp_2m", variant="ortho"), "sampler 'dpmpp_2m' is deterministic"),
        (dict(eta=0.0, variant="ortho"), "eta or s_noise is 0"),
    ],
)
def test_node_refuses_bad_widget_values_naming_the_widget(comfy_node, widgets, match):
    # Checked to fail (11 of 11) with get_sampler passing the values unchecked.
    with pytest.raises(ValueError, match=match):
        comfy_node.NODE_CLASS_MAPPINGS["SamplerDPMPPGMM"]().get_sampler(**(WIDGETS | widgets))


@pytest.mark.parametrize("sampling", [_Const, EPS])
@pytest.mark.parametrize("sigmas", [[0.0], [1.0], [14.6]], ids=["last-step-low-half", "flow-high-half", "ve-high"])
@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_2m"])
def test_node_returns_the_latent_for_a_single_sigma(comfy_node, sigmas, sampling, sampler):
    # The DDIM-GMM node's rule (comfy.takes_no_step): ComfyUI's dpmpp_2m_sde / 3m_sde return x for
    # len(sigmas) <= 1, its dpmpp_2m loops zero times. The node raised (for [0.] torch's "min(): Expected
    # reduction dim" from the noise sampler's sigma_min). Checked to fail (18 of 18) without the takes_no_step
    # test in sample_dpmpp_gmm_any.
    model = _wrapper(sampling())
    model.__class__.__call__ = lambda self, x, sigma, **kw: pytest.fail("the model is called")
    x = torch.randn(SHAPE)
    assert _run_node(comfy_node, model, x, torch.tensor(sigmas), 3, sampler=sampler) is x


@pytest.mark.filterwarnings("ignore:Should have t:UserWarning")
@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "dpmpp_2m"])
def test_node_takes_a_flow_schedule_starting_above_1(comfy_node, sampler):
    # The same schedules as the DDIM-GMM node's test (ModelSamplingSD3 at shift 0.01: sigmas[0] 816 ulps above
    # 1): the SDE samplers move it to percent 1e-4 as ComfyUI's, dpmpp_2m runs its VE formulas on it as ComfyUI's.
    from tests.integrations.test_comfy_flow import _comfy_sd3_schedule

    flow, denoiser = _wrapper(_Const()), _flow_denoiser()
    flow.__class__.__call__ = lambda self, x, sigma, **kw: denoiser(x, sigma)
    sigmas = _comfy_sd3_schedule(0.01, 6, False).double()
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(_run_node(comfy_node, flow, x, sigmas, 5, sampler=sampler)).all()


@pytest.mark.parametrize("node", ["SamplerDDIMGMM", "SamplerDPMPPGMM"])
@pytest.mark.parametrize(("widget", "value"), [("eta", True), ("s_noise", True), ("scale", False), ("eta", "0.5")])
def test_both_nodes_refuse_a_float_widget_that_is_not_a_number(comfy_node, node, widget, value):
    # eta=True passed the DDIM-GMM node as 1.0 (the DPM++ node: ValueError); a bool s_noise / scale and a string
    # eta gave ValueErrors. One rule for both nodes: TypeError naming the widget. Checked to fail (8 of 8)
    # without the check_number_widgets calls.
    widgets = dict(eta=0.5, s_noise=1.0, variant="ortho", n_components=4, scale=1.0) | {widget: value}
    if node == "SamplerDPMPPGMM":
        widgets |= dict(sampler="dpmpp_2m_sde", solver_type="midpoint")
    with pytest.raises(TypeError, match=f"{widget} must be a number, got {type(value).__name__}"):
        comfy_node.NODE_CLASS_MAPPINGS[node]().get_sampler(**widgets)
