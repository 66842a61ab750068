"""ComfyUI sampler node for DDIM-GMM.

Inside ComfyUI (``comfy.samplers`` importable), importing this module defines the node ``SamplerDDIMGMM``
(category sampling/custom_sampling/samplers): it outputs a SAMPLER for ``SamplerCustom`` /
``SamplerCustomAdvanced`` that runs :func:`ddim_gmm_ext.k_diffusion.sample_ddim_gmm`. Anywhere else the
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

The widget values are checked when the node runs, naming the widget (ComfyUI's min / max validation lets NaN
through). ``n_components`` and ``scale`` only apply with a GMM; with "off" they are checked and unused, as the
diffusers schedulers treat ``gmm_scale`` with ``gmm_variant=None`` (a widget cannot be left empty).
"""

from __future__ import annotations

from ..gmm import GMM_VARIANTS
from ._common import check_eta, check_gmm_options

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


def sample_ddim_gmm_any(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, **options):
    """The node's sampler function: the flow or the VE sampler, by the model's sampling type. ComfyUI passes no
    noise sampler; with the GMM off ComfyUI's own is used (sample-for-sample parity with its samplers)."""
    from .k_diffusion import sample_ddim_gmm, sample_rfim_gmm

    if noise_sampler is None and "gmm" in options and options["gmm"] is None:
        noise_sampler = comfy_noise_sampler(x, extra_args)
    if is_flow_model(model):
        # ComfyUI's euler_ancestral_RF scales its noise by the model sampling's noise_scale (1 when absent)
        options["s_noise"] = options.get("s_noise", 1.0) * getattr(model_sampling(model), "noise_scale", 1.0)
        return sample_rfim_gmm(
            model, x, sigmas, extra_args, callback, disable, noise_sampler=noise_sampler, noise="ancestral_rf",
            **options,
        )  # fmt: skip
    return sample_ddim_gmm(model, x, sigmas, extra_args, callback, disable, noise_sampler=noise_sampler, **options)


def node_options(eta, s_noise, variant, n_components, scale) -> dict:
    """The node's widget values as sampler options, each checked under its widget's name before any sampling."""
    from .k_diffusion import check_s_noise

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    gmm = None if variant == "off" else variant
    check_gmm_options(gmm, n_components, scale)
    return {
        "eta": check_eta(eta),
        "s_noise": check_s_noise(s_noise),
        "gmm": gmm,
        "n_components": n_components,
        "scale": scale,
    }


if _comfy_samplers is not None:

    class SamplerDDIMGMM:
        """Node: DDIM-GMM sampler options -> SAMPLER."""

        CATEGORY = "sampling/custom_sampling/samplers"
        RETURN_TYPES = ("SAMPLER",)
        FUNCTION = "get_sampler"

        @classmethod
        def INPUT_TYPES(cls):
            return {
                "required": {
                    "eta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01}),
                    "s_noise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01}),
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
                }
            }

        def get_sampler(self, eta, s_noise, variant, n_components, scale):
            options = node_options(eta, s_noise, variant, n_components, scale)
            return (_comfy_samplers.KSAMPLER(sample_ddim_gmm_any, extra_options=options),)

    NODE_CLASS_MAPPINGS["SamplerDDIMGMM"] = SamplerDDIMGMM
    NODE_DISPLAY_NAME_MAPPINGS["SamplerDDIMGMM"] = "DDIM-GMM Sampler"
