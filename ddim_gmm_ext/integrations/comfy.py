"""ComfyUI sampler node for DDIM-GMM.

Inside ComfyUI (``comfy.samplers`` importable), importing this module defines the nodes ``SamplerDDIMGMM`` and
``SamplerDPMPPGMM`` (category sampling/custom_sampling/samplers): each outputs a SAMPLER for ``SamplerCustom`` /
``SamplerCustomAdvanced``; the first runs :func:`ddim_gmm_ext.k_diffusion.sample_ddim_gmm`, the second DPM++ 2M,
2M SDE (midpoint / heun) or 3M SDE (:func:`sample_dpmpp_gmm_any`), equal to ComfyUI's ``dpmpp_2m`` /
``dpmpp_2m_sde`` / ``dpmpp_3m_sde`` with the variant "off" (its Brownian-tree noise of the seed) for eps, v and
flow models; ``SamplerDPMPPSDEGMM`` runs ComfyUI's ``dpmpp_sde`` / ``dpmpp_2s_ancestral`` (:func:`sample_sde_gmm_any`,
a node of its own: their widgets differ, r and no solver_type), and ``SamplerFewStepGMM`` runs ComfyUI's ``lcm``,
``res_multistep`` and ``res_multistep_ancestral`` (:func:`sample_fewstep_gmm_any`), each equal to ComfyUI's samplers
with the variant "off". Anywhere else the
mappings below stay empty and nothing is imported. To install, put a folder in ``ComfyUI/custom_nodes/`` whose
``__init__.py`` is

    from ddim_gmm_ext.comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

The node reads the model's sampling type (``model_sampling`` on the wrapped model): eps- and v-prediction
models (ComfyUI's EPS / V_PREDICTION: sigmas on the VE path x = x0 + sigma eps) run
:func:`ddim_gmm_ext.k_diffusion.sample_ddim_gmm`; flow models (CONST: SD3, Flux, sigmas are flow times) run
:func:`ddim_gmm_ext.k_diffusion.sample_rfim_gmm` with ComfyUI's euler_ancestral_RF noise (and its
``noise_scale`` of the model sampling). With the variant "off" the noise is ComfyUI's own default noise sampler
(``comfy.k_diffusion.sampling.default_noise_sampler`` of ``extra_args["seed"]``, what its euler_ancestral /
euler_ancestral_RF draw), so the samples equal ComfyUI's Euler (eta 0), Euler ancestral and euler_ancestral_RF
sample for sample; with a GMM on, noise and components come from the Philox stream of ComfyUI's seed (up to
2**64 - 1).

Both nodes take ComfyUI's sigmas as its samplers do (:func:`takes_no_step`): one sigma returns the latent
unchanged, a flow schedule whose first sigma is above 1 (float32 rounding at small shifts) runs.

The widget values are checked when the node runs, naming the widget (ComfyUI's min / max validation lets NaN
through). ``n_components`` and ``scale`` only apply with a GMM; with "off" they are checked and unused, as the
diffusers schedulers treat ``gmm_scale`` with ``gmm_variant=None`` (a widget cannot be left empty).
"""

from __future__ import annotations

import copy
import math
from numbers import Real

import torch

from ..gmm import GMM_STEP_POLICIES, GMM_VARIANTS
from ..gmm_options import GMMOptions
from ._common import check_eta

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

try:
    import comfy.samplers as _comfy_samplers
except ImportError:  # not running inside ComfyUI
    _comfy_samplers = None


#: The node's variant widget: "off" or a GMM variant.
VARIANTS = ("off", *GMM_VARIANTS)


def model_sampling(model):
    """The ``model_sampling`` object on the k-diffusion wrapper chain ``model.inner_model...`` (its depth
    differs between ComfyUI versions), or None."""
    wrapped = model
    for _ in range(4):
        sampling = getattr(wrapped, "model_sampling", None)
        if sampling is not None:
            return sampling
        wrapped = getattr(wrapped, "inner_model", None)
        if wrapped is None:
            break
    return None


def is_flow_model(model) -> bool:
    """True when the k-diffusion wrapper ``model`` wraps a ComfyUI flow model (model_sampling CONST)."""
    sampling = model_sampling(model)
    return sampling is not None and any(cls.__name__ == "CONST" for cls in type(sampling).__mro__)


