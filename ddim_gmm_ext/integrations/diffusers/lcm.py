"""diffusers integration: :class:`LCMGMMScheduler`, :class:`TCDGMMScheduler` and :class:`FlowMatchLCMGMMScheduler`,
drop-in ``LCMScheduler`` / ``TCDScheduler`` / ``FlowMatchLCMScheduler`` (the few-step consistency samplers) whose
step is one fused ``torch.ops.ddimgmm.step`` call, with the moment-matched mixture where they re-noise.

    from ddim_gmm_ext.diffusers import LCMGMMScheduler
    pipe.scheduler = LCMGMMScheduler.from_config(pipe.scheduler.config, gmm_variant="ortho-vub", seed=0)

The rows. LCM and TCD apply an affine map to the model's x0 before they re-noise: LCM's boundary condition
denoised = c_skip x + c_out x0_hat, TCD's move to s' = floor((1 - gamma) p) on the path (p the next timestep),
a_s' x0_hat + b_s' eps_hat.
Both are y = alpha x - beta m in the model output m for every prediction type, which is the op's epsilon-prediction
x0 = (x - b_t m) / a_t with the row's a_t = 1 / alpha, b_t = beta / alpha (not a point of any path: the op reads
the row as coefficients, and eps_hat = m is not used, B = 0). The op's x0 output is then y, what the stock classes
return as ``denoised`` / ``pred_noised_sample``; the step re-noises y as x_prev = A y + c z, a row (1/alpha,
beta/alpha, A, 0, c). With the GMM, c z is replaced by the moment-matched mixture of the step's parameter set
(same mean and per-coordinate variance of x_prev where c^2 >= g^2 v_k; clipped otherwise, as on DDIM). The
re-noised sample is on the VP path at the next timestep, so the GMM tables enter in their own units (g = 1).
FlowMatchLCMScheduler's step is the flow row (1 - t, t, 1 - s, 0, s) of the op's flow prediction.

Where the op cannot express the step, the stock step runs (GMM off only; a GMM is refused there): LCM with
``clip_sample`` or ``thresholding`` (x0_hat is clipped before the boundary condition; the op would clip y), and
flow-matching LCM with ``scale_factors`` (x0 is resized between steps). TCD's stock step ignores clipping and
thresholding, so every TCD configuration is fused.

Importing this module imports diffusers; ``import ddim_gmm_ext`` does not.
"""

from __future__ import annotations

from numbers import Real
from typing import cast

import torch
from diffusers.schedulers.scheduling_flow_match_lcm import FlowMatchLCMScheduler, FlowMatchLCMSchedulerOutput
from diffusers.schedulers.scheduling_lcm import LCMScheduler, LCMSchedulerOutput
from diffusers.schedulers.scheduling_tcd import TCDScheduler, TCDSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from ._args import (
    check_betas,
    check_optional_step_count,
    check_positive,
    check_shift_terminal,
    check_step_arguments,
    integer_timestep,
    stock_signature,
)
from ._base import (
    CheckedBeginIndexMixin,
    GMMSchedulerMixin,
    HostCounterIndexMixin,
    check_step_count,
    coefficient_rows,
    draw_components,
    publish,
    scheduler_output,
    zero_snr_rows,
)
from ._config import InitArgs, scheduler_init
from .flow_match import flow_schedule, fused_flow_step

__all__ = [
    "FlowMatchLCMGMMScheduler",
    "FlowMatchLCMSchedulerOutput",
    "LCMGMMScheduler",
    "LCMSchedulerOutput",
    "TCDGMMScheduler",
    "TCDSchedulerOutput",
]

#: the prediction types of LCMScheduler and TCDScheduler (their step raises on any other, after the model ran)
_PREDICTIONS = ("epsilon", "sample", "v_prediction")


def _check_prediction(prediction_type, cls_name: str) -> None:
    if prediction_type not in _PREDICTIONS:
        raise ValueError(
            f"prediction_type must be 'epsilon', 'sample' or 'v_prediction' for {cls_name}, got {prediction_type!r}"
        )


def _affine_row(alpha: torch.Tensor, beta: torch.Tensor, a_next, c, g) -> torch.Tensor:
    """[S, 6] float64 rows of y = alpha x - beta m (the op's epsilon x0 with a_t = 1 / alpha, b_t = beta / alpha)
    re-noised as x_prev = a_next y + c z (B = 0: ``coefficient_rows`` with b_s = c)."""
    return coefficient_rows(1 / alpha, beta / alpha, a_next, c, c, g)


