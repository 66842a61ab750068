"""The documented import path of :mod:`ddim_gmm_ext.integrations.k_diffusion` (the same module object), with the
public samplers of the modules beside it added to it: ComfyUI's few-step samplers
(:mod:`~ddim_gmm_ext.integrations.k_diffusion_fewstep`) and the two-stage DPM++ samplers
(:mod:`~ddim_gmm_ext.integrations.k_diffusion_sde`). Those modules import this one's helpers, so it cannot import
them itself."""

import sys

from .integrations import k_diffusion as _module
from .integrations import k_diffusion_fewstep as _fewstep
from .integrations import k_diffusion_sde as _sde

for _extra in (_fewstep, _sde):
    for _name in _extra.__all__:
        setattr(_module, _name, getattr(_extra, _name))
_module.__all__ = [*dict.fromkeys([*_module.__all__, *_fewstep.__all__, *_sde.__all__])]
sys.modules[__name__] = _module