def comfy_noise_sampler(x, extra_args):
    """ComfyUI's default noise sampler for ``x`` (what its ancestral samplers draw when given none), or None
    outside ComfyUI."""
    try:
        from comfy.k_diffusion.sampling import default_noise_sampler
    except ImportError:
        return None
    return default_noise_sampler(x, seed=(extra_args or {}).get("seed"))


def takes_no_step(sigmas) -> bool:
    """The nodes' rule for ComfyUI's sigmas, one for both, as ComfyUI's samplers (comfy/k_diffusion/sampling.py):

    * a schedule of one sigma (SplitSigmas at step 0 gives [sigma_max] as its high half, at the last step [0.] as
      its low half) takes no step: its DPM++ SDE samplers return x for len(sigmas) <= 1 and the others loop zero
      times, so the latent comes back unchanged (True here; the sampler functions return x);
    * every other schedule runs as ComfyUI runs it, a flow schedule whose first sigma lies above 1 included:
      ComfyUI's float32 ``time_snr_shift`` puts ModelSamplingSD3's sigma_max above 1 by its rounding times
      1 / shift (up to ~1e-4 at shifts <= 0.09, more below), and its samplers take that sigma as it is (the DPM++
      SDE ones move a first flow sigma >= 1 to the sigma of percent 1e-4, as the DPM++ node does; the DDIM-GMM
      node runs euler_ancestral_RF's arithmetic on it, where ``sample_rfim_gmm`` alone refuses a first time
      more than 16 float32 ulps above 1)."""
    return isinstance(sigmas, torch.Tensor) and sigmas.dim() == 1 and len(sigmas) <= 1


def sample_ddim_gmm_any(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, **options):
    """The node's sampler function: the flow or the VE sampler, by the model's sampling type. ComfyUI passes no
    noise sampler; with the GMM off ComfyUI's own is used (sample-for-sample parity with its samplers). Sigmas
    as :func:`takes_no_step` says."""
    from .k_diffusion import _sample_flow, sample_ddim_gmm

    if takes_no_step(sigmas):
        return x
    if noise_sampler is None and "gmm" in options and options["gmm"] is None:
        noise_sampler = comfy_noise_sampler(x, extra_args)
    if is_flow_model(model):
        # ComfyUI's euler_ancestral_RF scales its noise by the model sampling's noise_scale (1 when absent)
        options["s_noise"] = options.get("s_noise", 1.0) * getattr(model_sampling(model), "noise_scale", 1.0)
        return _sample_flow(
            model, x, sigmas, extra_args, callback, disable, noise_sampler=noise_sampler, noise="ancestral_rf",
            max_start=math.inf, **options,
        )  # fmt: skip
    return sample_ddim_gmm(model, x, sigmas, extra_args, callback, disable, noise_sampler=noise_sampler, **options)


def comfy_brownian_noise_sampler(x, sigmas, extra_args):
    """ComfyUI's default noise sampler of its SDE samplers (``BrownianTreeNoiseSampler`` over [min positive
    sigma, max sigma] of the sigmas it is given, ``extra_args["seed"]``, the tree on the CPU), or None outside
    ComfyUI."""
    try:
        from comfy.k_diffusion.sampling import BrownianTreeNoiseSampler
    except ImportError:
        return None
    seed = (extra_args or {}).get("seed")
    return BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seed, cpu=True)


#: ComfyUI's percent_offset of its first flow sigma (offset_first_sigma_for_snr): lambda = log((1 - t) / t) is
#: infinite at t = 1, so its flow SDE samplers start at the model's sigma of this percent instead.
FLOW_FIRST_SIGMA_PERCENT = 1e-4


