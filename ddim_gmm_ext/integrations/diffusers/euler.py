"""diffusers integration: :class:`EulerDiscreteGMMScheduler` and :class:`EulerAncestralDiscreteGMMScheduler`,
drop-in ``EulerDiscreteScheduler`` / ``EulerAncestralDiscreteScheduler`` whose step is one fused
``torch.ops.ddimgmm.step`` call.

Both samplers work on the variance-exploding path x = x0 + sigma eps (x_VE = x_VP / a, sigma = b / a); one step
sigma -> sigma_next is a row of the op's table in those units: (a_t, b_t, A, B, c) = (1, sigma, 1, B, c) with

* Euler (s_churn = 0): x_next = x0_hat + sigma_next eps_hat, B = sigma_next, c = 0;
* Euler ancestral: sigma_up = sigma_next sqrt(sigma^2 - sigma_next^2) / sigma,
  sigma_down = sqrt(sigma_next^2 - sigma_up^2): x_next = x0_hat + sigma_down eps_hat + sigma_up z,
  B = sigma_down, c = sigma_up. With GMM the mixture replaces sigma_up z; its tables are in VP units, so in VE
  units the offsets are scaled by g = 1 / a_next = sqrt(1 + sigma_next^2) (variance offsets by g^2).

v_prediction is fused too: with a_t = 1 and b_t = sigma the op's x0 = (x - sigma n v) / n^2, n^2 = 1 + sigma^2,
is diffusers' x / (1 + sigma^2) - sigma v / sqrt(1 + sigma^2).

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

from ._args import check_optional_step_count, stock_signature
from ._base import (
    CheckedBeginIndexMixin,
    DeterministicMixin,
    FusedStepMixin,
    GMMSchedulerMixin,
    check_generator,
    check_host_step,
    check_model_output,
    check_step_count,
    publish,
    scheduler_output,
)
from ._config import InitArgs, scheduler_init

__all__ = [
    "EulerAncestralDiscreteGMMScheduler",
    "EulerAncestralDiscreteSchedulerOutput",
    "EulerDiscreteGMMScheduler",
    "EulerDiscreteSchedulerOutput",
]


class _FusedEulerMixin(FusedStepMixin, CheckedBeginIndexMixin):
    """The VE row table and the fused step shared by the two Euler schedulers.

    The fused step covers ``prediction_type`` "epsilon", "sample" (Euler) and "v_prediction".
    """

    _fused_prediction_types: tuple[str, ...] = ("epsilon", "sample", "v_prediction")

    def _install_rows(self, big_b: torch.Tensor, c: torch.Tensor, g: torch.Tensor | None = None) -> None:
        """[S, 6] float64 rows (1, sigma, 1, B, c, g) from [S] B, c and GMM scales g (default 1)."""
        sigma = self.sigmas.detach().to("cpu", torch.float64)[:-1]
        one = torch.ones_like(sigma)
        self._set_rows(torch.stack([one, sigma, one, big_b, c, one if g is None else g], dim=-1))

    def _fusable(self) -> bool:
        return self._row_table is not None and self.config.prediction_type in self._fused_prediction_types

    def _noise(self, model_output, sample, i: int, generator):
        """(gmm, noise, components) of step ``i``: none (Euler draws no noise; Euler ancestral's override)."""
        return None, None, None

    def _fused(self, model_output, timestep, sample, generator):
        """The step at ``self.step_index`` (initialised from ``timestep`` as the base class does) as one op call;
        sample upcast to float32 and the result cast back to the model's dtype, as the base class does.
        ``generator`` (ancestral only): a torch.Generator or None (the global RNG or the Philox stream, see
        :meth:`GMMSchedulerMixin._torch_noise`)."""
        check_model_output(model_output, sample)
        if self.step_index is None:
            self._init_step_index(timestep)
        i = self.step_index
        check_host_step(i, self._n_steps())  # stock: an IndexError at the sigma lookup
        # the base class computes in float32 and promotes with the model output: float64 x0 for a float64 model
        if sample.dtype != torch.float32:  # tested first: a .to that changes nothing still costs a call
            sample = sample.to(torch.float32)
        if model_output.dtype == torch.float64:
            sample = sample.double()
        gmm, noise, components = self._noise(model_output, sample, i, generator)
        out = self._fused_step(
            model_output,
            sample,
            i,
            prediction_type=self.config.prediction_type,
            gmm=gmm,
            noise=noise,
            components=components,
        )
        self._step_index += 1
        prev = out.prev_sample
        return prev if prev.dtype == model_output.dtype else prev.to(model_output.dtype), out.pred_original_sample


class EulerDiscreteGMMScheduler(DeterministicMixin, _FusedEulerMixin, EulerDiscreteScheduler):
    """``EulerDiscreteScheduler`` with a fused step (see the module docstring for the row).

    Falls back to ``EulerDiscreteScheduler.step`` when the step adds churn noise (``s_churn > 0`` with sigma in
    [s_tmin, s_tmax]: the sample is moved up to sigma_hat before the model's prediction is used, so the step is
    not one row) and for ``prediction_type="v_prediction"``. Outputs equal the base class's otherwise.
    """

    _compatibles = [*EulerDiscreteScheduler._compatibles, "EulerDiscreteScheduler"]

    def _gmm_refusal(self, source: str) -> str:
        return (
            f"{source}: EulerDiscreteGMMScheduler is deterministic (no noise at any step, s_churn = 0), so a "
            "Gaussian mixture has no noise to replace and its offsets would land on the sample uncompensated; use "
            "EulerAncestralDiscreteGMMScheduler"
        )

    @stock_signature(EulerDiscreteScheduler.set_timesteps)
    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None) -> None:
        """As ``EulerDiscreteScheduler.set_timesteps``; also builds the [S, 6] row table."""
        num_inference_steps = check_optional_step_count(num_inference_steps)
        super().set_timesteps(
            num_inference_steps=num_inference_steps, device=device, timesteps=timesteps, sigmas=sigmas
        )
        sigma_next = self.sigmas.detach().to("cpu", torch.float64)[1:]
        self._install_rows(sigma_next, torch.zeros_like(sigma_next))

    @stock_signature(EulerDiscreteScheduler.step)
    def step(
        self,
        model_output,
        timestep,
        sample,
        s_churn=0.0,
        s_tmin=0.0,
        s_tmax=float("inf"),
        s_noise=1.0,
        generator=None,
        return_dict=True,
    ) -> EulerDiscreteSchedulerOutput | tuple:
        """One Euler step; arguments and outputs as ``EulerDiscreteScheduler.step``."""
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)) or not self._fusable() or s_churn > 0:
            return super().step(
                model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator, return_dict
            )
        prev, x0 = self._fused(model_output, timestep, sample, None)
        if not return_dict:
            return (prev, x0)
        return scheduler_output(EulerDiscreteSchedulerOutput, prev_sample=prev, pred_original_sample=x0)


