"""diffusers integration: :class:`EDMEulerGMMScheduler` and :class:`EDMDPMSolverMultistepGMMScheduler`, drop-in
``EDMEulerScheduler`` / ``EDMDPMSolverMultistepScheduler`` (Karras et al. 2022's preconditioning) whose step is one
fused ``torch.ops.ddimgmm.step`` call per model evaluation.

Both samplers work on the variance-exploding path x = x0 + sigma eps with EDM's preconditioned denoiser
x0 = c_skip x + c_out F (F the network output; c_skip = sd^2 / (sigma^2 + sd^2), c_out = +-sigma sd /
sqrt(sigma^2 + sd^2), + for "epsilon", - for "v_prediction", sd = ``sigma_data``). That is the op's "epsilon" row
with a_t = 1 / c_skip and b_t = -c_out / c_skip: x0_hat = (x - b_t F) / a_t, for any sigma_data and both
prediction types (the op's "v_prediction" on the path's own a_t = 1, b_t = sigma is EDM's only for sd = 1).

Every step of both samplers is x_s = X x + w0 x0_hat + w1 h1 + w2 h2 + c z (h1, h2 the previous data predictions
of the multistep solver; Euler: X = sigma_s / sigma, w0 = 1 - X). With the EDM row the x term cannot be folded
into the op's A, B as the other drop-ins do: at large sigma x0_hat and eps_hat = F carry x with weights c_skip
(4e-5 at sigma 80) and 0, so A x0_hat + B eps_hat = X x would cancel terms 1e4 times larger than the result
(float32 loops from sigma 80 were 4-50x farther from float64 than diffusers'). The sample goes into the op as its
history slot instead:

    row (a_t, b_t, A, B, c, g, H1, H2) = (1 / c_skip, -c_out / c_skip, w0, 0, c, g, X, 0),
    history h = x + (w1 / X) h1 + (w2 / X) h2

(Euler and first-order steps: h = x; the multistep terms are added to x in torch, one pass per term: the op's
two-history form costs several times its one-history form on CPU). Dynamic thresholding takes x0_hat from
diffusers' torch code and gives the op that as a "sample" prediction (the same row: B = 0).

Importing this module imports diffusers; ``import ddim_gmm_ext`` does not.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
import torch
from diffusers.schedulers.scheduling_edm_dpmsolver_multistep import EDMDPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_edm_euler import EDMEulerScheduler, EDMEulerSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from .._common import multistep_weights
from ._args import (
    check_optional_step_count,
    check_sample_tensor,
    check_solver_order,
    check_step_arguments,
    check_timesteps_set,
    stock_signature,
)
from ._base import (
    CheckedBeginIndexMixin,
    GMMSchedulerMixin,
    check_host_step,
    check_model_output,
    check_step_count,
    draw_components,
    publish,
    scheduler_output,
)
from ._config import InitArgs, scheduler_init
from ._multistep import multistep_output
from .dpm_multistep import DPMSolverMultistepGMMScheduler, _solver_coefficients

__all__ = ["EDMDPMSolverMultistepGMMScheduler", "EDMEulerGMMScheduler", "EDMEulerSchedulerOutput"]

logger = logging.get_logger(__name__)

#: the prediction types of diffusers' EDM preconditioning (``precondition_outputs`` raises for any other)
_EDM_PREDICTIONS = ("epsilon", "v_prediction")


def _check_edm_config(sigma_data, sigma_schedule, prediction_type, final_sigmas_type) -> None:
    """The EDM config keys diffusers reads only at a later step (or never checks), refused at construction."""
    if isinstance(sigma_data, bool) or not isinstance(sigma_data, Real) or not 0 < float(sigma_data) < math.inf:
        raise ValueError(f"sigma_data must be a finite number > 0 (the data's standard deviation), got {sigma_data!r}")
    if sigma_schedule not in ("karras", "exponential"):
        raise ValueError(f"sigma_schedule must be 'karras' or 'exponential', got {sigma_schedule!r}")
    if prediction_type not in _EDM_PREDICTIONS:
        raise ValueError(
            f"prediction_type must be 'epsilon' or 'v_prediction' (the EDM preconditioning's c_out), got "
            f"{prediction_type!r}"
        )
    if final_sigmas_type not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")


def _check_edm_sigmas(scheduler, argument: str | None = None) -> None:
    """At ``set_timesteps``: every step's sigma finite and > 0, the final one finite and >= 0 (EDM's x0 and the
    step divide by sigma: diffusers returns NaN samples otherwise). ValueError naming the config keys (and
    ``argument``, the set_timesteps argument that gave them)."""
    sigma = scheduler.sigmas.detach().to("cpu", torch.float64)
    bad = ~torch.isfinite(sigma) | (sigma < 0)
    bad[:-1] |= sigma[:-1] == 0
    if not bool(bad.any()):
        return
    where = bad.nonzero().flatten().tolist()
    shown = ", ".join(f"sigmas[{i}] = {sigma[i].item()}" for i in where[:4]) + (", ..." if len(where) > 4 else "")
    c = scheduler.config
    raise ValueError(
        f"the schedule's sigmas must be finite and > 0 (the last one >= 0), got {shown} from "
        f"{f'the {argument} argument and ' if argument else ''}the config (sigma_min={c.sigma_min!r}, "
        f"sigma_max={c.sigma_max!r}, rho={c.rho!r}, sigma_schedule={c.sigma_schedule!r}): the samples would be "
        "non-finite. Use 0 < sigma_min <= sigma_max"
    )


def _edm_row_head(scheduler) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[S+1] float64 sigmas, and [S] a_t = 1 / c_skip, b_t = -c_out / c_skip of every step (module docstring)."""
    c = scheduler.config
    sigma = scheduler.sigmas.detach().to("cpu", torch.float64)
    s = sigma[:-1]
    sd2 = float(c.sigma_data) ** 2
    norm2 = s.square() + sd2
    sign = 1.0 if c.prediction_type == "epsilon" else -1.0
    return sigma, norm2 / sd2, -sign * s * norm2.sqrt() / float(c.sigma_data)


