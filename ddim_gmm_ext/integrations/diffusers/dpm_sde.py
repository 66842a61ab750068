"""diffusers integration: :class:`DPMSolverSDEGMMScheduler`, a drop-in ``DPMSolverSDEScheduler`` (DPM-Solver++
SDE, "DPM++ SDE") whose every model evaluation is one fused ``torch.ops.ddimgmm.step`` call, with the DDIM-GMM
mixture in place of the Brownian noise when a GMM variant is configured.

diffusers' schedule holds two model evaluations per step sigma -> sigma' (midpoint ratio 1/2, so the midpoint is
sigma_m = sqrt(sigma sigma')), alternating in ``scheduler.timesteps``; on the variance-exploding path x = x0 + sigma
eps, with up / down the ancestral split of a move from s to s' (up = min(s', s' sqrt(s^2 - s'^2) / s),
down = sqrt(s'^2 - up^2)), and z_(a, b) the Brownian tree's normalised increment between sigmas a and b:

* stage 1 (even position): an ancestral DPM-Solver++(1) half step to the midpoint,
  x_m = x0_1 + down(sigma, sigma_m) eps_1 + up(sigma, sigma_m) z_(sigma, sigma_m), x0_1 from x at sigma;
* stage 2 (odd position): from the step's ORIGINAL sample x (not x_m), with the data prediction x0_2 of the model
  evaluated at x_m (with r = 1/2 the DPM-Solver++ combination of x0_1 and x0_2 gives x0_1 weight 0),
  x' = r x + (1 - r) x0_2 + up(sigma, sigma') z_(sigma, sigma'),  r = down(sigma, sigma') / sigma;
* the last evaluation (sigma' = 0) is an Euler step to x0.

Each is a row of the op's [S, 8] table in VE units, (a_t, b_t, A, B, c, g, H1, H2): stage 1
(1, sigma, 1, down, up, g, 0, 0); stage 2 (1, sigma_m, 1 - r, 0, up, g, r, 0) with the op's sample x_m and the
stored x as its history tensor h1 (mean = A x0_2 + H1 x); the last (1, sigma, 1, 0, 0, g, 0, 0). The mixture's
tables are in VP units, so g = sqrt(1 + s'^2) (as in Euler ancestral), 0 where ``final_step`` / ``gmm_steps``
leave a row Gaussian. Row i is position i of ``scheduler.timesteps``: ``gmm_steps`` indices count evaluations.

Noise: the Brownian tree is diffusers' own noise sampler, built at the first step from the same arguments and
queried at the same float32 sigmas in the same order, so with the GMM off whole loops equal the stock class's.
With a GMM its increment is also the mixture's Gaussian part (the op's ``noise``); only the component k of each
sample comes from the op's Philox stream (the ``seed`` key). So the two stages of a step keep the Brownian
correlation of the stock sampler, and a row with g = 0 is the stock row exactly.

Importing this module imports diffusers and torchsde; ``import ddim_gmm_ext`` does not.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from diffusers.schedulers.scheduling_dpmsolver_sde import (
    BrownianTreeNoiseSampler,
    DPMSolverSDEScheduler,
    DPMSolverSDESchedulerOutput,
)

from ._args import stock_signature
from ._base import (
    CheckedBeginIndexMixin,
    GMMSchedulerMixin,
    check_host_step,
    check_model_output,
    check_multistep_sigmas,
    check_step_count,
    publish,
    scheduler_output,
)
from ._config import InitArgs, scheduler_init

__all__ = ["DPMSolverSDEGMMScheduler", "DPMSolverSDESchedulerOutput"]

#: the prediction types diffusers' DPMSolverSDEScheduler steps ("sample" raises NotImplementedError there)
_PREDICTIONS = ("epsilon", "v_prediction")


def _ancestral(s_from: float, s_to: float) -> tuple[float, float]:
    """(down, up): the ancestral split of a VE move s_from -> s_to, as diffusers' DPM-Solver SDE computes it."""
    up = min(s_to, math.sqrt(max(s_to * s_to * (s_from * s_from - s_to * s_to) / (s_from * s_from), 0.0)))
    return math.sqrt(max(s_to * s_to - up * up, 0.0)), up


def _check_s_noise(s_noise) -> float:
    if isinstance(s_noise, bool) or not isinstance(s_noise, Real) or not math.isfinite(s_noise) or s_noise < 0:
        raise ValueError(f"s_noise must be a finite real number >= 0 (the noise's scale), got {s_noise!r}")
    return float(s_noise)