def _boundary_terms(prediction_type: str, a_t, b_t):
    """(p, q) of x0_hat = p x - q m on the VP path x = a_t x0 + b_t eps (a_t^2 + b_t^2 = 1), as diffusers'
    LCM / TCD compute x0."""
    if prediction_type == "epsilon":
        return 1 / a_t, b_t / a_t
    if prediction_type == "sample":
        return torch.zeros_like(a_t), -torch.ones_like(a_t)
    return a_t, b_t  # v_prediction


def _eps_terms(prediction_type: str, a_t, b_t):
    """(p, q) of eps_hat = p x - q m, as diffusers' TCD computes it."""
    if prediction_type == "epsilon":
        return torch.zeros_like(a_t), -torch.ones_like(a_t)
    if prediction_type == "sample":
        return 1 / b_t, a_t / b_t
    return b_t, -a_t  # v_prediction


class _FusedConsistencyMixin(GMMSchedulerMixin, HostCounterIndexMixin, CheckedBeginIndexMixin):
    """The step index (the stock host counter) and the noise of the three drop-ins (listed before the stock
    class)."""

    def _noise(self, sample, model_output, generator, gmm, i, draws: bool, dtype):
        """(noise, components) of the step at ``i``: noise drawn as the stock class draws it (``randn_tensor``,
        only where it ``draws``; under compile at every step, where the row's c is 0 on the steps without noise)
        when it comes from torch, None for the op's Philox stream; the GMM's components from the generator."""
        noise = components = None
        if self._torch_noise(generator, gmm):
            if draws or isinstance(i, torch.Tensor):
                noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=dtype)
            else:  # no noise on this step (c = 0): keep the op off the Philox stream
                noise = torch.zeros(sample.shape, device=sample.device, dtype=dtype)
        if gmm is not None:
            if generator is not None:
                components = draw_components(generator, gmm, int(i), sample)
            else:
                self._use_stream(i if isinstance(i, int) else None)
        return noise, components


class _VPConsistencyMixin(_FusedConsistencyMixin):
    """The config (the same keys for LCM and TCD, and the GMM keys) and the ``set_timesteps`` checks of
    :class:`LCMGMMScheduler` and :class:`TCDGMMScheduler`."""

    #: whether the step applies LCM's boundary condition (reads timestep_scaling and original_inference_steps)
    _boundary_condition = False

    @scheduler_init(LCMScheduler)
    def __init__(self, args: InitArgs) -> None:
        _check_prediction(args.prediction_type, type(self).__name__)
        if self._boundary_condition:  # TCD's step reads neither (its config may hold original_inference_steps=None)
            check_positive(args.timestep_scaling, "timestep_scaling")
            check_step_count(args.original_inference_steps, "original_inference_steps")
        super().__init__(**args.stock)
        check_betas(self.betas, args.trained_betas, args.beta_schedule, args.num_train_timesteps)
        self._init_gmm()

    @staticmethod
    def _check_schedule_arguments(num_inference_steps, original_inference_steps, timesteps):
        """``set_timesteps``'s arguments, before the stock class builds the schedule; returns the step count."""
        num_inference_steps = check_optional_step_count(num_inference_steps)
        if original_inference_steps is not None:
            check_step_count(original_inference_steps, "original_inference_steps")
        if timesteps is not None and len(timesteps) == 0:
            raise ValueError("timesteps must hold at least one timestep, got an empty list")
        if timesteps is not None and min(int(t) for t in timesteps) < 0:
            raise ValueError(f"timesteps must be >= 0 (training timesteps), got {list(timesteps)}")
        return num_inference_steps

    def _affine_step(self, model_output, timestep, sample, generator):
        """The fused step of a row y = alpha x - beta m, x_prev = A y + c z (the module docstring) at the step of
        ``timestep``, arguments checked; the op's x0 output is y (LCM's denoised, TCD's pred_noised_sample)."""
        i = self._index(timestep, sample.device)
        gmm = self._gmm_for(sample)
        dtype = torch.promote_types(sample.dtype, model_output.dtype)  # the stock classes' dtype of y and z
        draws = isinstance(i, int) and self._noisy[i]
        noise, components = self._noise(sample, model_output, generator, gmm, i, draws, dtype)
        out = self._fused_step(
            model_output, sample, i, prediction_type="epsilon", gmm=gmm, noise=noise, components=components
        )
        if not isinstance(i, torch.Tensor):
            self._step_index += 1
        return out