class EulerAncestralDiscreteGMMScheduler(GMMSchedulerMixin, _FusedEulerMixin, EulerAncestralDiscreteScheduler):
    """``EulerAncestralDiscreteScheduler`` with a fused step (see the module docstring for the row).

    Randomness: ``generator``: z drawn exactly as the base class draws it (``randn_tensor`` at every step), so
    outputs equal the base class's for the same generator, and the GMM components are drawn from it too. No
    generator, GMM off and ``seed=None``: z from torch's global RNG, as the base class draws it. No generator
    otherwise: z and k from the op's Philox stream (the ``seed`` config key, or a stream seed drawn from torch's
    global RNG at the first step). GMM config keys as :class:`DDIMGMMScheduler` (``gmm_variant``,
    ``gmm_n_components``, ``gmm_scale`` / ``gmm_scale_per_dim``, ``final_step``, ``seed``); a GMM configured
    before ``set_timesteps`` makes ``step`` raise.
    ``prediction_type="sample"`` falls back to the base class's step (which refuses it).
    """

    _compatibles = [*EulerAncestralDiscreteScheduler._compatibles, "EulerAncestralDiscreteScheduler"]
    _fused_prediction_types = ("epsilon", "v_prediction")  # the base class refuses "sample"

    @scheduler_init(EulerAncestralDiscreteScheduler)
    def __init__(self, args: InitArgs) -> None:
        super().__init__(**args.stock)
        self._init_gmm()

    @stock_signature(EulerAncestralDiscreteScheduler.set_timesteps)
    def set_timesteps(self, num_inference_steps, device=None) -> None:
        """As ``EulerAncestralDiscreteScheduler.set_timesteps``; also builds the [S, 6] row table (GMM scale
        g = sqrt(1 + sigma_next^2), 0 on the last step with ``final_step="gaussian"``)."""
        num_inference_steps = check_step_count(num_inference_steps)
        super().set_timesteps(num_inference_steps, device)
        s = self.sigmas.detach().to("cpu", torch.float64)
        s_from, s_to = s[:-1], s[1:]
        up = (s_to.square() * (s_from.square() - s_to.square()) / s_from.square()).clamp(min=0).sqrt()
        down = (s_to.square() - up.square()).clamp(min=0).sqrt()
        g = (1 + s_to.square()).sqrt() * self._final_step_g(len(s_to))
        self._install_rows(down, up, g)

    def _noise(self, model_output, sample, i: int, generator):
        """(gmm, noise, components) of step ``i``: z drawn exactly as the base class draws it, or the Philox
        stream's (see :meth:`GMMSchedulerMixin._torch_noise`)."""
        gmm = self._gmm_for(sample)
        noise = None
        if self._torch_noise(generator, gmm):
            noise = randn_tensor(
                model_output.shape, dtype=model_output.dtype, device=model_output.device, generator=generator
            )
        components = self._gmm_components(generator, gmm, i, sample)
        return gmm, noise, components

    @stock_signature(EulerAncestralDiscreteScheduler.step)
    def step(
        self, model_output, timestep, sample, generator=None, return_dict=True
    ) -> EulerAncestralDiscreteSchedulerOutput | tuple:
        """One Euler ancestral step; arguments and outputs as ``EulerAncestralDiscreteScheduler.step``."""
        self._check_gmm_ready()
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)) or not self._fusable():
            return super().step(model_output, timestep, sample, generator, return_dict)
        if generator is not None:
            generator = check_generator(generator, sample.shape[0])
        prev, x0 = self._fused(model_output, timestep, sample, generator)
        if not return_dict:
            return (prev, x0)
        return scheduler_output(EulerAncestralDiscreteSchedulerOutput, prev_sample=prev, pred_original_sample=x0)


publish(EulerDiscreteGMMScheduler, EulerDiscreteSchedulerOutput)
publish(EulerAncestralDiscreteGMMScheduler, EulerAncestralDiscreteSchedulerOutput)
