"""The documented import path of :mod:`ddim_gmm_ext.integrations.k_diffusion` (the same module object), with the
samplers of :mod:`ddim_gmm_ext.integrations.k_diffusion_sde` added to it (that module imports this one's helpers,
so it cannot be imported from there)."""

import sys

from .integrations import k_diffusion as _module
from .integrations import k_diffusion_sde as _sde

for _name in _sde.__all__:
    setattr(_module, _name, getattr(_sde, _name))
_module.__all__ = [*dict.fromkeys([*_module.__all__, *_sde.__all__])]
sys.modules[__name__] = _module