class LCMGMMScheduler(_VPConsistencyMixin, LCMScheduler):
    """``LCMScheduler`` with a fused step and the optional moment-matched mixture where it re-noises.

    Every ``LCMScheduler`` config key, default and method is kept; GMM config keys, tables and
    :meth:`set_gmm_params`: see :class:`GMMSchedulerMixin`.

    The step at t (the next timestep p, the sample's VP path a = sqrt(alpha_bar), b = sqrt(1 - alpha_bar)):
    denoised = c_skip x + c_out x0_hat (the boundary condition of ``timestep_scaling``), then
    x_p = a_p denoised + b_p z: the full noise level of p (B = 0, c = b_p), none on the last step of the schedule
    (x_p = denoised). One row (module docstring) per step, for every prediction type; ``original_inference_steps``,
    ``strength``, custom ``timesteps`` and ``set_begin_index`` as the stock class. c_skip and c_out are computed in
    float32 from the timestep tensor, as the stock step computes them from the timestep a pipeline passes.

    The mixture replaces b_p z on every step that re-noises; the last step has no noise, so ``final_step`` changes
    nothing here (the last re-noised sample goes to the model, not to the output).

    Randomness as :class:`DDPMGMMScheduler`: with ``generator`` (one or one per sample), z drawn exactly as the
    stock class draws it (``randn_tensor``, only on steps with noise), then the GMM components from it; GMM off and
    ``seed=None``: z from torch's global RNG as the stock class; otherwise the op's Philox stream.

    Falls back to ``LCMScheduler.step`` (GMM off only; a GMM is refused) where x0_hat is clipped or thresholded
    before the boundary condition (``clip_sample`` / ``thresholding``): clipping inside the op acts on the
    op's x0, which here is the boundary-conditioned y, not x0_hat.
    Zero-SNR schedules with ``prediction_type="epsilon"`` and no clipping: ``set_timesteps`` raises where the
    schedule reaches alpha_bar = 0 (the stock class returns non-finite samples).
    """

    _compatibles = [*LCMScheduler._compatibles, "LCMScheduler"]
    _boundary_condition = True

    def _fallback(self) -> bool:
        return bool(self.config.clip_sample or self.config.thresholding)

    def _gmm_refusal(self, source: str) -> str | None:
        """x0_hat clipped or thresholded before the boundary condition: the step is diffusers' own."""
        if self._fallback():
            return (
                f"{source} needs clip_sample=False and thresholding=False, got clip_sample={self.config.clip_sample}, "
                f"thresholding={self.config.thresholding}: those steps are diffusers' own (x0 is clipped before "
                "the boundary condition), with no fused noise for a mixture to replace"
            )
        return None

    @stock_signature(LCMScheduler.set_timesteps)
    def set_timesteps(
        self, num_inference_steps=None, device=None, original_inference_steps=None, timesteps=None, strength=1.0
    ) -> None:
        """As ``LCMScheduler.set_timesteps``; also builds the [S, 6] coefficient table of the schedule."""
        num_inference_steps = self._check_schedule_arguments(num_inference_steps, original_inference_steps, timesteps)
        super().set_timesteps(num_inference_steps, device, original_inference_steps, timesteps, strength)
        t = self.timesteps.detach().cpu().long()
        n = len(t)
        prev = torch.cat([t[1:], t[-1:]])  # the stock step's previous timestep: t itself after the last
        abar32 = self.alphas_cumprod.detach().cpu()
        abar = abar32.double()
        a_t, b_t = abar[t].sqrt(), (1 - abar[t]).sqrt()
        abar_p = abar[prev]
        # c_skip, c_out in float32 from the timestep tensor, as the stock step computes them from a pipeline's
        scaled = t * self.config.timestep_scaling
        c_skip = (0.25 / (scaled**2 + 0.25)).double()
        c_out = (scaled / (scaled**2 + 0.25) ** 0.5).double()
        p, q = _boundary_terms(self.config.prediction_type, a_t, b_t)
        alpha, beta = c_skip + c_out * p, c_out * q
        # noise on every step but the num_inference_steps-th (stock: step_index != num_inference_steps - 1)
        noisy = torch.ne(torch.arange(n), cast(int, self.num_inference_steps) - 1)
        a_next = torch.where(noisy, abar_p.sqrt(), torch.ones_like(abar_p))
        c = torch.where(noisy, (1 - abar_p).sqrt(), torch.zeros_like(abar_p))
        if not self._fallback():
            zero_snr_rows(a_t, self.config, False, ("rescale_betas_zero_snr", "clip_sample", "thresholding"))
        self._noisy = noisy.tolist()
        self._set_rows(_affine_row(alpha, beta, a_next, c, self._final_step_g(n)).to(self.timesteps.device))

    @stock_signature(LCMScheduler.step)
    def step(self, model_output, timestep, sample, generator=None, return_dict=True) -> LCMSchedulerOutput | tuple:
        """One LCM(-GMM) step; arguments and outputs as ``LCMScheduler.step``."""
        self._check_gmm_ready()
        if self._rows is None or self._fallback():
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        generator = check_step_arguments(model_output, sample, generator)
        out = self._affine_step(model_output, timestep, sample, generator)
        if not return_dict:
            return (out.prev_sample, out.pred_original_sample)
        return scheduler_output(LCMSchedulerOutput, prev_sample=out.prev_sample, denoised=out.pred_original_sample)


