"""diffusers integration: drop-in schedulers whose step is one fused ``torch.ops.ddimgmm.step`` call.

    from ddim_gmm_ext.diffusers import DDIMGMMScheduler
    pipe.scheduler = DDIMGMMScheduler.from_config(pipe.scheduler.config, gmm_variant="ortho-vub", seed=0)

One module per scheduler family; :mod:`._base` holds what they share. Importing this package imports diffusers
(``import ddim_gmm_ext`` does not) and changes no stock diffusers class. It only adds names:

* each scheduler is reachable as ``diffusers.<name>`` (where diffusers resolves a class named in a saved config)
  and its ``compatibles`` list the stock schedulers it can replace;
* a saved pipeline records it as ``["ddim_gmm_ext.diffusers", "<name>"]``; ``DiffusionPipeline.from_pretrained``
  loads it back once ``ddim_gmm_ext.diffusers`` is imported (diffusers only resolves libraries already imported).

Changing diffusers' own classes is one explicit call, :func:`patch_diffusers` (undone by
:func:`unpatch_diffusers`):

* ``compatibles=True``: each scheduler joins the ``_compatibles`` of the stock scheduler it extends (and of the
  schedulers compatible with that one), so ``pipe.scheduler.compatibles`` offers it;
* ``ddim_pipeline=True``: ``DDIMPipeline`` keeps a :class:`DDIMGMMScheduler` given to its constructor or loaded
  by ``DDIMPipeline.from_pretrained`` (stock diffusers converts every scheduler to a plain ``DDIMScheduler``
  there, which drops the GMM); any other scheduler is converted as before. Without the patch, assign the
  scheduler after construction: ``pipe.scheduler = DDIMGMMScheduler.from_config(pipe.scheduler.config, ...)``.
"""

import sys

# diffusers' loader looks up the loadable base classes by name in the module a component was saved from.
from diffusers import SchedulerMixin  # noqa: F401
from diffusers.pipelines.ddim.pipeline_ddim import DDIMPipeline

from .ddim import DDIMGMMScheduler, DDIMSchedulerOutput
from .ddpm import DDPMGMMScheduler, DDPMSchedulerOutput
from .dpm_multistep import DPMSolverMultistepGMMScheduler
from .edm import EDMDPMSolverMultistepGMMScheduler, EDMEulerGMMScheduler, EDMEulerSchedulerOutput
from .euler import (
    EulerAncestralDiscreteGMMScheduler,
    EulerAncestralDiscreteSchedulerOutput,
    EulerDiscreteGMMScheduler,
    EulerDiscreteSchedulerOutput,
)
from .flow_match import FlowMatchEulerDiscreteGMMScheduler, FlowMatchEulerDiscreteSchedulerOutput
from .lcm import (
    FlowMatchLCMGMMScheduler,
    FlowMatchLCMSchedulerOutput,
    LCMGMMScheduler,
    LCMSchedulerOutput,
    TCDGMMScheduler,
    TCDSchedulerOutput,
)
from .unipc import UniPCMultistepGMMScheduler

try:  # diffusers' DPMSolverSDEScheduler draws its Brownian-tree noise with torchsde, an optional dependency
    from .dpm_sde import DPMSolverSDEGMMScheduler, DPMSolverSDESchedulerOutput  # noqa: F401 (in __all__ below)
except ImportError as _error:  # torchsde missing: every other scheduler works; these two names say what to install
    _SDE_ERROR: ImportError | None = _error
else:
    _SDE_ERROR = None
_SDE_NAMES = ("DPMSolverSDEGMMScheduler", "DPMSolverSDESchedulerOutput")

__all__ = [
    "DDIMGMMScheduler",
    "DDIMSchedulerOutput",
    "DDPMGMMScheduler",
    "DDPMSchedulerOutput",
    "DPMSolverMultistepGMMScheduler",
    "EDMDPMSolverMultistepGMMScheduler",
    "EDMEulerGMMScheduler",
    "EDMEulerSchedulerOutput",
    "EulerAncestralDiscreteGMMScheduler",
    "EulerAncestralDiscreteSchedulerOutput",
    "EulerDiscreteGMMScheduler",
    "EulerDiscreteSchedulerOutput",
    "FlowMatchEulerDiscreteGMMScheduler",
    "FlowMatchEulerDiscreteSchedulerOutput",
    "FlowMatchLCMGMMScheduler",
    "FlowMatchLCMSchedulerOutput",
    "LCMGMMScheduler",
    "LCMSchedulerOutput",
    "TCDGMMScheduler",
    "TCDSchedulerOutput",
    "UniPCMultistepGMMScheduler",
    "patch_diffusers",
    "unpatch_diffusers",
]
if _SDE_ERROR is None:
    __all__ += _SDE_NAMES

