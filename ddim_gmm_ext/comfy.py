"""The documented import path of :mod:`ddim_gmm_ext.integrations.comfy` (the same module object)."""

import sys

from .integrations import comfy as _module

sys.modules[__name__] = _module