class TCDGMMScheduler(_VPConsistencyMixin, TCDScheduler):
    """``TCDScheduler`` with a fused step and the optional moment-matched mixture where it re-noises.

    Every ``TCDScheduler`` config key, default and method is kept; GMM config keys, tables and
    :meth:`set_gmm_params`: see :class:`GMMSchedulerMixin`.

    The step at t with ``eta`` (the paper's gamma, a ``step`` argument as in the stock class) and the next timestep
    p (0 after the last): s' = floor((1 - eta) p), y = a_s' x0_hat + b_s' eps_hat (``pred_noised_sample``), then
    x_p = sqrt(abar_p / abar_s') y + sqrt(1 - abar_p / abar_s') z, which is on the VP path at p; no noise on the
    last step or with eta = 0 (x_p = y). One row per step (module docstring) for every prediction type. The
    stock step ignores ``clip_sample`` and ``thresholding``, and so does this one.

    The rows depend on eta: ``set_timesteps`` builds them for the stock default 0.3, and a step with another eta
    rebuilds them, which begins a run (seed=None: a fresh stream seed), so a loop keeps one eta, as pipelines do.
    A compiled loop with another eta calls ``prepare_gmm(sample, eta=eta)`` first. eta = 0 is deterministic: a
    GMM is refused there (ValueError at the step or at ``prepare_gmm``), with no noise to replace.

    Randomness as :class:`LCMGMMScheduler` (noise drawn only where the stock step draws it: eta > 0, not the last
    step).
    """

    _compatibles = [*TCDScheduler._compatibles, "TCDScheduler"]

    #: the stock step's default eta: set_timesteps builds the rows for it
    _DEFAULT_ETA = 0.3
    _row_eta: float | None = None  # the eta of the installed rows

    @staticmethod
    def _check_eta(eta) -> float:
        if isinstance(eta, torch.Tensor) and eta.numel() == 1 and not torch.compiler.is_compiling():
            eta = eta.item()
        if isinstance(eta, bool) or not isinstance(eta, Real) or not 0 <= float(eta) <= 1:
            raise ValueError(f"eta (TCD's gamma) must be a number in [0, 1], got {eta!r}")
        return float(eta)

    @staticmethod
    def _no_noise(source: str) -> str:
        return (
            f"{source}: TCD with eta (gamma) = 0 is deterministic (no noise at any step), so a Gaussian mixture has "
            "no noise to replace and its offsets would land on the sample uncompensated; pass eta > 0 to step (a "
            "pipeline passes its own eta argument, 0 by default)"
        )

    def _gmm_refusal(self, source: str) -> str | None:
        """The installed rows are eta = 0's (the step's eta decides; set_timesteps installs 0.3's)."""
        return self._no_noise(source) if self._row_eta == 0 else None

    def _gmm_configured(self) -> str | None:
        """The source of a configured GMM, as :meth:`_gmm_refusal` names it; None when off."""
        if self._user_gmm is not None:
            return "set_gmm_params"
        v = self._gmm_options.variant
        return None if v is None else f"gmm_variant={v!r}"

    @stock_signature(TCDScheduler.set_timesteps)
    def set_timesteps(
        self, num_inference_steps=None, device=None, original_inference_steps=None, timesteps=None, strength=1.0
    ) -> None:
        """As ``TCDScheduler.set_timesteps``; also builds the coefficient table for eta = 0.3 (the stock step's
        default; a step with another eta rebuilds it)."""
        num_inference_steps = self._check_schedule_arguments(num_inference_steps, original_inference_steps, timesteps)
        super().set_timesteps(num_inference_steps, device, original_inference_steps, timesteps, strength)
        a_t = self.alphas_cumprod.detach().cpu().double()[self.timesteps.detach().cpu().long()].sqrt()
        if self.config.prediction_type == "epsilon" and bool((a_t == 0).any()):
            raise ValueError(
                f"the schedule reaches a zero-SNR timestep (alpha_bar = 0, rescale_betas_zero_snr="
                f"{self.config.rescale_betas_zero_snr}) with prediction_type='epsilon': x0 = (x - b_t m) / a_t is "
                "infinite there (the stock scheduler returns non-finite samples). Use prediction_type='v_prediction'"
            )
        self._install_eta(self._DEFAULT_ETA)

    def _install_eta(self, eta: float) -> None:
        """Rows of the schedule for ``eta`` (a new run: :meth:`GMMSchedulerMixin._set_rows`)."""
        t = self.timesteps.detach().cpu().long()
        n = len(t)
        prev = torch.cat([t[1:], t.new_zeros(1)])  # the stock step's previous timestep: 0 after the last
        s = torch.floor((1 - eta) * prev).to(torch.long)  # float32, as the stock step computes it
        abar = self.alphas_cumprod.detach().cpu().double()
        a_t, b_t = abar[t].sqrt(), (1 - abar[t]).sqrt()
        a_s, b_s = abar[s].sqrt(), (1 - abar[s]).sqrt()
        px, qx = _boundary_terms(self.config.prediction_type, a_t, b_t)
        pe, qe = _eps_terms(self.config.prediction_type, a_t, b_t)
        alpha, beta = a_s * px + b_s * pe, a_s * qx + b_s * qe
        ratio = abar[prev] / abar[s]
        noisy = torch.ne(torch.arange(n), cast(int, self.num_inference_steps) - 1) & (eta > 0)
        a_next = torch.where(noisy, ratio.sqrt(), torch.ones_like(ratio))
        c = torch.where(noisy, (1 - ratio).clamp(min=0).sqrt(), torch.zeros_like(ratio))
        self._noisy = noisy.tolist()
        self._row_eta = eta
        self._set_rows(_affine_row(alpha, beta, a_next, c, self._final_step_g(n)).to(self.timesteps.device))

    def _use_eta(self, eta: float) -> None:
        """Refuse a GMM at eta = 0 (before any work); install ``eta``'s rows if they are not the ones in use."""
        source = self._gmm_configured()
        if eta == 0 and source is not None:
            raise ValueError(self._no_noise(source))
        if eta != self._row_eta:
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    f"the TCD rows are built for eta={self._row_eta} but the compiled step got eta={eta}: call "
                    "scheduler.prepare_gmm(sample, eta=eta) after set_timesteps, before the compiled loop"
                )
            self._install_eta(eta)

    def prepare_gmm(self, sample: torch.Tensor, eta: float = _DEFAULT_ETA):
        """:meth:`GMMSchedulerMixin.prepare_gmm` for the steps' ``eta`` (their rows are built here)."""
        if self._rows is None:
            raise ValueError("call set_timesteps before prepare_gmm")
        self._use_eta(self._check_eta(eta))
        return super().prepare_gmm(sample)

    @stock_signature(TCDScheduler.step)
    def step(
        self, model_output, timestep, sample, eta=0.3, generator=None, return_dict=True
    ) -> TCDSchedulerOutput | tuple:
        """One TCD(-GMM) step; arguments and outputs as ``TCDScheduler.step``."""
        self._check_gmm_ready()
        if self._rows is None:  # the stock step's "call set_timesteps" error
            return super().step(model_output, timestep, sample, eta, generator=generator, return_dict=return_dict)
        eta = self._check_eta(eta)
        generator = check_step_arguments(model_output, sample, generator)
        self._use_eta(eta)
        out = self._affine_step(model_output, timestep, sample, generator)
        if not return_dict:
            return (out.prev_sample, out.pred_original_sample)
        return scheduler_output(
            TCDSchedulerOutput, prev_sample=out.prev_sample, pred_noised_sample=out.pred_original_sample
        )


