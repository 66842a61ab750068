"""ComfyUI sampler node for DDIM-GMM.

Inside ComfyUI (``comfy.samplers`` importable), importing this module defines the node ``SamplerDDIMGMM``
(category sampling/custom_sampling/samplers): it outputs a SAMPLER for ``SamplerCustom`` /
``SamplerCustomAdvanced`` that runs :func:`ddim_gmm_ext.k_diffusion.sample_ddim_gmm`. Anywhere else the
mappings below stay empty and nothing is imported. To install, put a folder in ``ComfyUI/custom_nodes/`` whose
``__init__.py`` is

    from ddim_gmm_ext.comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

The sampler treats sigmas as VE (x = x0 + sigma eps), which is how ComfyUI wraps eps- and v-prediction
models; flow models (ComfyUI's CONST model sampling, SD3 / Flux) are not VE and need
:func:`ddim_gmm_ext.sample_rfim` instead.
"""

from __future__ import annotations

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

try:
    import comfy.samplers as _comfy_samplers
except ImportError:  # not running inside ComfyUI
    _comfy_samplers = None

if _comfy_samplers is not None:
    from ..gmm import GMM_VARIANTS
    from .k_diffusion import sample_ddim_gmm

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
            return (_comfy_samplers.KSAMPLER(sample_ddim_gmm, extra_options=options),)

    NODE_CLASS_MAPPINGS["SamplerDDIMGMM"] = SamplerDDIMGMM
    NODE_DISPLAY_NAME_MAPPINGS["SamplerDDIMGMM"] = "DDIM-GMM Sampler"
