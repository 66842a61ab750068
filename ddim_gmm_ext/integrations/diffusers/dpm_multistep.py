"""diffusers integration: :class:`DPMSolverMultistepGMMScheduler`, a drop-in ``DPMSolverMultistepScheduler``
whose DPM-Solver++ step is one fused ``torch.ops.ddimgmm.step`` call (through :func:`ddim_gmm_ext.api.fused_step`
with the history as a keyword; the DDIM-GMM mixture in place of the SDE noise when a GMM variant is configured).

Every step of DPM-Solver++ (orders 1-3, midpoint / heun, ODE or SDE) is linear in x_t and the data predictions
D0 = x0_hat (this step), h1, h2 (the previous two steps'):

    x_s = X x_t + w0 D0 + w1 h1 + w2 h2 + c z,        lambda = log(a / b),  h = lambda_s - lambda_t,
    ODE: X = b_s / b_t,           c = 0;     SDE: X = (b_s / b_t) e^-h,  c = b_s sqrt(1 - e^-2h),

with (w0, w1, w2) from the solver's D0, D1, D2 differences (:func:`_multistep_weights`). Since
x_t = a_t x0_hat + b_t eps_hat for every prediction type, the x_t term folds into the op's row
(a_t, b_t, A, B, c, g, H1, H2) = (a_t, b_t, X a_t + w0, X b_t, c, g, w1, w2). The rows of a schedule, order
switches included (first steps, ``lower_order_final``, ``euler_at_final``, ``final_sigmas_type``), are
computed in float64 once per ``set_timesteps`` and indexed on the device.

Importing this module imports diffusers; ``import ddim_gmm_ext`` does not.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .._common import multistep_weights as _multistep_weights
from ._args import (
    check_optional_step_count,
    check_sample_tensor,
    check_solver_order,
    check_timesteps_set,
    stock_signature,
)
from ._base import (
    CheckedBeginIndexMixin,
    GMMSchedulerMixin,
    check_generator,
    check_model_output,
    check_multistep_prediction,
    check_multistep_sigmas,
    draw_components,
    fused_data_prediction,
    multistep_alpha_sigma,
    publish,
    torch_data_prediction,
)
from ._config import InitArgs, scheduler_init
from ._multistep import MultistepIndexMixin, multistep_output

__all__ = ["DPMSolverMultistepGMMScheduler", "SchedulerOutput"]

#: algorithm types whose history is the data prediction x0 (the op's pred_original_sample)
_DATA_PREDICTION = ("dpmsolver++", "sde-dpmsolver++")


def _solver_coefficients(order: int, h: float, a_s: float, sde: bool, solver_type: str) -> tuple[float, float, float]:
    """(k0, k1, k2), the coefficients of D0, D1, D2 in diffusers' DPM-Solver++ updates (``expm1`` where it
    subtracts nearly equal numbers). Order 3 has one form (no midpoint / heun choice)."""
    if sde:
        e = -math.expm1(-2 * h)  # 1 - e^-2h
        k0 = a_s * e
        heun = a_s * (e / (-2 * h) + 1) if order >= 2 else 0.0
        k1 = 0.5 * k0 if order == 2 and solver_type == "midpoint" else heun
        k2 = a_s * ((e - 2 * h) / ((2 * h) * (2 * h)) - 0.5) if order == 3 else 0.0
    else:
        e = math.expm1(-h)  # e^-h - 1
        k0 = -a_s * e
        heun = a_s * (e / h + 1) if order >= 2 else 0.0
        k1 = -0.5 * a_s * e if order == 2 and solver_type == "midpoint" else heun
        k2 = -a_s * ((e + h) / (h * h) - 0.5) if order == 3 else 0.0
    return k0, (k1 if order >= 2 else 0.0), k2


def _model_output_tensor(
    model_output, sample: torch.Tensor, learned_variance: bool
) -> tuple[torch.Tensor, torch.dtype]:
    """The model output as a real floating tensor of the sample's shape, from what diffusers' DPM-Solver++ takes: a
    tensor, a NumPy array or scalar, or a Python float, of the sample's shape or one that broadcasts to it (a 0-d
    output); and the promoted dtype of the sample and the output as given (a 0-d output does not promote). With
    ``learned_variance``, the first 3 channels (the mean), as diffusers keeps them. Integer, bool and complex outputs
    are refused (a TypeError naming ``model_output``): a noise or data prediction is real-valued, and diffusers' result
    for them is not a sample (its "sample" prediction returns an int sample, or fails on a bool one)."""
    if isinstance(model_output, (np.ndarray, np.generic, float)):
        model_output = torch.as_tensor(model_output, device=sample.device)
    promoted = sample.dtype
    if isinstance(model_output, torch.Tensor):
        if learned_variance and model_output.dim() >= 2:
            model_output = model_output[:, :3]
        if model_output.is_floating_point():
            promoted = torch.result_type(sample, model_output)
        if model_output.shape != sample.shape:
            try:
                shape = torch.broadcast_shapes(model_output.shape, sample.shape)
            except RuntimeError:
                shape = None
            if shape != sample.shape:
                raise ValueError(
                    f"model_output must have the sample's shape {tuple(sample.shape)} or one that broadcasts to it, "
                    f"got {tuple(model_output.shape)}"
                )
            model_output = model_output.expand(sample.shape)
    check_model_output(model_output, sample)
    return model_output, promoted


class DPMSolverMultistepGMMScheduler(
    MultistepIndexMixin, GMMSchedulerMixin, CheckedBeginIndexMixin, DPMSolverMultistepScheduler
):
    """``DPMSolverMultistepScheduler`` with a fused DPM-Solver++ step and the optional DDIM-GMM noise (Gabbur,
    TMLR 2026) on ``algorithm_type="sde-dpmsolver++"``.

    Every ``DPMSolverMultistepScheduler`` config key, default and method is kept; GMM config keys, tables and
    :meth:`set_gmm_params`: see :class:`GMMSchedulerMixin` (one parameter set per inference step). The step
    (module docstring for the row) covers ``algorithm_type`` "dpmsolver++" and "sde-dpmsolver++", ``solver_order``
    1-3, ``solver_type`` "midpoint" / "heun", every sigma schedule (karras, exponential, beta, lu-lambdas, flow
    sigmas with ``flow_shift``), ``final_sigmas_type``, ``lower_order_final``, ``euler_at_final`` and every
    ``prediction_type``. The history (``self.model_outputs``, the data predictions, as diffusers keeps them) is
    passed to the op; nothing is modified in place. The model output may be what diffusers' conversion takes (a
    tensor, NumPy array or float of the sample's shape or one that broadcasts to it; real floating point), and the
    result has diffusers' dtype (the promoted dtype of sample and model output; the model output's with "sample").
    Schedules whose sigmas are not a path (non-finite, zero before the end) and, with the SDE, increasing timesteps
    are refused at ``set_timesteps``.

    * Fused from the model output: "epsilon", "sample", "v_prediction" (VP sigmas), "flow_prediction" (flow
      sigmas). Otherwise x0_hat is computed in torch first and the op takes it as a "sample" prediction (the same
      update): ``thresholding`` (dynamic thresholding needs a per-sample quantile of x0_hat, which one pass
      cannot take), "v_prediction" with flow sigmas and "flow_prediction" with VP sigmas (diffusers' own
      formulas there are not the op's path-generic ones).
    * "dpmsolver" / "sde-dpmsolver" (deprecated in diffusers) keep noise predictions as history, which the op
      does not return: their steps are ``DPMSolverMultistepScheduler.step``; a GMM is refused with them.
    * A GMM is refused with "dpmsolver++": that solver is deterministic (c = 0 at every step), so the mixture
      would have no noise to replace and its offsets would land on the sample uncompensated.

    Randomness of "sde-dpmsolver++": ``variance_noise`` is used as given; else ``generator`` (one or one per
    sample): z drawn exactly as diffusers draws it (``randn_tensor`` in float32 at every step), so with the GMM
    off whole loops equal ``DPMSolverMultistepScheduler``'s for the same generator; with a GMM the components
    come from the same generator(s) after z. No generator, GMM off and ``seed`` None: z from torch's global RNG
    as diffusers draws it. Otherwise z and k come from the op's Philox stream of (seed, sample index, step index)
    (the ``seed`` config key, or with seed None one seed drawn from torch's global RNG at the first step that uses
    the stream, see :class:`GMMSchedulerMixin`).

    Step index: diffusers' host counter (``step_index``, ``set_begin_index``; a run starting mid-schedule gets its
    order switches from its own first step). Under ``torch.compile`` it is the timestep's first position in
    ``self.timesteps`` as a 0-d device tensor (no host sync, one graph for every step) and the host counters
    (``step_index``, ``lower_order_nums``) are not advanced. A compiled loop needs :meth:`prepare_gmm` after
    ``set_timesteps``: it builds the GMM tables and fills the empty history with zeros (weight 0 in the first
    rows), so every step sees the same graph inputs.
    """

    _compatibles = [*DPMSolverMultistepScheduler._compatibles, "DPMSolverMultistepScheduler"]

    @scheduler_init(DPMSolverMultistepScheduler)
    def __init__(self, args: InitArgs) -> None:
        check_solver_order(args.solver_order, up_to_3=True)
        super().__init__(**args.stock)
        check_multistep_prediction(args.prediction_type)
        self._init_gmm()

    def _gmm_refusal(self, source: str) -> str | None:
        algorithm = self.config.algorithm_type  # diffusers maps "deis" to "dpmsolver++"
        if algorithm == "sde-dpmsolver++":
            return None
        return (
            f"{source} needs algorithm_type='sde-dpmsolver++' (the mixture replaces that solver's noise), got "
            f"algorithm_type={algorithm!r}: "
            + (
                "a deterministic solver (noise std 0) has no noise to replace"
                if algorithm == "dpmsolver++"
                else "its steps are diffusers' own (noise-prediction history)"
            )
        )

    # -- the coefficient table ---------------------------------------------------------------------------------
    @stock_signature(DPMSolverMultistepScheduler.set_timesteps)
    def set_timesteps(self, num_inference_steps=None, device=None, mu=None, timesteps=None) -> None:
        """As ``DPMSolverMultistepScheduler.set_timesteps``; also builds the [S, 8] coefficient table."""
        num_inference_steps = check_optional_step_count(num_inference_steps)
        super().set_timesteps(num_inference_steps=num_inference_steps, device=device, mu=mu, timesteps=timesteps)
        check_multistep_sigmas(self, "timesteps" if timesteps is not None else None)
        if self.config.algorithm_type in ("sde-dpmsolver++", "sde-dpmsolver"):
            self._check_decreasing(timesteps is not None)
        self._rows_start = 0
        self._set_rows(self._coefficient_rows(0).to(self.timesteps.device))

    def _check_decreasing(self, custom: bool) -> None:
        """The SDE step's noise std b_s sqrt(1 - e^-2h) needs h = lambda_s - lambda_t >= 0 at every step: sigmas
        that do not increase (diffusers' step gives NaN otherwise). ValueError naming ``timesteps`` (``custom``)."""
        sigma = self.sigmas.detach().to("cpu", torch.float64)
        rises = (sigma[1:] > sigma[:-1]).nonzero().flatten().tolist()
        if rises:
            i = rises[0]
            raise ValueError(
                f"{'timesteps' if custom else 'the schedule'} must decrease with "
                f"algorithm_type={self.config.algorithm_type!r} (the SDE step's noise std needs sigma to fall): "
                f"step {i} goes from timestep {self.timesteps[i].item()} (sigma {sigma[i].item():.6g}) to "
                + (f"timestep {self.timesteps[i + 1].item()} " if i + 1 < len(self.timesteps) else "the final sigma ")
                + f"(sigma {sigma[i + 1].item():.6g}); pass timesteps in decreasing order"
            )

    def _order(self, i: int, start: int, n: int | None = None) -> int:
        """diffusers' solver order at step i of a run that began at step ``start`` (lower_order_nums = i - start,
        capped): 1 first, then up to ``solver_order``, lowered on the last steps. ``n``: len(self.timesteps)."""
        c = self.config
        n = len(self.timesteps) if n is None else n
        done = min(i - start, c.solver_order)
        final = i == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero")
        second = i == n - 2 and c.lower_order_final and n < 15
        if c.solver_order == 1 or done < 1 or final:
            return 1
        if c.solver_order == 2 or done < 2 or second:
            return 2
        return 3

    def _coefficient_rows(self, start: int) -> torch.Tensor:
        """[S, 8] float64 rows (a_t, b_t, A, B, c, g, H1, H2) of every step of a run beginning at ``start``
        (module docstring), from diffusers' float32 sigmas. A step to sigma 0 (final_sigmas_type "zero") has
        h = inf: e^-h = 0, and the row is x_s = x0_hat."""
        a, b = multistep_alpha_sigma(self)
        lam: list = (a.log() - b.log()).tolist()
        errors = np.seterr(divide="ignore", invalid="ignore")
        try:
            try:  # Python floats: a third of the time of numpy scalars, the same IEEE results (no ** or numpy ufunc)
                rows = self._rows_from(lam, a.tolist(), b.tolist(), start)
            except ArithmeticError:  # a repeated sigma (h = 0): numpy scalars give inf / NaN as diffusers does
                rows = self._rows_from([np.float64(v) for v in lam], a.tolist(), b.tolist(), start)
        finally:
            np.seterr(**errors)
        return torch.tensor(rows, dtype=torch.float64)

    def _rows_from(self, lam: list, a_all: list[float], b_all: list[float], start: int) -> list[list[float]]:
        """The rows of :meth:`_coefficient_rows` from lambda = log(a / b), a and b of every sigma."""
        c = self.config
        sde = c.algorithm_type == "sde-dpmsolver++"
        n = len(self.timesteps)
        gs = self._gmm_options.final_step_g(n)
        rows = []
        for i in range(n):
            order = self._order(i, start, n) if i >= start else 1
            h = lam[i + 1] - lam[i]
            r0 = (lam[i] - lam[i - 1]) / h if order >= 2 else 1.0
            r1 = (lam[i - 1] - lam[i - 2]) / h if order >= 3 else 1.0
            k = _solver_coefficients(order, h, a_all[i + 1], sde, c.solver_type)
            w0, w1, w2 = _multistep_weights(order, k, r0, r1)
            x_coef = b_all[i + 1] / b_all[i] * (math.exp(-h) if sde else 1.0)
            noise = b_all[i + 1] * math.sqrt(-math.expm1(-2 * h)) if sde else 0.0
            rows.append([a_all[i], b_all[i], x_coef * a_all[i] + w0, x_coef * b_all[i], noise, gs[i], w1, w2])
        return rows

    def _restart(self, start: int) -> None:
        """Rows for a run whose first step is ``start`` (a pipeline's begin index; diffusers restarts its order
        count there). Keeps the run's stream seed."""
        self._rows_start = start
        self._restart_rows(self._coefficient_rows(start).to(self.timesteps.device))

    def prepare_gmm(self, sample: torch.Tensor):
        """As :meth:`GMMSchedulerMixin.prepare_gmm`; also fills the empty history slots with zeros of the
        sample's shape (float32, as the fused step keeps it) so that a compiled loop sees tensors at every step."""
        gmm = super().prepare_gmm(sample)
        self.model_outputs = [
            torch.zeros(sample.shape, dtype=torch.float32 if sample.dtype != torch.float64 else sample.dtype,
                        device=sample.device) if h is None else h
            for h in self.model_outputs
        ]  # fmt: skip
        return gmm

    # -- the step ---------------------------------------------------------------------------------------------
    def _x0_in_torch(self, model_output, sample, row):
        """x0_hat as diffusers' ``convert_model_output`` computes it (then dynamic thresholding), for the cases
        the op's prediction types do not cover (class docstring). ``row`` holds a_t, b_t."""
        return torch_data_prediction(self, model_output, sample, row[0], row[1])

    @stock_signature(DPMSolverMultistepScheduler.step)
    def step(
        self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict=True
    ) -> SchedulerOutput | tuple:
        """One multistep DPM-Solver++ step; arguments and outputs as ``DPMSolverMultistepScheduler.step``
        (randomness: see the class docstring)."""
        check_timesteps_set(self.num_inference_steps is not None)
        c = self.config
        if c.algorithm_type not in _DATA_PREDICTION:
            return super().step(model_output, timestep, sample, generator, variance_noise, return_dict)
        check_sample_tensor(sample)
        # diffusers returns its data prediction's dtype: the model output's for "sample", else the promoted dtype of
        # the sample and the model output; the step runs in float64 where either is float64, else in float32
        if not isinstance(model_output, torch.Tensor) or model_output.shape != sample.shape:
            learned = c.variance_type in ("learned", "learned_range") and c.prediction_type == "epsilon"
            model_output, promoted = _model_output_tensor(model_output, sample, learned)
        elif model_output.dtype == sample.dtype and sample.is_floating_point():
            promoted = sample.dtype
        else:
            check_model_output(model_output, sample)  # real floating: a TypeError naming model_output otherwise
            promoted = torch.result_type(sample, model_output)
        out_dtype = model_output.dtype if c.prediction_type == "sample" else promoted
        if variance_noise is not None and tuple(variance_noise.shape) != tuple(model_output.shape):
            raise ValueError(
                f"variance_noise must have the model output's shape {tuple(model_output.shape)}, got "
                f"{tuple(variance_noise.shape)}"
            )
        if generator is not None:
            generator = check_generator(generator, sample.shape[0])
        i = self._index(timestep, sample.device)
        if sample.dtype != torch.float64 and (sample.dtype != torch.float32 or model_output.dtype == torch.float64):
            sample = sample.to(torch.float64 if model_output.dtype == torch.float64 else torch.float32)
        gmm = self._gmm_for(sample)  # first: gmm_steps="matched" rewrites the table when the GMM is built
        table = self._table(sample)

        op_pred = fused_data_prediction(c)
        if op_pred is not None:
            m = model_output
        else:
            m, op_pred = self._x0_in_torch(model_output.to(sample.dtype), sample, table[i]), "sample"
        if m.dtype not in (sample.dtype, table.dtype):
            m = m.to(table.dtype)

        noise = components = None
        if c.algorithm_type == "sde-dpmsolver++":
            if variance_noise is not None:
                noise = variance_noise.to(device=sample.device, dtype=torch.float32)
            elif self._torch_noise(generator, gmm):  # a generator, or GMM off and no seed: as diffusers draws it
                noise = randn_tensor(model_output.shape, generator=generator, device=sample.device, dtype=torch.float32)
            if generator is not None and gmm is not None:
                components = draw_components(generator, gmm, int(i), sample)
            elif noise is None or gmm is not None:
                self._use_stream()  # z and / or k from the Philox stream: seed=None draws the run's seed now

        order = c.solver_order
        # h1 (the latest data prediction), then h2 for order 3; slots still empty (eager first steps, whose rows
        # have H_j = 0) are left out
        history: tuple[torch.Tensor, ...]  # diffusers types its history as list[None]
        if order == 2:  # the common case, without the cost of a generator expression
            h1 = self.model_outputs[-1]
            history = () if h1 is None else (h1,)
        else:
            history = tuple(h for h in self.model_outputs[-1:-order:-1] if h is not None)  # order 1: ()
        out = self._fused_step(
            m,
            sample,
            i,
            prediction_type=op_pred,
            gmm=gmm,
            noise=noise,
            components=components,
            rows=table,
            history=history,
        )
        return multistep_output(self, out, out_dtype, return_dict, None if isinstance(i, torch.Tensor) else order)


publish(DPMSolverMultistepGMMScheduler, SchedulerOutput)
