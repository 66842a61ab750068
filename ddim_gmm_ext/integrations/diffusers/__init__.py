"""diffusers integration: drop-in schedulers whose step is one fused ``torch.ops.ddimgmm.step`` call.

    from ddim_gmm_ext.diffusers import DDIMGMMScheduler
    pipe.scheduler = DDIMGMMScheduler.from_config(pipe.scheduler.config, gmm_variant="ortho-vub", seed=0)

One module per scheduler family. Importing this package imports diffusers; ``import ddim_gmm_ext`` does not.
"""

from .ddim import DDIMGMMScheduler, DDIMSchedulerOutput

__all__ = ["DDIMGMMScheduler", "DDIMSchedulerOutput"]
