"""ddim_gmm_ext: fused, drop-in DDIM-GMM sampling (Gabbur, TMLR 2026) for PyTorch.

import ddim_gmm_ext as dg
gmm = dg.GMM.create(dim=4 * 64 * 64, n_components=8, n_steps=50, variant="ortho-vub")
out = dg.ddim_step(eps, x_t, alpha_prod_t, alpha_prod_prev, eta=0.0, gmm=gmm, step_index=i, seed=0)
"""

from . import (
    ops,  # noqa: F401  (registers torch.ops.ddimgmm)
    reference,
)
from ._rows import coefficient_row
from ._version import __version__
from .api import StepOutput, ddim_step, rfim_step, step, step_from_table, thin_svd
from .gmm import GMM
from .gmm_options import GMMOptions

__all__ = [
    "GMM",
    "GMMOptions",
    "StepOutput",
    "step",
    "step_from_table",
    "coefficient_row",
    "ddim_step",
    "rfim_step",
    "thin_svd",
    "reference",
    "DDIMSampler",
    "sample_rfim",
    "__version__",
]

# Sampler integrations, imported on first use (ddim_gmm_ext.diffusers, which imports diffusers, and
# ddim_gmm_ext.k_diffusion / ddim_gmm_ext.comfy are imported by name only).
_LAZY = {"DDIMSampler": ("integrations.ldm", "DDIMSampler"), "sample_rfim": ("integrations.rf", "sample_rfim")}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
