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
:func:`ddim_gmm_ext.k_diffusion.sample_rfim_gmm` with ComfyUI's euler_ancestral_RF noise, so that GMM off
equals ComfyUI's own Euler (eta 0) and euler_ancestral_RF samplers. Seeds: ComfyUI's seed (up to 2**64 - 1).
"""

from __future__ import annotations

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

try:
    import comfy.samplers as _comfy_samplers
except ImportError:  # not running inside ComfyUI
    _comfy_samplers = None


def is_flow_model(model) -> bool:
    """True when the k-diffusion wrapper ``model`` wraps a ComfyUI flow model (model_sampling CONST), found
    on the wrapper chain ``model.inner_model...`` (its depth differs between ComfyUI versions)."""
    wrapped = model
    for _ in range(4):
        sampling = getattr(wrapped, "model_sampling", None)
        if sampling is not None:
            return any(cls.__name__ == "CONST" for cls in type(sampling).__mro__)
        wrapped = getattr(wrapped, "inner_model", None)
        if wrapped is None:
            break
    return False


def sample_ddim_gmm_any(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    """The node's sampler function: the flow or the VE sampler, by the model's sampling type."""
    from .k_diffusion import sample_ddim_gmm, sample_rfim_gmm

    if is_flow_model(model):
        return sample_rfim_gmm(model, x, sigmas, extra_args, callback, disable, noise="ancestral_rf", **options)
    return sample_ddim_gmm(model, x, sigmas, extra_args, callback, disable, **options)


if _comfy_samplers is not None:
    from ..gmm import GMM_VARIANTS

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
                    "variant": (["off", *GMM_VARIANTS], {"default": "ortho-vub"}),
                    "n_components": ("INT", {"default": 8, "min": 1, "max": 4096}),
                    "scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01}),
                }
            }

        def get_sampler(self, eta, s_noise, variant, n_components, scale):
            options = {
                "eta": eta,
                "s_noise": s_noise,
                "gmm": None if variant == "off" else variant,
                "n_components": n_components,
                "scale": scale,
            }
            return (_comfy_samplers.KSAMPLER(sample_ddim_gmm_any, extra_options=options),)

    NODE_CLASS_MAPPINGS["SamplerDDIMGMM"] = SamplerDDIMGMM
    NODE_DISPLAY_NAME_MAPPINGS["SamplerDDIMGMM"] = "DDIM-GMM Sampler"