def sample_dpmpp_gmm_any(
    model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, *, sampler, **options
):
    """The DPM++ node's sampler function, ComfyUI's ``sample_<sampler>`` for the model's sampling type with the
    DDIM-GMM noise. With the GMM off and no noise sampler: ComfyUI's own Brownian-tree noise (its seed). eps / v
    models: k-diffusion's VE formulas. Flow models (CONST) on the SDE samplers, as ComfyUI runs them: lambda =
    log((1 - t) / t), alpha_s = 1 - s, a first sigma >= 1 moved to the model's sigma at percent 1e-4 (after
    the noise sampler is built), s_noise times the model sampling's noise_scale; ComfyUI's dpmpp_2m runs its VE
    formulas on flow sigmas too (x_s = (s / t) x + ... : the flow Euler step at order 1). Sigmas as
    :func:`takes_no_step` says."""
    from .k_diffusion import DPMPP_SAMPLERS, _sample_dpmpp

    if takes_no_step(sigmas):
        return x
    _, sde = DPMPP_SAMPLERS[sampler]
    path = "ve"
    if sde:
        if noise_sampler is None and options.get("gmm") is None:
            noise_sampler = comfy_brownian_noise_sampler(x, sigmas, extra_args)
        sigmas, path = flow_sigmas(model, sigmas, options, offset_first=True)
    return _sample_dpmpp(
        model, x, sigmas, extra_args, callback, disable, sampler=sampler, noise_sampler=noise_sampler, path=path,
        **options,
    )  # fmt: skip


def flow_sigmas(model, sigmas, options: dict, offset_first: bool):
    """ComfyUI's handling of a flow (CONST) model in its SDE samplers: (sigmas, "flow") with ``options["s_noise"]``
    times the model sampling's noise_scale and, with ``offset_first``, a first sigma >= 1 moved to the model's sigma
    at percent 1e-4 (half-log-SNR samplers); (sigmas, "ve") for other models, nothing changed."""
    if not is_flow_model(model):
        return sigmas, "ve"
    sampling = model_sampling(model)
    options["s_noise"] = options.get("s_noise", 1.0) * getattr(sampling, "noise_scale", 1.0)
    if offset_first and len(sigmas) > 1 and sigmas[0] >= 1:
        sigmas = sigmas.clone()
        sigmas[0] = sampling.percent_to_sigma(FLOW_FIRST_SIGMA_PERCENT)
    return sigmas, "flow"


def sample_sde_gmm_any(
    model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, *, sampler, **options
):
    """The DPM++ SDE / 2S ancestral node's sampler function: ComfyUI's ``sample_dpmpp_sde`` /
    ``sample_dpmpp_2s_ancestral`` for the model's sampling type with the DDIM-GMM noise
    (:func:`ddim_gmm_ext.integrations.k_diffusion_sde.sample_two_stage`, its ComfyUI flavour). With the GMM off and
    no noise sampler, ComfyUI's own noise of the seed: its Brownian tree (dpmpp_sde, built from the sigmas before
    the first flow sigma moves) or its default noise sampler (dpmpp_2s_ancestral). Flow models (CONST): dpmpp_sde
    with lambda = log((1 - t) / t), alpha = 1 - t and the first sigma moved as the DPM++ node's;
    dpmpp_2s_ancestral as ComfyUI's ``sample_dpmpp_2s_ancestral_RF`` (intermediate sigma 0.9999 from a sigma >= 1,
    where ComfyUI's lambda is infinite at 1 and NaN above); both with s_noise times noise_scale. Sigmas as
    :func:`takes_no_step` says."""
    from .k_diffusion_sde import sample_two_stage

    if takes_no_step(sigmas):
        return x
    if noise_sampler is None and options.get("gmm") is None:
        if sampler == "dpmpp_sde":
            noise_sampler = comfy_brownian_noise_sampler(x, sigmas, extra_args)
        else:
            noise_sampler = comfy_noise_sampler(x, extra_args)
    sigmas, path = flow_sigmas(model, sigmas, options, offset_first=sampler == "dpmpp_sde")
    return sample_two_stage(
        model, x, sigmas, extra_args, callback, disable, sampler=sampler, noise_sampler=noise_sampler,
        flavor="comfy", path=path, **options,
    )  # fmt: skip


