"""diffusers integration: :class:`UniPCMultistepGMMScheduler`, a drop-in ``UniPCMultistepScheduler`` whose
UniC corrector and UniP predictor of a step are folded into one fused ``torch.ops.ddimgmm.step`` call.

Step i of UniPC (diffusers' order of operations) with M_j the converted model output of step j (the data
prediction x0_hat with ``predict_x0``, else the noise prediction eps_hat), x_i the sample passed in and L the
``last_sample`` kept from step i - 1:

    corrector (i > first step, i - 1 not in disable_corrector):  x_i^c = X_c L + sum_{k=0..p} c_k M_{i-k}
    otherwise                                                     x_i^c = x_i
    predictor:                                                    x_{i+1} = X_p x_i^c + sum_{k=0..q-1} w_k M_{i-k}

with p the previous step's order, q this step's, X = b_{i+1} / b_i (``predict_x0``) or a_{i+1} / a_i and the c_k,
w_k from UniPC's B(h) (bh1 / bh2) rho coefficients (:func:`_interval`). Substituting the corrector, x_{i+1} is
linear in (x_i, M_i, M_{i-1}, M_{i-2}, M_{i-3}, L) with coefficients that depend only on the schedule: they are
computed in float64 once per ``set_timesteps`` (order switches, ``lower_order_final`` and the corrector switches as
rows). x_i = a_i x0_hat + b_i eps_hat for every prediction type, so (x_i, M_i) fold into the op's A, B (M_i is
computed in the kernel from the model output), M_{i-1} is the op's history h1 and the rest (L, M_{i-2}, M_{i-3})
its h2: the one of them a row uses directly, or their weighted sum in torch where a row uses more than one (solver
order 2 and 3 with the corrector on; under ``torch.compile`` always, fused by inductor). The corrected x_i^c, the
``last_sample`` of the next step, is the same kind of weighted sum in torch (none with the corrector off): it is
not an output of the op, and computing it apart keeps diffusers' semantics exactly (the corrector reads L, not
the sample passed in, which a pipeline may have edited).

Importing this module imports diffusers; ``import ddim_gmm_ext`` does not.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from ... import _checks
from ._args import check_optional_step_count, check_solver_order, check_timesteps_set, stock_signature
from ._base import (
    CheckedBeginIndexMixin,
    DeterministicMixin,
    check_model_output,
    check_multistep_prediction,
    check_multistep_sigmas,
    fused_data_prediction,
    multistep_alpha_sigma,
    publish,
    scheduler_output,
    torch_data_prediction,
)
from ._config import InitArgs, scheduler_init
from ._multistep import MultistepIndexMixin

__all__ = ["SchedulerOutput", "UniPCMultistepGMMScheduler"]

#: the basis of a step's linear maps: the sample, this step's and the three previous converted outputs, last_sample
_X, _M0, _M1, _M2, _M3, _L = range(6)
#: the torch-summed second history: its tensors and their columns in the basis
_H2_BASIS = (_M2, _M3, _L)


def _interval(
    lam: list, a: list, b: list, j: int, order: int, predict_x0: bool, bh1: bool, corrector: bool
) -> tuple[float, dict[int, float]]:
    """UniPC's update over the interval j -> j + 1 of ``order`` as (X, {k: weight of M_{j-k}}): the predictor
    (``corrector`` False) x_{j+1} = X x_j + sum w_k M_{j-k}, or the corrector's x_{j+1}^c = X x_j + sum w_k M_{j-k},
    with k = -1 the new output M_{j+1}. Float64 numpy scalars: h = inf (a step to sigma 0) and h = 0 (a repeated
    sigma) give the inf / NaN diffusers' arithmetic gives."""
    h = lam[j + 1] - lam[j]
    hh = -h if predict_x0 else h
    h_phi_1 = np.expm1(hh)
    big_b = hh if bh1 else np.expm1(hh)
    x_coef = b[j + 1] / b[j] if predict_x0 else a[j + 1] / a[j]
    s = a[j + 1] if predict_x0 else b[j + 1]
    rks = [(lam[j - k] - lam[j]) / h for k in range(1, order)] + [np.float64(1.0)]
    rhs, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
    for i in range(1, order + 1):
        rhs.append(h_phi_k * factorial / big_b)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    mat = np.array([[r ** (i - 1) for r in rks] for i in range(1, order + 1)], dtype=np.float64)
    if corrector:
        rhos = [np.float64(0.5)] if order == 1 else _solve(mat, rhs)
    elif order == 1:
        rhos = []
    else:
        rhos = [np.float64(0.5)] if order == 2 else _solve(mat[:-1, :-1], rhs[:-1])
    k_res = -s * big_b
    weights = {0: -s * h_phi_1}
    for k in range(1, order):  # D1_k = (M_{j-k} - M_j) / r_k
        weights[k] = k_res * rhos[k - 1] / rks[k - 1]
        weights[0] -= k_res * rhos[k - 1] / rks[k - 1]
    if corrector:  # D1_t = M_{j+1} - M_j with the last rho
        weights[-1] = k_res * rhos[-1]
        weights[0] -= k_res * rhos[-1]
    return x_coef, weights


