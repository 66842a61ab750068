"""diffusers integration: drop-in schedulers whose step is one fused ``torch.ops.ddimgmm.step`` call.

    from ddim_gmm_ext.diffusers import DDIMGMMScheduler
    pipe.scheduler = DDIMGMMScheduler.from_config(pipe.scheduler.config, gmm_variant="ortho-vub", seed=0)

One module per scheduler family; :mod:`._base` holds what they share. Importing this package imports diffusers
(``import ddim_gmm_ext`` does not) and registers the schedulers with it:

* each scheduler is listed in ``scheduler.compatibles`` of the stock scheduler it extends (and of the schedulers
  compatible with that one), and is reachable as ``diffusers.<name>``;
* a saved pipeline records it as ``["ddim_gmm_ext.diffusers", "<name>"]``; ``DiffusionPipeline.from_pretrained``
  loads it back once ``ddim_gmm_ext.diffusers`` is imported (diffusers only resolves libraries already imported);
* ``DDIMPipeline`` keeps a :class:`DDIMGMMScheduler` given to it (stock diffusers converts every scheduler to a
  plain ``DDIMScheduler``, which would drop the GMM); any other scheduler is converted as before.
"""

import sys

# diffusers' loader looks up the loadable base classes by name in the module a component was saved from.
from diffusers import SchedulerMixin  # noqa: F401
from diffusers.pipelines.ddim.pipeline_ddim import DDIMPipeline

from .ddim import DDIMGMMScheduler, DDIMSchedulerOutput
from .ddpm import DDPMGMMScheduler, DDPMSchedulerOutput
from .dpm_multistep import DPMSolverMultistepGMMScheduler
from .euler import (
    EulerAncestralDiscreteGMMScheduler,
    EulerAncestralDiscreteSchedulerOutput,
    EulerDiscreteGMMScheduler,
    EulerDiscreteSchedulerOutput,
)
from .flow_match import FlowMatchEulerDiscreteGMMScheduler, FlowMatchEulerDiscreteSchedulerOutput

__all__ = [
    "DDIMGMMScheduler",
    "DDIMSchedulerOutput",
    "DDPMGMMScheduler",
    "DDPMSchedulerOutput",
    "DPMSolverMultistepGMMScheduler",
    "EulerAncestralDiscreteGMMScheduler",
    "EulerAncestralDiscreteSchedulerOutput",
    "EulerDiscreteGMMScheduler",
    "EulerDiscreteSchedulerOutput",
    "FlowMatchEulerDiscreteGMMScheduler",
    "FlowMatchEulerDiscreteSchedulerOutput",
]

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
    __init__._keeps_gmm = True
    return __init__


if not getattr(DDIMPipeline.__init__, "_keeps_gmm", False):
    DDIMPipeline.__init__ = _keep_gmm_scheduler(DDIMPipeline.__init__)  # type: ignore[method-assign]  # the patch is the point: DDIMPipeline must keep a GMM scheduler