def sde_node_options(sampler, eta, s_noise, r, variant, n_components, scale, gmm_steps="all") -> dict:
    """The DPM++ SDE / 2S ancestral node's widget values as sampler options, each checked under its widget's name
    before any sampling (r: dpmpp_sde's, checked and unused by dpmpp_2s_ancestral)."""
    from .k_diffusion import check_dpmpp_eta
    from .k_diffusion_sde import SDE_SAMPLERS, check_r

    check_number_widgets(eta=eta, r=r)
    if sampler not in SDE_SAMPLERS:
        raise ValueError(f"sampler must be one of {SDE_SAMPLERS}, got {sampler!r}")
    options = node_options(0.0, s_noise, variant, n_components, scale, gmm_steps)
    options |= {"sampler": sampler, "eta": check_dpmpp_eta(eta), "r": check_r(r)}
    if options["gmm"] is not None and options["eta"] * options["s_noise"] == 0:
        raise ValueError(
            f"variant={variant!r} needs noise to replace: eta or s_noise is 0; set variant to 'off', or use eta > 0 "
            "and s_noise > 0"
        )
    return options


#: The DPM++ node's sampler widget (ComfyUI's sampler names).
DPMPP_NODE_SAMPLERS = ("dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_2m")


def dpmpp_node_options(sampler, solver_type, eta, s_noise, variant, n_components, scale, gmm_steps="all") -> dict:
    """The DPM++ node's widget values as sampler options, each checked under its widget's name before any
    sampling. dpmpp_2m is deterministic: it takes only the variant "off" (eta, s_noise, solver_type are checked
    and unused there, as n_components and scale are with "off")."""
    from .k_diffusion import SOLVER_TYPES, check_dpmpp_eta

    check_number_widgets(eta=eta)
    if sampler not in DPMPP_NODE_SAMPLERS:
        raise ValueError(f"sampler must be one of {DPMPP_NODE_SAMPLERS}, got {sampler!r}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    options = node_options(0.0, s_noise, variant, n_components, scale, gmm_steps)
    options["eta"] = check_dpmpp_eta(eta)
    if options["gmm"] is not None and (sampler == "dpmpp_2m" or options["eta"] * options["s_noise"] == 0):
        raise ValueError(
            f"variant={variant!r} needs SDE noise to replace: "
            + ("sampler 'dpmpp_2m' is deterministic" if sampler == "dpmpp_2m" else "eta or s_noise is 0")
            + "; set variant to 'off', or use an SDE sampler with eta > 0 and s_noise > 0"
        )
    return {"sampler": sampler, "solver_type": solver_type, **options}


def check_number_widgets(**widgets) -> None:
    """The nodes' FLOAT widgets (eta, s_noise, scale) must hold numbers: a bool or a string is a TypeError naming
    the widget (ComfyUI's min / max validation compares, so True passes it as 1)."""
    for name, value in widgets.items():
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")


def node_options(eta, s_noise, variant, n_components, scale, gmm_steps="all") -> dict:
    """The node's widget values as sampler options, each checked under its widget's name before any sampling.
    ``gmm_steps``: "all" or "matched" (the explicit forms of the samplers' option have no widget)."""
    from .k_diffusion import check_s_noise

    check_number_widgets(eta=eta, s_noise=s_noise, scale=scale)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if gmm_steps not in GMM_STEP_POLICIES:
        raise ValueError(f"gmm_steps must be one of {GMM_STEP_POLICIES}, got {gmm_steps!r}")
    gmm = GMMOptions(variant=None if variant == "off" else variant, n_components=n_components, scale=scale)
    return {
        "eta": check_eta(eta),
        "s_noise": check_s_noise(s_noise),
        "gmm": gmm.variant,
        "n_components": gmm.n_components,
        "scale": gmm.scale,
        "gmm_steps": gmm_steps,
    }


#: The few-step node's sampler widget (ComfyUI's sampler names).
FEWSTEP_NODE_SAMPLERS = ("lcm", "res_multistep", "res_multistep_ancestral")


def fewstep_node_options(sampler, eta, s_noise, variant, n_components, scale, gmm_steps="all") -> dict:
    """The few-step node's widget values as sampler options, each checked under its widget's name before any
    sampling. eta is res_multistep_ancestral's, s_noise res_multistep's (both checked and unused by lcm);
    res_multistep, and res_multistep_ancestral at eta or s_noise 0, take only the variant "off"."""
    from .k_diffusion import check_dpmpp_eta

    check_number_widgets(eta=eta)
    if sampler not in FEWSTEP_NODE_SAMPLERS:
        raise ValueError(f"sampler must be one of {FEWSTEP_NODE_SAMPLERS}, got {sampler!r}")
    options = node_options(0.0, s_noise, variant, n_components, scale, gmm_steps)
    options["eta"] = check_dpmpp_eta(eta)
    deterministic = sampler == "res_multistep" or options["eta"] * options["s_noise"] == 0
    if options["gmm"] is not None and sampler != "lcm" and deterministic:
        why = "sampler 'res_multistep' is deterministic" if sampler == "res_multistep" else "eta or s_noise is 0"
        raise ValueError(
            f"variant={variant!r} has no noise to replace: {why}; set variant to 'off', or use "
            "res_multistep_ancestral with eta > 0 and s_noise > 0"
        )
    return {"sampler": sampler, **options}


def lcm_renoise(model):
    """ComfyUI's LCM re-noising for ``model`` as ``s -> (A, c, g)``: its ``sample_lcm`` moves the denoiser output D
    to sigma s with the model sampling's ``noise_scaling(s, z, D)``, which is A D + c z for every ComfyUI model
    sampling ((1, s) for eps / v models, (1 - s, s noise_scale) for CONST ones, (1, 0) for its image-to-image
    flows), so A and c are read from it at (z, D) = (0, 1) and (1, 0) in float64. Without a model sampling (or
    its noise_scaling): the path's form (:func:`path_renoise`). g: 1 for flow models, sqrt(1 + s^2) otherwise."""
    from .k_diffusion_fewstep import path_gmm_scale, path_renoise

    flow = is_flow_model(model)
    scaling = getattr(model_sampling(model), "noise_scaling", None)
    if scaling is None:
        return path_renoise(flow)

    def renoise(s: float) -> tuple[float, float, float]:
        sigma = torch.tensor(s, dtype=torch.float64)
        a = scaling(sigma, torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64))
        c = scaling(sigma, torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64))
        return float(a), float(c), path_gmm_scale(s, flow)

    return renoise


