"""The documented import path of :mod:`ddim_gmm_ext.integrations.diffusers` (the same module object)."""

import sys

from .integrations import diffusers as _module

sys.modules[__name__] = _module