def _solve(mat: np.ndarray, rhs: list) -> list:
    """diffusers' ``torch.linalg.solve`` of the rho system in float64: ``np.linalg.LinAlgError`` where the system is
    singular (an order-3 step to sigma 0, h = inf: diffusers' solve raises there too); a non-finite system (h = 0,
    where diffusers' solve returns NaN) gives NaN rhos."""
    try:
        return list(np.linalg.solve(mat, np.array(rhs, dtype=np.float64)))
    except np.linalg.LinAlgError:
        raise
    except ValueError:
        return [np.float64("nan")] * len(rhs)


class UniPCMultistepGMMScheduler(
    MultistepIndexMixin, DeterministicMixin, CheckedBeginIndexMixin, UniPCMultistepScheduler
):
    """``UniPCMultistepScheduler`` whose step (corrector and predictor) is one fused op call (module docstring).

    Every ``UniPCMultistepScheduler`` config key, default and method is kept. Covered by the fused step:
    ``solver_type`` "bh1" / "bh2", ``solver_order`` 1-3, ``predict_x0`` True / False, the corrector and
    ``disable_corrector``, ``lower_order_final``, every sigma schedule (karras, exponential, beta, flow sigmas with
    ``flow_shift``, dynamic shifting, custom ``sigmas``), ``final_sigmas_type``, every ``prediction_type``,
    ``timestep_spacing`` / ``steps_offset`` and ``set_begin_index``. ``disable_corrector`` is read when the rows
    are built (``set_timesteps``, ``set_begin_index``, a run's first step), not at every step as diffusers reads it.

    * Fused from the model output: with ``predict_x0``, "epsilon", "sample", "v_prediction" (VP sigmas) and
      "flow_prediction" (flow sigmas); without, "epsilon". Otherwise the converted output (x0_hat, or eps_hat) is
      computed in torch as diffusers' ``convert_model_output`` does and the op takes it as a "sample" (or
      "epsilon") prediction, the same update: ``thresholding`` (a per-sample quantile of x0_hat, which one pass
      cannot take), "v_prediction" with flow sigmas, "flow_prediction" with VP sigmas, and "sample" /
      "v_prediction" without ``predict_x0`` (the history is then the noise prediction, which the op does not
      return).
    * ``solver_p`` (another scheduler as the predictor) and ``solver_order`` > 3: ``UniPCMultistepScheduler.step``.
    * No GMM: UniPC is deterministic (no noise at any step), so a mixture would have no Gaussian noise to replace
      and its offsets would land on the sample uncompensated. ``gmm_variant`` other than None and
      :meth:`set_gmm_params` are refused.
    * Refused: schedules whose sigmas are not a path (non-finite, zero before the end), at ``set_timesteps``; an
      order-3 step to sigma 0 (``solver_order`` >= 3, ``lower_order_final=False``, ``final_sigmas_type="zero"``), a
      singular rho system, at that step (where diffusers raises ``LinAlgError``) or at :meth:`prepare_gmm`.

    Step index: diffusers' host counter (``step_index``, ``set_begin_index``; a run starting mid-schedule gets its
    order and corrector switches from its own first step). Under ``torch.compile`` it is the timestep's first
    position in ``self.timesteps`` as a 0-d device tensor (no host sync, one graph for every step) and the host
    counters (``step_index``, ``lower_order_nums``, ``this_order``) are not advanced. A compiled loop needs
    :meth:`prepare_gmm` after ``set_timesteps`` (and after ``set_begin_index``): it fills the empty history and
    ``last_sample`` with zeros (weight 0 in the first rows), so every step sees the same graph inputs.
    """

    _compatibles = [*UniPCMultistepScheduler._compatibles, "UniPCMultistepScheduler"]

    @scheduler_init(UniPCMultistepScheduler, gmm_keys=("gmm_variant",))
    def __init__(self, args: InitArgs) -> None:
        check_solver_order(args.solver_order)
        check_multistep_prediction(args.prediction_type)
        if args.prediction_type == "flow_prediction" and not args.predict_x0:
            raise ValueError(
                "prediction_type='flow_prediction' needs predict_x0=True (diffusers' UniPC has no noise prediction "
                "for a flow model), got predict_x0=False"
            )
        if args.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {args.final_sigmas_type!r}")
        super().__init__(**args.stock)
        self._refuse_gmm_variant()
        self._host: list[list[float]] = []  # per step: the 6 + 6 + 3 float64 weights (next, corrected, h2 sum)
        self._singular: dict[int, int] = {}  # step -> order of the rows' steps whose rho system is singular
        self._aux: dict = {}  # (device, dtype) -> [S, 9] corrected-sample and h2 weights for the compiled step

    # -- no GMM ------------------------------------------------------------------------------------------------
    def _gmm_refusal(self, source: str) -> str:
        return (
            f"{source}: UniPC is deterministic (no noise at any step), so a Gaussian mixture has no noise to replace "
            "and its offsets would land on the sample uncompensated; use gmm_variant=None (or a stochastic "
            "scheduler: DDIMGMMScheduler, DPMSolverMultistepGMMScheduler with algorithm_type='sde-dpmsolver++', ...)"
        )

    def _fused(self) -> bool:
        """Whether steps are this class's (else diffusers' own: ``solver_p``, ``solver_order`` > 3)."""
        return self.solver_p is None and self.config.solver_order <= 3

    # -- the coefficient table ---------------------------------------------------------------------------------
    @stock_signature(UniPCMultistepScheduler.set_timesteps)
    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None) -> None:
        """As ``UniPCMultistepScheduler.set_timesteps``; also builds the coefficient table."""
        num_inference_steps = check_optional_step_count(num_inference_steps)
        super().set_timesteps(num_inference_steps=num_inference_steps, device=device, sigmas=sigmas, mu=mu)
        check_multistep_sigmas(self, "sigmas" if sigmas is not None else None)
        self._set_rows(self._build(0))

    def set_begin_index(self, begin_index: int = 0) -> None:
        """As ``UniPCMultistepScheduler.set_begin_index``; the rows restart the order count and the corrector
        there (what diffusers' first step of the run does), so a compiled loop from ``begin_index`` is right too."""
        super().set_begin_index(begin_index)
        if self._row_table is not None and self._fused() and 0 <= begin_index < len(self.timesteps):
            self._restart(begin_index)

    def _order(self, i: int, start: int) -> int:
        """diffusers' ``this_order`` at step i of a run that began at ``start``."""
        c = self.config
        order = min(c.solver_order, len(self.timesteps) - i) if c.lower_order_final else c.solver_order
        return min(order, min(i - start, c.solver_order) + 1)

    def _weights(self, start: int) -> list[list[float]]:
        """Per step i: the float64 weights over (x_i, M_i, M_{i-1}, M_{i-2}, M_{i-3}, L) of x_{i+1} and of the
        corrected x_i^c (module docstring), then a_i, b_i."""
        c = self.config
        a_t, b_t = multistep_alpha_sigma(self)
        a = [np.float64(v) for v in a_t.tolist()]
        b = [np.float64(v) for v in b_t.tolist()]
        px0, bh1 = bool(self.predict_x0), c.solver_type == "bh1"
        n, out = len(self.timesteps), []
        singular: dict[int, int] = {}

        def interval(i: int, j: int, order: int, corrector: bool):
            try:
                return _interval(lam, a, b, j, order, px0, bh1, corrector)
            except np.linalg.LinAlgError:  # step i is refused (_check_solvable); NaN weights until then
                singular[i] = order
                return np.float64("nan"), {k: np.float64("nan") for k in range(-1 if corrector else 0, order)}

        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # sigma 0: lambda = inf, as diffusers
            lam = [np.log(p) - np.log(q) for p, q in zip(a, b, strict=True)]
            for i in range(n):
                corrected = [0.0] * 6
                if i > start and (i - 1) not in self.disable_corrector:
                    x_c, w = interval(i, i - 1, self._order(i - 1, start), corrector=True)
                    corrected[_L] = x_c
                    for k, v in w.items():  # k = -1: M_i, 0: M_{i-1}, ...
                        corrected[_M0 + k + 1] = v
                else:
                    corrected[_X] = np.float64(1.0)
                x_p, w = interval(i, i, self._order(i, start) if i >= start else 1, corrector=False)
                nxt = [x_p * v for v in corrected]
                for k, v in w.items():
                    nxt[_M0 + k] += v
                out.append([float(v) for v in [*nxt, *corrected, a[i], b[i]]])
        self._singular = singular
        return out

    def _check_solvable(self, i: int | None = None) -> None:
        """Step ``i`` (None: any step of the rows) must not need a singular rho system: diffusers' step raises
        ``torch.linalg.LinAlgError`` there (an order-3 step to sigma 0: ``solver_order`` >= 3 with
        ``lower_order_final=False`` and ``final_sigmas_type="zero"``), the rows hold NaN. A ValueError naming the config
        keys instead, before the step does any work."""
        steps = sorted(self._singular) if i is None else [i] if i in self._singular else []
        if not steps:
            return
        j, c = steps[0], self.config
        raise ValueError(
            f"step {j} of the {len(self.timesteps)}-step UniPC schedule is an order-{self._singular[j]} step to "
            f"sigma {self.sigmas[j + 1].item():.6g}, whose rho system is singular (diffusers' step raises LinAlgError "
            "there): "
            f"solver_order={c.solver_order} with lower_order_final={c.lower_order_final} and "
            f"final_sigmas_type={c.final_sigmas_type!r}; use lower_order_final=True (the default), "
            "final_sigmas_type='sigma_min' or solver_order <= 2"
        )

    def _restart(self, start: int) -> None:
        self._restart_rows(self._build(start))

    def _build(self, start: int) -> torch.Tensor:
        """The rows of a run beginning at ``start``: the op's [S, 8] table (a_t, b_t, A, B, c, g, H1, H2) with
        c = g = 0, returned; the weights of the torch sums are installed (``self._host`` on the host for eager
        steps, the [S, 9] ``_aux`` table on the device for compiled ones)."""
        self._rows_start = start
        rows, host = [], []
        eps_history = not self.predict_x0
        for w in self._weights(start):
            nxt, corrected, (a_i, b_i) = w[:6], w[6:12], w[12:]
            if eps_history:  # op "epsilon": nx x + n0 eps = nx a x0 + (nx b + n0) eps
                big_a, big_b = nxt[_X] * a_i, nxt[_X] * b_i + nxt[_M0]
            else:  # x0_hat: nx x + n0 x0 = (nx a + n0) x0 + nx b eps
                big_a, big_b = nxt[_X] * a_i + nxt[_M0], nxt[_X] * b_i
            used = [nxt[k] for k in _H2_BASIS if nxt[k] != 0.0]
            if len(used) == 1:  # one tensor: the op weighs it (the torch sum is that tensor times 1)
                h2, sums = used[0], [float(nxt[k] != 0.0) for k in _H2_BASIS]
            else:
                h2, sums = (1.0 if used else 0.0), [nxt[k] for k in _H2_BASIS]
            rows.append([a_i, b_i, big_a, big_b, 0.0, 0.0, nxt[_M1], h2])
            host.append([*corrected, *sums])
        self._host = host
        device = self.timesteps.device
        aux = torch.tensor(host, dtype=torch.float64, device=device)
        self._aux = {(device, torch.float64): aux, (device, torch.float32): aux.float()}
        return torch.tensor(rows, dtype=torch.float64, device=device)

    def _aux_table(self, sample: torch.Tensor) -> torch.Tensor:
        cdt = _checks.compute_dtype(sample.dtype)
        key = (sample.device, cdt)
        if key not in self._aux:
            self._aux[key] = self._aux[(self.timesteps.device, torch.float64)].to(sample.device, cdt)
        return self._aux[key]

    def prepare_gmm(self, sample: torch.Tensor):
        """As :meth:`FusedStepMixin.prepare_gmm` (no GMM here: it returns None); also converts the tables to the
        sample's device and compute dtype and fills the empty history slots and ``last_sample`` with zeros (in
        the compute dtype, as the fused step keeps them) so that a compiled loop sees tensors at every step."""
        super().prepare_gmm(sample)
        self._check_solvable()  # a compiled step cannot raise at the step itself
        self._aux_table(sample)
        cdt = _checks.compute_dtype(sample.dtype)

        def zeros():  # one tensor per slot: aliased slots would be a guard, and a recompile once they differ
            return torch.zeros(sample.shape, dtype=cdt, device=sample.device)

        self.model_outputs = [zeros() if h is None else h for h in self.model_outputs]
        if self.last_sample is None:
            self.last_sample = zeros()
        return None

    # -- the step ---------------------------------------------------------------------------------------------
    def _converted_in_torch(self, model_output, sample, a_t, b_t):
        """M_i as diffusers' ``convert_model_output`` computes it, for the cases the op's prediction types do not
        cover (class docstring)."""
        c = self.config
        if self.predict_x0:
            return torch_data_prediction(self, model_output, sample, a_t, b_t)
        if c.prediction_type == "sample":
            return (sample - a_t * model_output) / b_t
        return a_t * model_output + b_t * sample  # v_prediction

    @staticmethod
    def _weighted_sum(weights, tensors):
        """sum w_k t_k: host floats (zero terms and missing tensors skipped) or 0-d tensors (every term)."""
        out = None
        for w, t in zip(weights, tensors, strict=True):
            if t is None or (not isinstance(w, torch.Tensor) and w == 0.0):
                continue
            if out is None:
                out = t * w if isinstance(w, torch.Tensor) or w != 1.0 else t
            else:
                out = out + t * w if isinstance(w, torch.Tensor) else torch.add(out, t, alpha=w)
        return out

    @stock_signature(UniPCMultistepScheduler.step)
    def step(self, model_output, timestep, sample, return_dict=True) -> SchedulerOutput | tuple:
        """One UniPC step (corrector, then predictor) as one fused op call; arguments and outputs as
        ``UniPCMultistepScheduler.step``."""
        check_timesteps_set(self.num_inference_steps is not None)
        if not self._fused():
            return super().step(model_output, timestep, sample, return_dict)
        check_model_output(model_output, sample)
        c = self.config
        i = self._index(timestep, sample.device)
        if self._singular and not isinstance(i, torch.Tensor):
            self._check_solvable(i)
        out_dtype = sample.dtype
        sample = sample.to(torch.float32) if sample.dtype != torch.float64 else sample
        table = self._table(sample)
        compiled = isinstance(i, torch.Tensor)

        pred = c.prediction_type
        if self.predict_x0:
            data_pred = fused_data_prediction(c)
            fused, op_pred = data_pred is not None, data_pred or "sample"
        else:
            fused, op_pred = pred == "epsilon", "epsilon"
        if fused:
            m = model_output
        else:
            row = table[i] if not compiled else table.index_select(0, i.clamp(min=0).reshape(1))[0]
            m = self._converted_in_torch(model_output.to(sample.dtype), sample, row[0], row[1])
        if m.dtype not in (sample.dtype, table.dtype):
            m = m.to(table.dtype)

        order = c.solver_order
        history = self.model_outputs  # [M_{i-order}, ..., M_{i-1}]
        olds = [history[-k] if k <= order else None for k in (1, 2, 3)]  # M_{i-1}, M_{i-2}, M_{i-3}
        last = self.last_sample
        if last is not None and last.dtype != table.dtype:
            last = last.to(table.dtype)
        h2_tensors = (olds[1], olds[2], last)
        if compiled:
            aux = self._aux_table(sample).index_select(0, i.clamp(min=0).reshape(1))[0]  # no host read of i
            corr_w, h2_w = list(aux[:6].unbind()), list(aux[6:].unbind())
        else:
            corr_w, h2_w = self._host[i][:6], self._host[i][6:]
        h2 = self._weighted_sum(h2_w, h2_tensors)
        if olds[0] is None:
            history_in: tuple[torch.Tensor, ...] = ()  # the run's first step: its row has H1 = H2 = 0
        else:
            history_in = (olds[0],) if h2 is None else (olds[0], h2)
        out = self._fused_step(m, sample, i, prediction_type=op_pred, gmm=None, rows=table, history=history_in)
        prev = out.prev_sample
        converted = out.pred_original_sample if self.predict_x0 else m.to(table.dtype)

        # the corrected sample x_i^c (diffusers' last_sample for the next step): x_i itself with the corrector off
        corrected = self._weighted_sum(corr_w, (sample, converted, *olds, last))
        self.last_sample = sample if corrected is None else corrected
        # the history, as diffusers keeps it: the newest converted output last (a new list; no tensor modified)
        self.model_outputs = [*self.model_outputs[1:], converted]
        if not compiled:
            self.timestep_list = [*self.timestep_list[1:], timestep]
            self.this_order = self._order(i, self._rows_start)  # type: ignore[has-type]
            self.lower_order_nums = min(self.lower_order_nums + 1, order)
            self._step_index += 1  # type: ignore[operator,assignment]  # diffusers types _step_index as None
        prev = prev.to(out_dtype)
        if not return_dict:
            return (prev,)
        return scheduler_output(SchedulerOutput, prev_sample=prev)


publish(UniPCMultistepGMMScheduler, SchedulerOutput)
