"""diffusers integration: :class:`DDPMGMMScheduler`, a drop-in ``DDPMScheduler`` whose step is one fused
``torch.ops.ddimgmm.step`` call (with the DDIM-GMM kernel when a GMM variant is configured).

Importing this module imports diffusers; ``import ddim_gmm_ext`` does not.
"""

from __future__ import annotations

from numbers import Integral

import torch
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler, DDPMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from ._args import check_optional_step_count, check_step_arguments, stock_signature
from ._base import (
    GMMSchedulerMixin,
    publish,
    scheduler_output,
    zero_snr_rows,
)
from ._config import InitArgs, scheduler_init

__all__ = ["DDPMGMMScheduler", "DDPMSchedulerOutput"]

#: variance types whose noise std depends only on the timestep (a learned one is read from the model output)
_FIXED_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")


class DDPMGMMScheduler(GMMSchedulerMixin, DDPMScheduler):
    """``DDPMScheduler`` with a fused step and the optional DDIM-GMM noise (Gabbur, TMLR 2026).

    Every ``DDPMScheduler`` config key, default and method is kept; GMM config keys, tables and
    :meth:`set_gmm_params`: see :class:`GMMSchedulerMixin`.

    The DDPM ancestral step x_t -> x_s (s the previous inference timestep, a = sqrt(alpha_bar), b = sqrt(1 - a^2)):

        x_s = k0 x0_hat + kt x_t + c z,   k0 = a_s beta / b_t^2,  kt = sqrt(alpha) b_s^2 / b_t^2,
        alpha = a_t^2 / a_s^2, beta = 1 - alpha, c the std of ``variance_type`` (0 when t = 0).

    With x_t = a_t x0_hat + b_t eps' (eps' re-derived from the clipped x0_hat, i.e. the op's
    ``use_clipped_model_output=True``) this is the op's row mean = A x0_hat + B eps' with A = k0 + kt a_t
    (= a_s) and B = kt b_t, noise std c. With GMM on, z is replaced by the moment-matched mixture noise of
    the step's parameter set (same mean and per-coordinate variance of x_s).

    Randomness: ``generator`` (one or one per sample): z drawn exactly as ``DDPMScheduler`` draws it
    (``randn_tensor``, only when t > 0), then the GMM component from the same generator(s); GMM off equals
    ``DDPMScheduler`` for the same generator. No generator, GMM off and ``seed=None``: z drawn from torch's global
    RNG as ``DDPMScheduler`` draws it (the loop leaves the global RNG as the stock class does). No generator
    otherwise: z and k from the op's Philox stream of (seed, sample index, step index), drawn inside the op
    (``seed=None``: the stream seed is drawn from the global RNG at the first step of each run, a rerun without
    ``set_timesteps`` included: see :class:`GMMSchedulerMixin`).

    Under ``torch.compile`` the step index is looked up on the device from the timestep tensor (one graph for the
    loop; GMM tables and a pending stream seed need :meth:`prepare_gmm` first); noise drawn from the global RNG
    is then drawn at t = 0 too, where its std is 0, so only the RNG's state after the loop differs from eager.

    Zero-SNR schedules (``rescale_betas_zero_snr=True``) with ``prediction_type="epsilon"``: at a_t = 0 x0 is
    clipped to +-clip_sample_range as ``DDPMScheduler`` does; without clip_sample, or with thresholding,
    ``set_timesteps`` raises where the schedule reaches a_t = 0 (``DDPMScheduler`` gives non-finite samples).

    ``variance_type="fixed_large_log"``: std = exp(0.5 log beta_t) = sqrt(beta_t), as "fixed_large" (diffusers'
    own step takes the square root of log beta_t there, which is NaN).

    ``final_step``: "gaussian" (default) takes the last step with Gaussian noise (g = 0 on its row), "gmm" with
    the mixture as every other step.

    Falls back to ``DDPMScheduler.step`` (GMM off only) where the step is not one row of the table:
    ``thresholding=True`` (x0 needs a batch quantile first) and ``variance_type`` "learned" / "learned_range"
    (the std comes from the model output). With GMM on these are refused.
    """

    _compatibles = [*DDPMScheduler._compatibles, "DDPMScheduler"]

    @scheduler_init(DDPMScheduler)
    def __init__(self, args: InitArgs) -> None:
        super().__init__(**args.stock)
        if args.prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(
                f"prediction_type must be 'epsilon', 'sample' or 'v_prediction', got {args.prediction_type!r}"
            )
        self._init_gmm()
        self._index_of_host: dict[int, int] = {}
        self._timesteps_host: list[int] = []
        self._index_of = torch.full((0,), -1, dtype=torch.int64)

    def _gmm_refusal(self, source: str) -> str | None:
        """A learned variance (read from the model output) or thresholding: the step is diffusers' own."""
        c = self.config
        if c.thresholding or c.variance_type not in _FIXED_VARIANCES:
            return (
                f"{source} needs a fixed variance_type {_FIXED_VARIANCES} and thresholding=False, got "
                f"variance_type={c.variance_type!r}, thresholding={c.thresholding}: those steps are diffusers' own, "
                "with no fused noise for a mixture to replace"
            )
        return None

    @stock_signature(DDPMScheduler.set_timesteps)
    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None) -> None:
        """As ``DDPMScheduler.set_timesteps``; also builds the [S, 6] coefficient table of the schedule."""
        num_inference_steps = check_optional_step_count(num_inference_steps)
        super().set_timesteps(num_inference_steps=num_inference_steps, device=device, timesteps=timesteps)
        t = self.timesteps.cpu().long()
        self._index_of_host = {int(v): i for i, v in enumerate(t.tolist())}
        self._timesteps_host = t.tolist()
        # position of each training timestep (-1: not in the schedule), looked up on the device when compiling
        T = self.config.num_train_timesteps
        index_of = torch.full((max(T, int(t.max()) + 1),), -1, dtype=torch.int64)
        index_of[t] = torch.arange(len(t))
        self._index_of = index_of.to(self.timesteps.device)
        prev = torch.cat([t[1:], t.new_tensor([-1])])
        abar = self.alphas_cumprod.detach().to("cpu", torch.float64)
        abar_t = abar[t]
        abar_s = torch.where(prev >= 0, abar[prev.clamp(min=0)], torch.ones_like(abar_t))
        alpha = abar_t / abar_s
        k0 = abar_s.sqrt() * (1 - alpha) / (1 - abar_t)
        kt = alpha.sqrt() * (1 - abar_s) / (1 - abar_t)
        a_t, b_t = abar_t.sqrt(), (1 - abar_t).sqrt()
        c = self.config
        zero_snr_rows(a_t, c, c.clip_sample and not c.thresholding)  # DDPMScheduler's thresholding of +-inf is NaN
        std = torch.zeros_like(abar_t)
        if self.config.variance_type in _FIXED_VARIANCES:
            for i, ti in enumerate(t.tolist()):
                if ti > 0:  # DDPMScheduler's own variance at t (float32), so GMM off matches it
                    v = self._get_variance(ti).double()
                    if self.config.variance_type == "fixed_small_log":
                        std[i] = v  # already exp(0.5 log var)
                    elif self.config.variance_type == "fixed_large_log":
                        std[i] = (0.5 * v).exp()  # v = log beta_t (DDPMScheduler.step takes its sqrt: NaN)
                    else:
                        std[i] = v.sqrt()
        rows = torch.stack([a_t, b_t, k0 + kt * a_t, kt * b_t, std, self._final_step_g(len(t))], dim=-1)
        self._set_rows(rows.to(self.timesteps.device))

    def _index(self, timestep, device: torch.device):
        """Position of ``timestep`` in ``self.timesteps``: a host int (a timestep tensor is read once), or under
        ``torch.compile`` a 0-d int64 tensor on ``device`` (-1 when absent: the op's all-NaN step)."""
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1 or timestep.is_floating_point() or timestep.dtype == torch.bool:
                raise ValueError(
                    f"timestep must be one integer timestep, got a {timestep.dtype} tensor of shape "
                    f"{tuple(timestep.shape)}"
                )
            if torch.compiler.is_compiling():  # int() would need the value on the host: a gather instead
                index_of = self._index_of.to(device)
                n = index_of.shape[0]
                t = timestep.reshape(()).to(device)
                index = index_of.index_select(0, t.clamp(0, n - 1).reshape(1)).reshape(())
                return torch.where((t >= 0) & (t < n), index, torch.full_like(index, -1))
            timestep = int(timestep)
        elif isinstance(timestep, bool) or not isinstance(timestep, Integral):
            raise TypeError(f"timestep must be an int or an integer tensor, got {type(timestep).__name__}")
        i = self._index_of_host.get(int(timestep))
        if i is None:
            raise ValueError(
                f"timestep {timestep} is not in the schedule (scheduler.timesteps); pass one of "
                f"{self.timesteps.tolist()[:8]}{' ...' if len(self.timesteps) > 8 else ''}"
            )
        return i

    @stock_signature(DDPMScheduler.step)
    def step(self, model_output, timestep, sample, generator=None, return_dict=True) -> DDPMSchedulerOutput | tuple:
        """One DDPM(-GMM) ancestral step; arguments and outputs as ``DDPMScheduler.step``."""
        c = self.config
        self._check_gmm_ready()
        learned = c.variance_type in ("learned", "learned_range") and model_output.shape[1] == 2 * sample.shape[1]
        if self._row_table is None or c.thresholding or learned or c.variance_type not in _FIXED_VARIANCES:
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        generator = check_step_arguments(model_output, sample, generator)
        i = self._index(timestep, sample.device)
        gmm = self._gmm_for(sample)
        noise = None
        if self._torch_noise(generator, gmm):  # a generator, or GMM off and no seed: noise as DDPMScheduler's
            # (compiled, the step index is on the device: noise is drawn at t = 0 too, where its std is 0)
            if isinstance(i, torch.Tensor) or self._timesteps_host[i] > 0:
                noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
            else:  # no noise at t = 0 (std 0): keep the op off the Philox stream for a reproducible run
                noise = torch.zeros_like(sample)
        components = self._gmm_components(generator, gmm, i, sample, i)
        out = self._fused_step(
            model_output,
            sample,
            i,
            prediction_type=c.prediction_type,
            gmm=gmm,
            clip_sample_range=c.clip_sample_range if c.clip_sample else None,
            use_clipped_model_output=True,  # DDPM's mean uses x_t itself: eps' = (x_t - a_t x0_clipped) / b_t
            noise=noise,
            components=components,
        )
        if not return_dict:
            return (out.prev_sample, out.pred_original_sample)
        return scheduler_output(
            DDPMSchedulerOutput, prev_sample=out.prev_sample, pred_original_sample=out.pred_original_sample
        )


publish(DDPMGMMScheduler, DDPMSchedulerOutput)