def sample_fewstep_gmm_any(
    model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, *, sampler, **options
):
    """The few-step node's sampler function, ComfyUI's ``sample_<sampler>`` with the DDIM-GMM noise. With the GMM
    off and no noise sampler: ComfyUI's own default noise sampler of the seed (what its lcm / res_multistep draw).
    lcm re-noises as the model sampling does (:func:`lcm_renoise`; flow sigmas of any start, as ComfyUI's);
    res_multistep runs its VE arithmetic on the sigmas of every model type, flow ones included, as ComfyUI's
    (g = 1 there). Sigmas as :func:`takes_no_step` says."""
    from .k_diffusion_fewstep import _sample_lcm, _sample_res_multistep

    if takes_no_step(sigmas):
        return x
    if noise_sampler is None and options.get("gmm") is None:
        noise_sampler = comfy_noise_sampler(x, extra_args)
    flow = is_flow_model(model)
    eta, s_noise = options.pop("eta", 1.0), options.pop("s_noise", 1.0)
    if sampler == "lcm":
        return _sample_lcm(
            model, x, sigmas, extra_args, callback, disable, noise_sampler, renoise=lcm_renoise(model),
            max_start=math.inf, flow=flow, **options,
        )  # fmt: skip
    ancestral = sampler == "res_multistep_ancestral"
    return _sample_res_multistep(
        model, x, sigmas, extra_args, callback, disable, noise_sampler, eta=eta if ancestral else 0.0,
        s_noise=s_noise, ancestral=ancestral, flow=flow, **options,
    )  # fmt: skip


