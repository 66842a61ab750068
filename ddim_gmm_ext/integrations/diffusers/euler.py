"""diffusers integration: :class:`EulerDiscreteGMMScheduler` and :class:`EulerAncestralDiscreteGMMScheduler`,
drop-in ``EulerDiscreteScheduler`` / ``EulerAncestralDiscreteScheduler`` whose step is one fused
``torch.ops.ddimgmm.step`` call.

Both samplers work on the variance-exploding path x = x0 + sigma eps (x_VE = x_VP / a, sigma = b / a); one step
sigma -> sigma_next is a row of the op's table in those units: (a_t, b_t, A, B, c) = (1, sigma, 1, B, c) with

* Euler (s_churn = 0): x_next = x0_hat + sigma_next eps_hat, B = sigma_next, c = 0;
* Euler ancestral: sigma_up = sigma_next sqrt(sigma^2 - sigma_next^2) / sigma,
  sigma_down = sqrt(sigma_next^2 - sigma_up^2): x_next = x0_hat + sigma_down eps_hat + sigma_up z,
  B = sigma_down, c = sigma_up.

Importing this module imports diffusers; ``import ddim_gmm_ext`` does not.
"""

from __future__ import annotations

import torch
from diffusers.schedulers.scheduling_euler_ancestral_discrete import (
    EulerAncestralDiscreteScheduler,
    EulerAncestralDiscreteSchedulerOutput,
)
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler, EulerDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .._common import stream_seed
from ._base import GMMSchedulerMixin, check_step_count, register_with_diffusers

__all__ = [
    "EulerAncestralDiscreteGMMScheduler",
    "EulerAncestralDiscreteSchedulerOutput",
    "EulerDiscreteGMMScheduler",
    "EulerDiscreteSchedulerOutput",
]


class _FusedEulerMixin(GMMSchedulerMixin):
    """The VE row table and the fused step shared by the two Euler schedulers.

    These schedulers keep their base class's ``__init__`` (every config key and default) and take no GMM keys:
    the Gaussian step only. The fused step covers ``prediction_type`` "epsilon" and "sample" (x0 from the op's
    VP-free formulas with a_t = 1); "v_prediction" (x0 = x / (1 + sigma^2) - sigma v / sqrt(1 + sigma^2), not of
    the op's a_t x - b_t v form with a_t^2 + b_t^2 = 1 in VE units) falls back to the base class's step.
    """

    _fused_prediction_types: tuple[str, ...] = ("epsilon", "sample")

    def _install_rows(self, big_b: torch.Tensor, c: torch.Tensor) -> None:
        """[S, 6] float64 rows (1, sigma, 1, B, c, 1) from [S] B and c; the GMM state is reset (GMM off)."""
        sigma = self.sigmas.detach().to("cpu", torch.float64)[:-1]
        one = torch.ones_like(sigma)
        rows = torch.stack([one, sigma, one, big_b, c, one], dim=-1)
        self._user_gmm = self._built_gmm = self._built_key = None
        self._rows = rows
        self._tables = {}
        self._stream_seed = stream_seed(None)  # drawn from torch's default generator, as the GMM schedulers' seed=None

    def _gmm_for(self, sample):
        return None

    def _fusable(self) -> bool:
        return getattr(self, "_rows", None) is not None and self.config.prediction_type in self._fused_prediction_types

    def _fused(self, model_output, timestep, sample, noise):
        """The step at ``self.step_index`` (initialised from ``timestep`` as the base class does) as one op call;
        sample upcast to float32 and the result cast back to the model's dtype, as the base class does."""
        if self.step_index is None:
            self._init_step_index(timestep)
        i = self.step_index
        out = self._fused_step(
            model_output,
            sample.to(torch.float32),
            i,
            prediction_type=self.config.prediction_type,
            gmm=None,
            noise=noise,
        )
        self._step_index += 1
        return out.prev_sample.to(model_output.dtype), out.pred_original_sample


class EulerDiscreteGMMScheduler(_FusedEulerMixin, EulerDiscreteScheduler):
    """``EulerDiscreteScheduler`` with a fused step (see the module docstring for the row).

    Falls back to ``EulerDiscreteScheduler.step`` when the step adds churn noise (``s_churn > 0`` with sigma in
    [s_tmin, s_tmax]: the sample is moved up to sigma_hat before the model's prediction is used, so the step is
    not one row) and for ``prediction_type="v_prediction"``. Outputs equal the base class's otherwise.
    """

    _compatibles = [*EulerDiscreteScheduler._compatibles, "EulerDiscreteScheduler"]

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None) -> None:
        """As ``EulerDiscreteScheduler.set_timesteps``; also builds the [S, 6] row table."""
        if num_inference_steps is not None:
            num_inference_steps = check_step_count(num_inference_steps)
        super().set_timesteps(
            num_inference_steps=num_inference_steps, device=device, timesteps=timesteps, sigmas=sigmas
        )
        sigma_next = self.sigmas.detach().to("cpu", torch.float64)[1:]
        self._install_rows(sigma_next, torch.zeros_like(sigma_next))

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> EulerDiscreteSchedulerOutput | tuple:
        """One Euler step; arguments and outputs as ``EulerDiscreteScheduler.step``."""
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)) or not self._fusable() or s_churn > 0:
            return super().step(
                model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator, return_dict
            )
        prev, x0 = self._fused(model_output, timestep, sample, None)
        if not return_dict:
            return (prev, x0)
        return EulerDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class EulerAncestralDiscreteGMMScheduler(_FusedEulerMixin, EulerAncestralDiscreteScheduler):
    """``EulerAncestralDiscreteScheduler`` with a fused step (see the module docstring for the row).

    Randomness: ``generator``: z drawn exactly as the base class draws it (``randn_tensor`` at every step), so
    outputs equal the base class's for the same generator; no generator: z from the op's Philox stream (stream
    seed drawn from torch's default generator at ``set_timesteps``). ``prediction_type="v_prediction"`` and
    "sample" fall back to the base class's step (which refuses "sample").
    """

    _compatibles = [*EulerAncestralDiscreteScheduler._compatibles, "EulerAncestralDiscreteScheduler"]
    _fused_prediction_types: tuple[str, ...] = ("epsilon",)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """As ``EulerAncestralDiscreteScheduler.set_timesteps``; also builds the [S, 6] row table."""
        num_inference_steps = check_step_count(num_inference_steps)
        super().set_timesteps(num_inference_steps, device)  # type: ignore[arg-type]  # diffusers annotates this narrower than it accepts
        s = self.sigmas.detach().to("cpu", torch.float64)
        s_from, s_to = s[:-1], s[1:]
        up = (s_to.square() * (s_from.square() - s_to.square()) / s_from.square()).clamp(min=0).sqrt()
        down = (s_to.square() - up.square()).clamp(min=0).sqrt()
        self._install_rows(down, up)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> EulerAncestralDiscreteSchedulerOutput | tuple:
        """One Euler ancestral step; arguments and outputs as ``EulerAncestralDiscreteScheduler.step``."""
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)) or not self._fusable():
            return super().step(model_output, timestep, sample, generator, return_dict)
        noise = None
        if generator is not None:
            noise = randn_tensor(
                model_output.shape, dtype=model_output.dtype, device=model_output.device, generator=generator
            )
        prev, x0 = self._fused(model_output, timestep, sample, noise)
        if not return_dict:
            return (prev, x0)
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


register_with_diffusers(EulerDiscreteGMMScheduler, "EulerDiscreteScheduler")
register_with_diffusers(EulerAncestralDiscreteGMMScheduler, "EulerAncestralDiscreteScheduler")
