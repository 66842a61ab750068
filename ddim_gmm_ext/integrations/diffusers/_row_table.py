"""The coefficient rows of a diffusers scheduler's schedule: built in float64 once per ``set_timesteps``, gated
by ``gmm_steps``, and copied to each (device, compute dtype) a step asks for.

Row of step i (x_t -> x_s on the path x_t = a_t x0 + b_t eps): (a_t, b_t, A, B, c, g) with mean = A x0 + B eps,
A = a_s, B = sqrt(max(b_s^2 - c^2, 0)), c the noise std and g the GMM scale; a multistep solver's rows add
(H1, H2), the weights of the previous data predictions. Rows are rounded once to the compute dtype, as the
reference does.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

from ..._checks import compute_dtype
from ...gmm import GMM, gmm_step_mask


def coefficient_rows(a_t, b_t, a_s, b_s, c, g: torch.Tensor | None = None) -> torch.Tensor:
    """[S, 6] float64 rows (a_t, b_t, A, B, c, g) from [S] float64 path coefficients, noise stds and GMM scales
    ``g`` (default 1; a scheduler passes :meth:`GMMSchedulerMixin._final_step_g`)."""
    big_b = (b_s.square() - c.square()).clamp(min=0).sqrt()
    return torch.stack([a_t, b_t, a_s, big_b, c, torch.ones_like(a_t) if g is None else g], dim=-1)


#: the config keys behind a zero-SNR schedule and x0's clipping, named by :func:`zero_snr_rows`
ZERO_SNR_KEYS = ("rescale_betas_zero_snr", "timestep_spacing", "clip_sample", "thresholding")


def zero_snr_rows(a_t: torch.Tensor, config, bounded: bool, keys: tuple[str, ...] = ZERO_SNR_KEYS) -> None:
    """The rule for a_t = 0 (the zero-SNR timestep of ``rescale_betas_zero_snr=True``) with epsilon prediction,
    one for every scheduler, checked on the [S] float64 a_t of a schedule's rows: x0 = (x - b m) / a_t is +-inf
    there.

    * x0 clipped (``bounded``: ``clip_sample`` without ``thresholding``): the op computes x0 as (x - b m) * (1 / a_t)
      on every backend, +-inf, which clipping turns into +-r exactly as the stock scheduler does; the row keeps
      a_t = 0.
    * not clipped, or thresholded (the quantile of +-inf is NaN): the stock scheduler returns non-finite samples;
      a ValueError naming the scheduler's ``config`` values of ``keys`` instead, raised by ``set_timesteps`` when
      the schedule reaches a_t = 0."""
    if config.prediction_type != "epsilon" or bounded or not bool((a_t == 0).any()):
        return
    values = ", ".join(f"{k}={config[k]!r}" if isinstance(config[k], str) else f"{k}={config[k]}" for k in keys)
    raise ValueError(
        f"the schedule reaches a zero-SNR timestep (a_t = 0) with prediction_type='epsilon' and unclipped x0 "
        f"({values}): x0 = (x - b_t m) / a_t is infinite there (the stock scheduler returns non-finite samples). "
        "Use prediction_type='v_prediction' (what zero-SNR models are trained with), clip_sample=True without "
        "thresholding, or a timestep_spacing that does not reach the last training timestep ('leading')"
    )


def gate(rows: torch.Tensor, gmm_steps, gmm: GMM | None) -> torch.Tensor:
    """``rows`` with g = 0 on the steps ``gmm_steps`` leaves out (:func:`ddim_gmm_ext.gmm.gmm_step_mask` on the
    rows' c and g columns); "matched" without ``gmm`` (off, or not built yet) leaves them as they are."""
    if gmm_steps == "all" or (gmm_steps == "matched" and gmm is None):
        return rows
    host = rows.detach().to("cpu", torch.float64)
    acts = torch.tensor(gmm_step_mask(gmm_steps, gmm, host[:, 4], host[:, 5]), device=rows.device)
    out = rows.clone()
    out[:, 5] = torch.where(acts, rows[:, 5], torch.zeros_like(rows[:, 5]))
    return out


class RowTable:
    """The rows of one schedule, the one owner of them: float64 on the schedule's device, ``gmm_steps`` applied
    (an explicit form at once; "matched" once the GMM is known, :meth:`gate_for`), and a copy per (variant,
    device, compute dtype) a step asks for, made once.

    ``rows``: the [S, 6] ([S, 8] multistep) float64 rows, or a function of a *variant* giving them, for a scheduler
    whose rows depend on a step argument (DDIM's eta, the noise std column); ``default`` is the variant of
    :meth:`rows` without one (the schedule's own rows: their length is the number of steps). ``warm``: the
    variants whose float32 copy on the rows' device is made now, and again whenever the rows change, so that a
    compiled step finds it built (default: ``default``'s)."""

    def __init__(
        self,
        rows: torch.Tensor | Callable[[Hashable], torch.Tensor],
        gmm_steps="all",
        *,
        default: Hashable = None,
        warm: tuple = (),
    ) -> None:
        self._source = rows
        self.gmm_steps = gmm_steps
        self.default = default
        self.gated_for: GMM | None = None  # the GMM whose "matched" steps are in the rows (None: not yet)
        self._warm_variants = warm or (default,)
        self._gated: dict = {}  # variant -> float64 rows, gmm_steps applied
        self._copies: dict = {}  # (variant, device, dtype) -> the rows in that dtype
        self._warm()

    def _warm(self) -> None:
        self._gated.clear()
        self._copies.clear()
        self._last: tuple = (None, None, None)  # (device, sample dtype, table) of the last for_sample
        for variant in self._warm_variants:
            rows = self.rows(variant)
            self.table(rows.device, torch.float32, variant)
        self.n_steps: int = self.rows().shape[0]  # the number of steps (read at every GMM step)

    def rows(self, variant: Hashable = None) -> torch.Tensor:
        """The float64 rows of ``variant`` (None: the default's) with ``gmm_steps`` applied."""
        if variant is None:
            variant = self.default
        rows = self._gated.get(variant)
        if rows is None:
            source = self._source
            ungated = source(variant) if callable(source) else source
            rows = self._gated[variant] = gate(ungated, self.gmm_steps, self.gated_for)
        return rows

    def table(self, device: torch.device, dtype: torch.dtype, variant: Hashable = None) -> torch.Tensor:
        """The rows of ``variant`` (None: the default's) on ``device`` in ``dtype``, converted once."""
        key = (self.default if variant is None else variant, device, dtype)
        table = self._copies.get(key)
        if table is None:
            table = self._copies[key] = self.rows(key[0]).to(device, dtype)
        return table

    def for_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """The default rows on ``sample``'s device in its compute dtype (:meth:`table`); the last answer is kept
        at hand, keyed by the sample's device and dtype: this runs on every step."""
        device, dtype = sample.device, sample.dtype
        last_device, last_dtype, table = self._last
        if dtype is not last_dtype or device != last_device:
            table = self.table(device, compute_dtype(dtype))
            if not torch.compiler.is_compiling():  # a graph keeps no Python state of its own
                self._last = (device, dtype, table)
        return table

    def gate_for(self, gmm: GMM | None) -> None:
        """``gmm_steps="matched"``: put the matched steps of ``gmm`` into the rows, once per GMM, on the host
        (where the tables are built: a scheduler's first step or ``prepare_gmm``)."""
        if gmm is None or gmm is self.gated_for or self.gmm_steps != "matched":
            return
        if torch.compiler.is_compiling():
            raise RuntimeError(
                'gmm_steps="matched" is decided from the GMM tables outside the graph: call '
                "scheduler.prepare_gmm(sample) after set_timesteps, before the compiled loop"
            )
        self.gated_for = gmm
        self._warm()

    def restart(self, rows: torch.Tensor) -> None:
        """New rows of the same schedule (a multistep run beginning at another step), ``gmm_steps`` applied as
        before."""
        self._source = rows
        self._warm()