def _compute_sample(sample: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
    """The sample in the dtype the step computes in: float64 where either side is, else float32."""
    dt = torch.float64 if torch.float64 in (sample.dtype, model_output.dtype) else torch.float32
    return sample if sample.dtype == dt else sample.to(dt)


class EDMEulerGMMScheduler(GMMSchedulerMixin, CheckedBeginIndexMixin, EDMEulerScheduler):
    """``EDMEulerScheduler`` with a fused step (module docstring for the row): x_next = X x + (1 - X) x0_hat,
    X = sigma_next / sigma. Every config key and method of the stock class is kept.

    Deterministic: a GMM (:meth:`set_gmm_params`) is refused, there is no noise to replace. Falls back to
    ``EDMEulerScheduler.step`` where the step adds churn noise (``s_churn > 0``: the sample is moved to sigma_hat
    before the model's prediction is used, so the step is not one row) and for integer timesteps (which the stock
    step refuses). ``pred_original_sample`` given: the op takes it as the step's data prediction.
    ``set_timesteps(sigmas=...)`` takes the stock class's ramp (values in [0, 1] of the sigma schedule) as a tensor,
    a list or a number.
    """

    _compatibles = [*EDMEulerScheduler._compatibles, "EDMEulerScheduler"]

    @scheduler_init(EDMEulerScheduler, gmm_keys=())
    def __init__(self, args: InitArgs) -> None:
        _check_edm_config(args.sigma_data, args.sigma_schedule, args.prediction_type, args.final_sigmas_type)
        super().__init__(**args.stock)
        self._init_gmm()
        self._install_rows()  # the stock class steps on its training sigmas before set_timesteps

    def _gmm_for(self, sample):
        return None  # deterministic: no noise for a mixture to replace

    def _gmm_refusal(self, source: str) -> str | None:
        return (
            f"{source}: EDMEulerGMMScheduler is deterministic (no noise at any step; s_churn noise is the stock "
            "step's), so a Gaussian mixture has no noise to replace and its offsets would land on the sample "
            "uncompensated; use EDMDPMSolverMultistepGMMScheduler with algorithm_type='sde-dpmsolver++'"
        )

    def _install_rows(self) -> None:
        sigma, a_t, b_t = _edm_row_head(self)
        x_coef = sigma[1:] / sigma[:-1]
        zero = torch.zeros_like(a_t)
        rows = torch.stack([a_t, b_t, 1 - x_coef, zero, zero, zero, x_coef, zero], dim=-1)
        self._set_rows(rows.to(self.timesteps.device))

    @stock_signature(EDMEulerScheduler.set_timesteps)
    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None) -> None:
        """As ``EDMEulerScheduler.set_timesteps``; also builds the [S, 8] row table."""
        num_inference_steps = check_optional_step_count(num_inference_steps)
        if sigmas is not None:
            if not isinstance(sigmas, torch.Tensor):
                sigmas = torch.as_tensor(np.asarray(sigmas, dtype=np.float64))
            sigmas = sigmas.reshape(-1)
            if sigmas.numel() == 0 or not sigmas.is_floating_point():
                raise ValueError(f"sigmas must be a non-empty sequence of floats (ramp values), got {sigmas!r}")
        elif num_inference_steps is None:
            raise ValueError("set_timesteps needs num_inference_steps or sigmas, got neither")
        super().set_timesteps(num_inference_steps=num_inference_steps, device=device, sigmas=sigmas)
        _check_edm_sigmas(self, "sigmas" if sigmas is not None else None)
        self._install_rows()

    @stock_signature(EDMEulerScheduler.step)
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
        pred_original_sample=None,
    ) -> EDMEulerSchedulerOutput | tuple:
        """One EDM Euler step; arguments and outputs as ``EDMEulerScheduler.step``."""
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)) or s_churn > 0:
            return super().step(
                model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator, return_dict,
                pred_original_sample,
            )  # fmt: skip
        check_sample_tensor(sample)
        check_model_output(model_output, sample)
        if pred_original_sample is not None:
            check_model_output(pred_original_sample, sample, "pred_original_sample")
        if not self.is_scale_input_called:
            logger.warning(
                "The `scale_model_input` function should be called before `step` to ensure correct denoising. "
                "See `StableDiffusionPipeline` for a usage example."
            )
        if self.step_index is None:
            self._init_step_index(timestep)
        i = self.step_index
        check_host_step(i, self._n_steps())  # stock: an IndexError at the sigma lookup
        # the stock step computes in float32, promoted by a float64 model output
        dt = torch.float64 if model_output.dtype == torch.float64 else torch.float32
        x = sample if sample.dtype == dt else sample.to(dt)
        out = self._fused_step(
            model_output if pred_original_sample is None else pred_original_sample,
            x,
            i,
            prediction_type="epsilon" if pred_original_sample is None else "sample",
            gmm=None,
            history=(x,),
        )
        self._step_index += 1  # type: ignore[operator, assignment]  # diffusers types _step_index as None
        prev = out.prev_sample
        if prev.dtype != model_output.dtype:  # tested first: a .to that changes nothing still costs a call
            prev = prev.to(model_output.dtype)
        x0 = out.pred_original_sample if pred_original_sample is None else pred_original_sample
        if not return_dict:
            return (prev, x0)
        return scheduler_output(EDMEulerSchedulerOutput, prev_sample=prev, pred_original_sample=x0)