class DPMSolverSDEGMMScheduler(GMMSchedulerMixin, CheckedBeginIndexMixin, DPMSolverSDEScheduler):
    """``DPMSolverSDEScheduler`` with one fused op call per model evaluation and the optional DDIM-GMM noise
    (Gabbur, TMLR 2026). Rows, stages and noise: see the module docstring.

    Every ``DPMSolverSDEScheduler`` config key, default and method is kept (karras / exponential / beta sigmas,
    ``timestep_spacing``, ``steps_offset``, ``noise_sampler_seed``, ``s_noise``); ``scale_model_input``,
    ``state_in_first_order``, ``sample`` and ``mid_point_sigma`` behave as the stock class's. GMM config keys,
    tables and :meth:`set_gmm_params`: see :class:`GMMSchedulerMixin` (one parameter set per model evaluation).

    Differences from the stock class, all refusals of input it turns into NaN or a late error:
    ``prediction_type`` other than "epsilon" / "v_prediction" / "sample" is refused at construction ("sample" is
    refused at ``step`` by the stock class's own NotImplementedError); a run whose first evaluation is a second-order
    position (an odd ``begin_index``: the stock step divides 0 by 0 there) and ``s_noise`` that is not a finite
    number >= 0 are refused at ``step``; with a GMM, ``s_noise=0`` is refused (no noise to replace). ``s_noise``
    scales the rows' noise std c (with a GMM the mixture's level too; ``gmm_steps="matched"`` is decided at
    s_noise = 1). Schedules whose sigmas are not finite and > 0 (``beta_end`` of 1) are refused at construction and
    ``set_timesteps``.

    Under ``torch.compile`` the tree's draw (torchsde, host Python) runs eagerly (``torch.compiler.disable``): a
    compiled step works from the first call with graph breaks there, never with ``fullgraph=True``.
    """

    _compatibles = [*DPMSolverSDEScheduler._compatibles, "DPMSolverSDEScheduler"]

    @scheduler_init(DPMSolverSDEScheduler)
    def __init__(self, args: InitArgs) -> None:
        if args.prediction_type not in (*_PREDICTIONS, "sample"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {args.prediction_type!r}")
        super().__init__(**args.stock)
        self._init_gmm()
        self._prediction: str = args.prediction_type  # read per step (a config lookup costs microseconds)
        check_multistep_sigmas(self)  # the training-length schedule the stock __init__ sets (rows: at the first use)

    # -- the coefficient table ---------------------------------------------------------------------------------
    @stock_signature(DPMSolverSDEScheduler.set_timesteps)
    def set_timesteps(self, num_inference_steps, device=None, num_train_timesteps=None) -> None:
        """As ``DPMSolverSDEScheduler.set_timesteps``; also builds the [2N - 1, 8] row table."""
        num_inference_steps = check_step_count(num_inference_steps)
        super().set_timesteps(num_inference_steps, device, num_train_timesteps)
        if hasattr(self, "_gmm_options"):  # not from the stock __init__, which runs before _init_gmm
            self._install_rows()

    def _install_rows(self) -> None:
        """The rows of the schedule (module docstring), float64 from diffusers' float32 sigmas; the float32
        sigmas the tree is queried at are computed per position when first needed (:meth:`_queries`)."""
        check_multistep_sigmas(self)
        s = self.sigmas.detach().to("cpu", torch.float64).tolist()
        n = len(self.timesteps)
        gs = self._gmm_options.final_step_g(n)
        rows = []
        for i in range(n):
            if i % 2 == 0:  # stage 1, or the last Euler step
                sigma, nxt = s[i], s[i + 1]
                if nxt == 0:
                    rows.append([1.0, sigma, 1.0, 0.0, 0.0, gs[i], 0.0, 0.0])
                    continue
                mid = math.sqrt(sigma * nxt)
                down, up = _ancestral(sigma, mid)
                rows.append([1.0, sigma, 1.0, down, up, math.sqrt(1 + mid * mid) * gs[i], 0.0, 0.0])
            else:
                sigma, nxt = s[i - 1], s[i]
                down, up = _ancestral(sigma, nxt)
                r = down / sigma
                rows.append([1.0, math.sqrt(sigma * nxt), 1 - r, 0.0, up, math.sqrt(1 + nxt * nxt) * gs[i], r, 0.0])
        self._set_rows(torch.tensor(rows, dtype=torch.float64).to(self.timesteps.device))
        self._query_cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # per step
        self._scaled: tuple[torch.Tensor, float, torch.Tensor] | None = None  # (table, s_noise, its scaled copy)

    def _queries(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The 0-d float32 sigmas at which the stock step queries the tree at position ``i`` (None: the last Euler
        step, which draws nothing), computed with the stock step's float32 operations on 0-d tensors (log, exp;
        a vectorised kernel may round differently, and the tree's draw depends on the exact query points). Both
        evaluations of a step start from the same pair of sigmas, so their values are computed once per step.
        The second one of stage 1 is also the stock ``mid_point_sigma``."""
        if i == len(self.timesteps) - 1:
            return None
        step = i // 2
        values = self._query_cache.get(step)
        if values is None:
            t, t_next = self.sigmas[2 * step].log().neg(), self.sigmas[2 * step + 1].log().neg()
            t_mid = t + (t_next - t) * 0.5
            values = self._query_cache[step] = (t.neg().exp(), t_mid.neg().exp(), t_next.neg().exp())
        return (values[0], values[1]) if i % 2 == 0 else (values[0], values[2])

    # -- the step ---------------------------------------------------------------------------------------------
    def _tree_noise(self, sample: torch.Tensor, i: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(z, the stock mid_point_sigma) of position ``i``: the tree built as the stock step builds it (at the
        run's first step, from that step's sample and ``noise_sampler_seed``), queried as it queries it."""
        if self.noise_sampler is None:
            positive = self.sigmas[self.sigmas > 0]
            self.noise_sampler = BrownianTreeNoiseSampler(  # type: ignore[assignment]  # diffusers types it None
                sample, positive.min().item(), self.sigmas.max().item(), self.noise_sampler_seed
            )
        q = self._queries(i)
        if q is None:
            return None, None
        return self.noise_sampler(*q), q[1]

    # under torch.compile the draw runs eagerly (one graph break); eager steps call it directly
    _traced_tree_noise = torch.compiler.disable(_tree_noise)

    def _noise_table(self, sample: torch.Tensor, s_noise: float) -> torch.Tensor:
        """The rows in the compute dtype with the noise std scaled by ``s_noise`` (cached for the last value)."""
        table = self._table(sample)
        if s_noise == 1.0:
            return table
        if self._scaled is None or self._scaled[0] is not table or self._scaled[1] != s_noise:
            scaled = table.clone()
            scaled[:, 4] *= s_noise
            self._scaled = (table, s_noise, scaled)
        return self._scaled[2]

    @stock_signature(DPMSolverSDEScheduler.step)
    def step(
        self, model_output, timestep, sample, return_dict=True, s_noise=1.0
    ) -> DPMSolverSDESchedulerOutput | tuple:
        """One model evaluation's step; arguments and outputs as ``DPMSolverSDEScheduler.step``."""
        if self._prediction not in _PREDICTIONS:
            return super().step(model_output, timestep, sample, return_dict, s_noise)  # the stock refusal
        if not isinstance(sample, torch.Tensor) or not sample.is_floating_point():
            what = sample.dtype if isinstance(sample, torch.Tensor) else type(sample).__name__
            raise TypeError(f"sample must be a real floating-point tensor, got {what}")
        check_model_output(model_output, sample)
        s_noise = _check_s_noise(s_noise)
        if self._rows is None:  # the stock __init__'s training-length schedule, stepped without set_timesteps
            self._check_gmm_ready()  # a GMM needs set_timesteps, as on the other schedulers
            self._install_rows()
        if s_noise == 0 and (self._user_gmm is not None or self._gmm_options.variant is not None):
            raise ValueError("s_noise=0 with a GMM: the step has no noise for the mixture to replace")
        if self.step_index is None:
            self._init_step_index(timestep)
        i = self.step_index
        assert i is not None
        check_host_step(i, self._n_steps())
        first, odd = self.sample is None, i % 2 == 1
        if (first and odd) or not (first or odd):
            raise ValueError(
                f"position {i} of scheduler.timesteps is a {'second' if first else 'first'}-order evaluation but "
                f"the scheduler is in its {'first' if first else 'second'}-order state: a run must begin at an even "
                "position (set_begin_index / the first timestep; the stock step returns NaN there) and alternate"
            )
        # the stock step computes in the promoted dtype of sample and model output (its 0-d float32 sigmas do not
        # promote); here float64 where that is float64, else float32, cast back
        out_dtype = torch.result_type(sample, model_output)
        x = sample.to(torch.float64 if out_dtype == torch.float64 else torch.float32)
        gmm = self._gmm_for(x)
        noise, mid = (self._traced_tree_noise if torch.compiler.is_compiling() else self._tree_noise)(sample, i)
        if noise is not None and noise.dtype not in (x.dtype, torch.float32):
            noise = noise.to(x.dtype)
        if gmm is not None:
            self._use_stream(i)  # the components come from the Philox stream
        out = self._fused_step(
            model_output,
            x,
            i,
            prediction_type=self._prediction,
            gmm=gmm,
            noise=noise,
            rows=self._noise_table(x, s_noise),
            history=() if first else (self.sample,),  # type: ignore[arg-type]  # stage 2: the stored tensor
        )
        if mid is not None:  # stage 2 follows stage 1 (state as the stock class keeps it)
            self.sample, self.mid_point_sigma = (x, mid) if first else (None, None)  # type: ignore[assignment]  # typed None
        self._step_index += 1  # type: ignore[operator, assignment]  # diffusers types _step_index as None
        prev, x0 = out.prev_sample, out.pred_original_sample
        if prev.dtype != out_dtype:
            prev, x0 = prev.to(out_dtype), x0.to(out_dtype)
        if not return_dict:
            return (prev, x0)
        return scheduler_output(DPMSolverSDESchedulerOutput, prev_sample=prev, pred_original_sample=x0)


publish(DPMSolverSDEGMMScheduler, DPMSolverSDESchedulerOutput)