if _comfy_samplers is not None:

    class _SamplerNode:
        """What every node here shares: widgets in, a SAMPLER out. A node names its ``widgets`` (name -> ComfyUI
        input spec, in display order; ``INPUT_TYPES`` gives a fresh copy), ``options`` (the widget values, checked
        and named -> the sampler's extra options) and ``sampler`` (the KSAMPLER's function)."""

        CATEGORY = "sampling/custom_sampling/samplers"
        RETURN_TYPES = ("SAMPLER",)
        FUNCTION = "get_sampler"
        widgets: dict
        options: staticmethod
        sampler: staticmethod

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": copy.deepcopy(cls.widgets)}

        def get_sampler(self, **widgets):
            return (_comfy_samplers.KSAMPLER(self.sampler, extra_options=self.options(**widgets)),)

    #: the GMM widgets every node shows (after its own sampler and noise widgets)
    _GMM_WIDGETS = {
        "variant": (list(VARIANTS), {"default": "ortho-vub"}),
        "n_components": (
            "INT",
            {"default": 8, "min": 1, "max": 4096, "tooltip": "K; used only when variant is not off"},
        ),
        "scale": (
            "FLOAT",
            {
                "default": 1.0,
                "min": 0.0,
                "max": 100.0,
                "step": 0.01,
                "tooltip": "offset scale s; used only when variant is not off",
            },
        ),
        "gmm_steps": (
            list(GMM_STEP_POLICIES),
            {
                "default": "all",
                "tooltip": "steps with the mixture: all, or matched (only where its noise is not clipped, so its "
                "covariance equals the Gaussian step's)",
            },
        ),
    }
    _S_NOISE = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01})
    _SDE_ETA = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01})

    class SamplerDDIMGMM(_SamplerNode):
        """Node: DDIM-GMM sampler options -> SAMPLER."""

        options = staticmethod(node_options)
        sampler = staticmethod(sample_ddim_gmm_any)
        widgets = {
            "eta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            "s_noise": _S_NOISE,
            **_GMM_WIDGETS,
        }

    class SamplerDPMPPGMM(_SamplerNode):
        """Node: DPM++ 2M / 2M SDE / 3M SDE with the DDIM-GMM noise -> SAMPLER."""

        options = staticmethod(dpmpp_node_options)
        sampler = staticmethod(sample_dpmpp_gmm_any)
        widgets = {
            "sampler": (
                list(DPMPP_NODE_SAMPLERS),
                {"default": "dpmpp_2m_sde", "tooltip": "dpmpp_2m is deterministic: variant off only"},
            ),
            "solver_type": (["midpoint", "heun"], {"default": "midpoint", "tooltip": "dpmpp_2m_sde only"}),
            "eta": _SDE_ETA,
            "s_noise": _S_NOISE,
            **_GMM_WIDGETS,
        }

    class SamplerDPMPPSDEGMM(_SamplerNode):
        """Node: DPM++ SDE / DPM++ 2S ancestral with the DDIM-GMM noise at every re-noising stage -> SAMPLER."""

        options = staticmethod(sde_node_options)
        sampler = staticmethod(sample_sde_gmm_any)
        widgets = {
            "sampler": (["dpmpp_sde", "dpmpp_2s_ancestral"], {"default": "dpmpp_sde"}),
            "eta": _SDE_ETA,
            "s_noise": _S_NOISE,
            "r": ("FLOAT", {"default": 0.5, "min": 0.01, "max": 100.0, "step": 0.01, "tooltip": "dpmpp_sde only"}),
            **_GMM_WIDGETS,
        }

    class SamplerFewStepGMM(_SamplerNode):
        """Node: LCM / res_multistep / res_multistep_ancestral with the DDIM-GMM noise -> SAMPLER."""

        options = staticmethod(fewstep_node_options)
        sampler = staticmethod(sample_fewstep_gmm_any)
        widgets = {
            "sampler": (
                list(FEWSTEP_NODE_SAMPLERS),
                {"default": "lcm", "tooltip": "res_multistep is deterministic: variant off only"},
            ),
            "eta": (
                "FLOAT",
                {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01, "tooltip": "res_multistep_ancestral"},
            ),
            "s_noise": _S_NOISE,
            **_GMM_WIDGETS,
        }

    for _node, _display in (
        (SamplerDDIMGMM, "DDIM-GMM Sampler"),
        (SamplerDPMPPGMM, "DPM++ GMM Sampler (2M, 2M SDE, 3M SDE)"),
        (SamplerDPMPPSDEGMM, "DPM++ SDE / 2S Ancestral GMM Sampler"),
        (SamplerFewStepGMM, "LCM / res_multistep GMM Sampler"),
    ):
        NODE_CLASS_MAPPINGS[_node.__name__] = _node
        NODE_DISPLAY_NAME_MAPPINGS[_node.__name__] = _display