class EDMDPMSolverMultistepGMMScheduler(GMMSchedulerMixin, CheckedBeginIndexMixin, EDMDPMSolverMultistepScheduler):
    """``EDMDPMSolverMultistepScheduler`` with a fused DPM-Solver++ step (module docstring for the row) and the
    optional DDIM-GMM noise (Gabbur, TMLR 2026) on ``algorithm_type="sde-dpmsolver++"``.

    Every config key, default and method of the stock class is kept; GMM config keys, tables and
    :meth:`set_gmm_params`: see :class:`GMMSchedulerMixin` (one parameter set per inference step; the tables are
    in variance-preserving units and enter scaled by g = sqrt(1 + sigma_next^2), as on Euler ancestral). Covered:
    ``algorithm_type`` "dpmsolver++" / "sde-dpmsolver++", ``solver_order`` 1-3, ``solver_type`` midpoint / heun,
    both sigma schedules, ``final_sigmas_type``, ``lower_order_final``, ``euler_at_final``, ``thresholding`` and
    both prediction types. Not covered, as in diffusers: a third-order step of "sde-dpmsolver++" (diffusers' has
    no SDE form and fails with UnboundLocalError): a ValueError naming solver_order at that step, before any work.

    A GMM is refused with "dpmsolver++": that solver is deterministic (noise std 0 at every step), so the mixture
    would have no noise to replace.

    Randomness of "sde-dpmsolver++": ``generator`` (one or one per sample): z drawn exactly as diffusers draws it
    (``randn_tensor`` in the data prediction's dtype at every step), so with the GMM off whole loops equal the stock
    class's; with a GMM the components come from the same generator(s) after z. No generator, GMM off and ``seed``
    None: z from torch's global RNG as diffusers draws it. Otherwise z and k come from the op's Philox stream.

    Step index: diffusers' host counter (``step_index``, ``set_begin_index``; a run starting mid-schedule gets its
    order switches from its own first step), also under ``torch.compile``, where ``scale_model_input`` reads it.
    """

    _compatibles = [*EDMDPMSolverMultistepScheduler._compatibles, "EDMDPMSolverMultistepScheduler"]

    # diffusers' order switches and the rows of a run starting mid-schedule are DPMSolverMultistepGMMScheduler's (the
    # EDM config has the keys they read; the rows are this class's _coefficient_rows)
    _order = DPMSolverMultistepGMMScheduler._order
    _restart = DPMSolverMultistepGMMScheduler._restart

    @scheduler_init(EDMDPMSolverMultistepScheduler)
    def __init__(self, args: InitArgs) -> None:
        check_solver_order(args.solver_order, up_to_3=True)
        _check_edm_config(args.sigma_data, args.sigma_schedule, args.prediction_type, args.final_sigmas_type)
        super().__init__(**args.stock)
        self._init_gmm()
        self._rows_start: int = 0
        self._orders: list[int] = []
        self._mix: list[tuple[float, float]] = []  # each step's (w1 / H1, w2 / H1): the history terms added to x
        self._finite: list[bool] = []  # whether each step's coefficients are finite

    _gmm_refusal = DPMSolverMultistepGMMScheduler._gmm_refusal  # EDM's algorithm types are two of its

    # -- the coefficient table ---------------------------------------------------------------------------------
    @stock_signature(EDMDPMSolverMultistepScheduler.set_timesteps)
    def set_timesteps(self, num_inference_steps=None, device=None) -> None:
        """As ``EDMDPMSolverMultistepScheduler.set_timesteps``; also builds the [S, 8] coefficient table."""
        num_inference_steps = check_step_count(num_inference_steps)
        super().set_timesteps(num_inference_steps=num_inference_steps, device=device)
        _check_edm_sigmas(self)
        if self.config.algorithm_type == "sde-dpmsolver++":
            self._check_falling()
        self._rows_start = 0
        self._set_rows(self._coefficient_rows(0).to(self.timesteps.device))

    def _check_falling(self) -> None:
        """The SDE's noise std sigma_s sqrt(1 - e^-2h) needs sigmas that do not rise (diffusers: NaN samples)."""
        sigma = self.sigmas.detach().to("cpu", torch.float64)
        rises = (sigma[1:] > sigma[:-1]).nonzero().flatten().tolist()
        if rises:
            i = rises[0]
            c = self.config
            raise ValueError(
                f"the schedule's sigmas must not rise with algorithm_type='sde-dpmsolver++' (the SDE step's noise std "
                f"needs sigma to fall), got step {i} from sigma {sigma[i].item():.9g} to {sigma[i + 1].item():.9g} "
                f"(sigma_min={c.sigma_min!r}, sigma_max={c.sigma_max!r}, final_sigmas_type={c.final_sigmas_type!r}: "
                "the final sigma_min can lie above the last step's float32 sigma); use final_sigmas_type='zero' and "
                "sigma_min <= sigma_max"
            )

    def _coefficient_rows(self, start: int) -> torch.Tensor:
        """[S, 8] float64 rows of every step of a run beginning at ``start`` (module docstring); also the host
        lists of each step's order, history weights and finiteness. A step to sigma 0 has h = inf: e^-h = 0."""
        sigma, a_t, b_t = _edm_row_head(self)
        lam = (-sigma.log()).tolist()  # lambda = log(alpha / sigma), alpha = 1
        errors = np.seterr(divide="ignore", invalid="ignore")
        try:
            try:  # Python floats: fast, the same IEEE results
                rows = self._rows_from(lam, sigma.tolist(), start)
            except ArithmeticError:  # a repeated sigma (h = 0): numpy scalars give inf / NaN as diffusers does
                rows = self._rows_from([np.float64(v) for v in lam], sigma.tolist(), start)
        finally:
            np.seterr(**errors)
        tail = torch.tensor(rows, dtype=torch.float64)
        return torch.cat([a_t[:, None], b_t[:, None], tail], dim=-1)

    def _rows_from(self, lam: list, sigma: list[float], start: int) -> list[list[float]]:
        """Columns A..H2 of :meth:`_coefficient_rows` from lambda = -log(sigma) and sigma of every entry."""
        c = self.config
        sde = c.algorithm_type == "sde-dpmsolver++"
        n = len(self.timesteps)
        gs = self._gmm_options.final_step_g(n)
        rows, self._orders, self._mix, self._finite = [], [], [], []
        for i in range(n):
            order = self._order(i, start, n) if i >= start else 1
            h = lam[i + 1] - lam[i]
            r0 = (lam[i] - lam[i - 1]) / h if order >= 2 else 1.0
            r1 = (lam[i - 1] - lam[i - 2]) / h if order >= 3 else 1.0
            w0, w1, w2 = multistep_weights(order, _solver_coefficients(order, h, 1.0, sde, c.solver_type), r0, r1)
            x_coef = sigma[i + 1] / sigma[i] * (math.exp(-h) if sde else 1.0)
            noise = sigma[i + 1] * math.sqrt(-math.expm1(-2 * h)) if sde else 0.0
            g = math.sqrt(1 + sigma[i + 1] ** 2) * gs[i]
            x_weight = x_coef if x_coef != 0 else 1.0  # sigma_s = 0: a first-order step (x0_hat), h = x unused
            self._orders.append(order)
            self._mix.append((float(w1 / x_weight), float(w2 / x_weight)))
            rows.append([w0, 0.0, noise, g, x_weight if x_coef != 0 else 0.0, 0.0])
            self._finite.append(all(math.isfinite(v) for v in (w0, w1, w2, x_coef, noise)))
        return rows

    # -- the step ---------------------------------------------------------------------------------------------
    def _index(self, timestep) -> int:
        """diffusers' host step counter (initialised from ``timestep``); rows rebuilt for a run's first step."""
        if self.step_index is None:
            self._init_step_index(timestep)
        i = self.step_index
        check_host_step(i, len(self.timesteps))
        if self.lower_order_nums == 0 and i != self._rows_start:
            self._restart(i)
        if self._orders[i] == 3 and self.config.algorithm_type == "sde-dpmsolver++":
            raise ValueError(
                f"solver_order=3 with algorithm_type='sde-dpmsolver++' reaches a third-order step (step {i} of "
                f"{len(self.timesteps)}), which diffusers' EDMDPMSolverMultistepScheduler does not define (its "
                "third-order update has no SDE form); use solver_order=2, or lower_order_final=True with at most 4 "
                "steps"
            )
        if not self._finite[i]:
            c = self.config
            raise ValueError(
                f"step {i} of {len(self.timesteps)} goes from sigma {self.sigmas[i].item():.9g} to "
                f"{self.sigmas[i + 1].item():.9g} (h = 0), where the order-{self._orders[i]} update divides by h "
                f"(diffusers returns NaN samples): final_sigmas_type={c.final_sigmas_type!r}, lower_order_final="
                f"{c.lower_order_final!r}, solver_type={c.solver_type!r}, solver_order={c.solver_order!r}; use "
                "sigma_min < sigma_max"
            )
        return i

    @stock_signature(EDMDPMSolverMultistepScheduler.step)
    def step(self, model_output, timestep, sample, generator=None, return_dict=True) -> SchedulerOutput | tuple:
        """One multistep EDM DPM-Solver++ step; arguments and outputs as ``EDMDPMSolverMultistepScheduler.step``
        (randomness: see the class docstring)."""
        check_timesteps_set(self.num_inference_steps is not None)
        check_sample_tensor(sample)
        generator = check_step_arguments(model_output, sample, generator)
        # diffusers' data prediction's dtype, its output's (torch.result_type would break a compiled graph)
        promoted = torch.promote_types(sample.dtype, model_output.dtype)
        c = self.config
        i = self._index(timestep)
        x = _compute_sample(sample, model_output)
        gmm = self._gmm_for(x)  # first: gmm_steps="matched" rewrites the table when the GMM is built
        table = self._table(x)

        if c.thresholding:  # x0 as diffusers computes it, then the per-sample quantile
            m = self._threshold_sample(self.precondition_outputs(sample, model_output, self.sigmas[i])).to(x.dtype)
            op_pred = "sample"
        else:
            m, op_pred = model_output, "epsilon"

        noise = components = None
        if c.algorithm_type == "sde-dpmsolver++":
            if self._torch_noise(generator, gmm):  # a generator, or GMM off and no seed: as diffusers draws it
                noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=promoted
                )
                if noise.dtype != x.dtype:
                    noise = noise.to(x.dtype)
            if generator is not None and gmm is not None:
                components = draw_components(generator, gmm, i, x)
            elif noise is None or gmm is not None:
                self._use_stream(i)  # z and / or k from the Philox stream: seed=None draws the run's seed now

        h = x  # the history h = x + (w1 / X) h1 + (w2 / X) h2 (module docstring)
        r1, r2 = self._mix[i]
        if r1 != 0:
            h = torch.add(x, self.model_outputs[-1], alpha=r1)  # type: ignore[call-overload]  # diffusers types its history as list[None]
        if r2 != 0:
            h = h.add_(self.model_outputs[-2], alpha=r2)  # type: ignore[arg-type]
        out = self._fused_step(
            m, x, i, prediction_type=op_pred, gmm=gmm, noise=noise, components=components, rows=table, history=(h,)
        )
        return multistep_output(self, out, promoted, return_dict, c.solver_order)


publish(EDMEulerGMMScheduler, EDMEulerSchedulerOutput)
publish(EDMDPMSolverMultistepGMMScheduler, SchedulerOutput)
