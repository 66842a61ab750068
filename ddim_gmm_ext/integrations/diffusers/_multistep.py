"""What the multistep schedulers (DPM-Solver++, UniPC) share: their prediction types, the path coefficients of
their sigmas, the data prediction (in the kernel, or in torch where the op's formulas are not diffusers'), the
check of their sigmas, and the step index of a run (diffusers' host counter, which restarts the solver's order
count at a run's first step)."""

from __future__ import annotations

import torch
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from ._args import check_host_step
from ._output import scheduler_output

#: the prediction types of the multistep schedulers (DPM-Solver++, UniPC)
MULTISTEP_PREDICTIONS = ("epsilon", "sample", "v_prediction", "flow_prediction")


def check_multistep_prediction(prediction_type) -> None:
    if prediction_type not in MULTISTEP_PREDICTIONS:
        raise ValueError(
            f"prediction_type must be 'epsilon', 'sample', 'v_prediction' or 'flow_prediction', got {prediction_type!r}"
        )


def fused_data_prediction(config) -> str | None:
    """The op's ``prediction_type`` that gives a multistep scheduler's data prediction x0_hat from the model output
    in the kernel, or None where diffusers' torch conversion is needed (:func:`torch_data_prediction`): dynamic
    thresholding (a per-sample quantile), v on a flow path, a flow output on a VP path."""
    pred = config.prediction_type
    if config.thresholding:
        return None
    if pred in ("epsilon", "sample") or (pred == "v_prediction" and not config.use_flow_sigmas):
        return pred
    return "flow" if pred == "flow_prediction" and config.use_flow_sigmas else None


def multistep_alpha_sigma(scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) float64 on the CPU of every entry of a multistep scheduler's ``sigmas`` (x = a x0 + b eps), as
    diffusers' ``_sigma_to_alpha_sigma_t``: a flow path (``use_flow_sigmas``) a = 1 - sigma, b = sigma; a VP path
    a = 1 / sqrt(sigma^2 + 1), b = sigma a (sigma = b / a)."""
    sigma = scheduler.sigmas.detach().to("cpu", torch.float64)
    if scheduler.config.use_flow_sigmas:
        return 1 - sigma, sigma
    a = 1 / (sigma.square() + 1).sqrt()
    return a, sigma * a


#: the config keys a multistep scheduler's sigmas come from, named by :func:`check_multistep_sigmas`
_SIGMA_KEYS = (
    "beta_schedule", "beta_start", "beta_end", "trained_betas", "rescale_betas_zero_snr", "use_karras_sigmas",
    "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas", "flow_shift",
    "use_dynamic_shifting", "sigma_min", "sigma_max", "shift_terminal",
)  # fmt: skip


def check_multistep_sigmas(scheduler, argument: str | None = None) -> None:
    """At ``set_timesteps``: every entry of a multistep scheduler's ``sigmas`` must be a point of its path (x = a x0 +
    b eps with a, b >= 0): finite, > 0 (the last one >= 0: a step to the data), and <= 1 on a flow path (a = 1 -
    sigma). Otherwise (beta_end near 1 makes alphas_cumprod 0 and sigma inf; a flow_shift of 0, inf or NaN gives NaN
    or zero sigmas) the stock scheduler returns non-finite samples or fails at a later step: a ValueError naming the
    sigmas, the config keys they come from and ``argument`` (the set_timesteps argument that gave them, if any)."""
    sigma = scheduler.sigmas.detach().to("cpu", torch.float64)
    flow = bool(getattr(scheduler.config, "use_flow_sigmas", False))
    bad = ~torch.isfinite(sigma) | (sigma < 0)
    bad[:-1] |= sigma[:-1] == 0
    if flow:
        bad |= sigma > 1
    if not bool(bad.any()):
        return
    where = bad.nonzero().flatten().tolist()
    shown = ", ".join(f"sigmas[{i}] = {sigma[i].item()}" for i in where[:4]) + (", ..." if len(where) > 4 else "")
    c = scheduler.config
    keys = ", ".join(
        f"{k}={'<given>' if k == 'trained_betas' else repr(c[k])}"
        for k in _SIGMA_KEYS
        if k in c and (k != "trained_betas" or c[k] is not None)
    )
    raise ValueError(
        f"the schedule's sigmas must be finite and > 0 (the last one >= 0){', and <= 1 on a flow path' if flow else ''}"
        f", got {len(where)} that are not ({shown}) from {f'the {argument} argument and ' if argument else ''}the "
        f"config ({keys}): the samples would be non-finite. Use betas below 1 (beta_end < 1 keeps alphas_cumprod > "
        "0), a finite flow_shift > 0, or such sigmas"
    )


def torch_data_prediction(scheduler, model_output, sample, a_t, b_t):
    """x0_hat as diffusers' multistep ``convert_model_output`` computes it in torch (then dynamic thresholding),
    for the prediction types the fused op does not cover; ``scheduler`` gives the config and
    ``_threshold_sample``."""
    c = scheduler.config
    if c.prediction_type == "epsilon":
        x0 = (sample - b_t * model_output) / a_t
    elif c.prediction_type == "sample":
        x0 = model_output
    elif c.prediction_type == "v_prediction":
        x0 = a_t * sample - b_t * model_output
    else:  # flow_prediction: x0 = x - sigma v with diffusers' sigma (b / a on a VP path)
        x0 = sample - (b_t if c.use_flow_sigmas else b_t / a_t) * model_output
    return scheduler._threshold_sample(x0) if c.thresholding else x0  # noqa: SLF001


class MultistepIndexMixin:
    """The step index of a multistep scheduler: diffusers' host counter (``step_index``, ``set_begin_index``), or
    under ``torch.compile`` a 0-d device tensor (the timestep's first position in the schedule; -1 when absent: an
    all-NaN step), with the host counters left alone. A run whose first step is not the rows' (a pipeline's begin
    index, a loop started mid-schedule) gets rows of its own from :meth:`_restart` (diffusers restarts its order
    count there). Listed before :class:`~._base.FusedStepMixin`."""

    _rows_start: int = 0  # the first step of the run the rows were built for

    def _restart(self, start: int) -> None:
        """Install the rows of a run beginning at step ``start``."""
        raise NotImplementedError

    def _index(self, timestep, device: torch.device):
        if torch.compiler.is_compiling():
            return self._compiled_index(timestep, device)
        if self.step_index is None:
            self._init_step_index(timestep)
        i = self.step_index
        n = self.timesteps.shape[0]
        if not 0 <= i < n:
            check_host_step(i, n)
        if self.lower_order_nums == 0 and i != self._rows_start:
            self._restart(i)
        return i


def multistep_output(scheduler, out, dtype: torch.dtype, return_dict: bool, order: int | None):
    """The end of a fused multistep step: the op's data prediction appended to the history as diffusers keeps it
    (the newest last; a new list, no tensor modified), diffusers' host counters advanced up to ``order`` (None: the
    step index is a device tensor under ``torch.compile``, the host counters stay), and the sample in ``dtype``
    returned as ``return_dict`` asks."""
    prev = out.prev_sample
    scheduler.model_outputs = [*scheduler.model_outputs[1:], out.pred_original_sample]
    if order is not None:
        scheduler.lower_order_nums = min(scheduler.lower_order_nums + 1, order)
        scheduler._step_index += 1
    if prev.dtype != dtype:
        prev = prev.to(dtype)
    if not return_dict:
        return (prev,)
    return scheduler_output(SchedulerOutput, prev_sample=prev)