#: each scheduler and the stock diffusers scheduler it extends
_STOCK = {
    DDIMGMMScheduler: "DDIMScheduler",
    DDPMGMMScheduler: "DDPMScheduler",
    DPMSolverMultistepGMMScheduler: "DPMSolverMultistepScheduler",
    EDMDPMSolverMultistepGMMScheduler: "EDMDPMSolverMultistepScheduler",
    EDMEulerGMMScheduler: "EDMEulerScheduler",
    EulerDiscreteGMMScheduler: "EulerDiscreteScheduler",
    EulerAncestralDiscreteGMMScheduler: "EulerAncestralDiscreteScheduler",
    FlowMatchEulerDiscreteGMMScheduler: "FlowMatchEulerDiscreteScheduler",
    UniPCMultistepGMMScheduler: "UniPCMultistepScheduler",
    LCMGMMScheduler: "LCMScheduler",
    TCDGMMScheduler: "TCDScheduler",
    FlowMatchLCMGMMScheduler: "FlowMatchLCMScheduler",
}
if _SDE_ERROR is None:
    _STOCK[DPMSolverSDEGMMScheduler] = "DPMSolverSDEScheduler"


def __getattr__(name: str):
    if name in _SDE_NAMES and _SDE_ERROR is not None:
        raise ImportError(
            f"{name} needs torchsde (diffusers' DPMSolverSDEScheduler draws its Brownian-tree noise with it), which "
            f"failed to import ({_SDE_ERROR}): pip install torchsde"
        ) from _SDE_ERROR
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The recorded library name must resolve even when only this package (not the public alias) was imported.
sys.modules.setdefault("ddim_gmm_ext.diffusers", sys.modules[__name__])


def _keep_gmm_scheduler(stock_init):
    def __init__(self, unet, scheduler):
        if isinstance(scheduler, DDIMGMMScheduler):
            super(DDIMPipeline, self).__init__()
            self.register_modules(unet=unet, scheduler=scheduler)
        else:
            stock_init(self, unet, scheduler)

    __init__.__doc__ = stock_init.__doc__
    __init__._stock_init = stock_init
    return __init__


#: stock class -> its _compatibles before patch_diffusers (restored by unpatch_diffusers)
_saved_compatibles: dict[type, list[str]] = {}


def patch_diffusers(*, compatibles: bool = True, ddim_pipeline: bool = True) -> None:
    """Change diffusers' own classes for these schedulers (importing this module does not; see the module
    docstring): ``compatibles`` lists each scheduler in the stock schedulers' ``compatibles``; ``ddim_pipeline``
    makes ``DDIMPipeline`` keep a :class:`DDIMGMMScheduler` instead of converting it to ``DDIMScheduler``.
    Idempotent; :func:`unpatch_diffusers` restores the stock classes."""
    import diffusers

    if compatibles:
        for cls, stock_name in _STOCK.items():
            stock = getattr(diffusers, stock_name)
            for other in {stock_name, *stock._compatibles}:
                klass = getattr(diffusers, other, None)
                if klass in _STOCK:  # ours, listed in a stock class's _compatibles by an earlier iteration
                    continue
                # a stock class whose backend is missing (DPMSolverSDEScheduler without torchsde) is diffusers'
                # placeholder, with no _compatibles: nothing to list there
                if isinstance(klass, type) and cls.__name__ not in getattr(klass, "_compatibles", [cls.__name__]):
                    _saved_compatibles.setdefault(klass, klass._compatibles)
                    klass._compatibles = [*klass._compatibles, cls.__name__]
    if ddim_pipeline and not hasattr(DDIMPipeline.__init__, "_stock_init"):
        DDIMPipeline.__init__ = _keep_gmm_scheduler(DDIMPipeline.__init__)  # type: ignore[method-assign]  # the patch is the point: DDIMPipeline must keep a GMM scheduler


def unpatch_diffusers() -> None:
    """Undo :func:`patch_diffusers`: the stock ``_compatibles`` lists and ``DDIMPipeline.__init__`` come back."""
    for klass, saved in _saved_compatibles.items():
        klass._compatibles = saved
    _saved_compatibles.clear()
    stock_init = getattr(DDIMPipeline.__init__, "_stock_init", None)
    if stock_init is not None:
        DDIMPipeline.__init__ = stock_init  # type: ignore[method-assign]  # restoring diffusers' own
