"""The documented import path of :mod:`ddim_gmm_ext.integrations.k_diffusion` (the same module object), with the
public samplers of the modules beside it (ComfyUI's few-step samplers) added to it."""

import sys

from .integrations import k_diffusion as _module
from .integrations import k_diffusion_fewstep as _fewstep

for _name in _fewstep.__all__:
    setattr(_module, _name, getattr(_fewstep, _name))
_module.__all__ = [*_module.__all__, *(n for n in _fewstep.__all__ if n not in _module.__all__)]

sys.modules[__name__] = _module
