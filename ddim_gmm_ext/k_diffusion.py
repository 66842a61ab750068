"""The documented import path of :mod:`ddim_gmm_ext.integrations.k_diffusion` (the same module object)."""

import sys

from .integrations import k_diffusion as _module

sys.modules[__name__] = _module