class FlowMatchLCMGMMScheduler(_FusedConsistencyMixin, FlowMatchLCMScheduler):
    """``FlowMatchLCMScheduler`` with a fused step and the optional moment-matched mixture where it re-noises.

    Every ``FlowMatchLCMScheduler`` config key, default and method is kept; GMM config keys, tables and
    :meth:`set_gmm_params`: see :class:`GMMSchedulerMixin`.

    The step from sigma = t to the next sigma s on the flow path x = (1 - t) x0 + t eps with the velocity v:
    x0 = x - t v, x_s = (1 - s) x0 + s z, the full noise level of s at every step (the row (1 - t, t, 1 - s, 0, s),
    :class:`FlowMatchEulerDiscreteGMMScheduler`'s rfim_eta = 1 row; z is drawn on the last step too, where s is 0
    unless ``invert_sigmas``). With the GMM, s z is replaced by the mixture. Custom ``sigmas`` / ``timesteps``,
    ``mu`` and ``set_begin_index`` as the stock class; the sample is upcast to float32 and the result cast to the
    model's dtype, as there.

    Falls back to ``FlowMatchLCMScheduler.step`` (GMM off only; a GMM is refused) with scale-wise generation
    (``scale_factors`` / :meth:`set_scale_factors`): x0 is resized between steps, not one row.
    """

    _compatibles = [*FlowMatchLCMScheduler._compatibles, "FlowMatchLCMScheduler"]

    @scheduler_init(FlowMatchLCMScheduler)
    def __init__(self, args: InitArgs) -> None:
        check_positive(args.shift, "shift")
        check_shift_terminal(args.shift_terminal)
        super().__init__(**args.stock)
        self._init_gmm()

    def _scale_wise(self) -> bool:
        return bool(self._scale_factors and self._upscale_mode)

    def _gmm_refusal(self, source: str) -> str | None:
        if getattr(self, "_scale_factors", None) or self.config.scale_factors:
            return (
                f"{source} needs scale_factors=None: scale-wise generation resizes x0 between steps, a step of "
                "diffusers' own with no fused noise for a mixture to replace"
            )
        return None

    def set_scale_factors(self, scale_factors: list[float], upscale_mode) -> None:
        """As the stock class; refused while a GMM is configured (the scale-wise step is diffusers' own)."""
        if scale_factors and (self._user_gmm is not None or self._gmm_options.variant is not None):
            raise ValueError(
                f"set_scale_factors({scale_factors!r}): scale-wise generation is diffusers' own step, with no fused "
                f"noise for a mixture to replace; this scheduler has a GMM (gmm_variant={self.config.gmm_variant!r})"
            )
        super().set_scale_factors(scale_factors, upscale_mode)

    @stock_signature(FlowMatchLCMScheduler.set_timesteps)
    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None) -> None:
        """As ``FlowMatchLCMScheduler.set_timesteps``; also builds the [S, 6] coefficient table."""
        sig = flow_schedule(self, super().set_timesteps, num_inference_steps, device, sigmas, mu, timesteps)
        t, s = sig[:-1], sig[1:]
        self._set_rows(coefficient_rows(1 - t, t, 1 - s, s, s, self._final_step_g(len(t))).to(self.sigmas.device))

    @stock_signature(FlowMatchLCMScheduler.step)
    def step(
        self, model_output, timestep, sample, generator=None, return_dict=True
    ) -> FlowMatchLCMSchedulerOutput | tuple:
        """One flow-matching LCM(-GMM) step; arguments and outputs as ``FlowMatchLCMScheduler.step``."""
        if self._row_table is None or integer_timestep(timestep) or self._scale_wise():
            self._check_gmm_ready()  # before set_timesteps a GMM is refused rather than dropped
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        generator = check_step_arguments(model_output, sample, generator, check_sample=True)
        if self._init_size is None or self._step_index is None:  # as the stock step (for set_scale_factors later)
            self._init_size = model_output.size()[2:]
        if sample.dtype != torch.float32:  # as the stock step: the update in float32
            sample = sample.to(torch.float32)
        i = self._index(timestep, sample.device)
        gmm = self._gmm_for(sample)
        noise, components = self._noise(sample, model_output, generator, gmm, i, True, torch.float32)
        return fused_flow_step(
            self, model_output, sample, i, gmm, noise, components, FlowMatchLCMSchedulerOutput, return_dict
        )


publish(LCMGMMScheduler, LCMSchedulerOutput)
publish(TCDGMMScheduler, TCDSchedulerOutput)
publish(FlowMatchLCMGMMScheduler, FlowMatchLCMSchedulerOutput)
