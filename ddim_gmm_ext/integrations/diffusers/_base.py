"""What the fused diffusers schedulers share: the GMM config keys, the per-step coefficient table, the step index
taken from the ``timestep`` argument, the one fused step call, and the registration with diffusers.

A scheduler built on :class:`GMMSchedulerMixin` (a diffusers scheduler subclass listing the mixin first):

* calls :meth:`GMMSchedulerMixin._init_gmm` at the end of its ``__init__`` (it reads the GMM config keys as one
  :class:`~ddim_gmm_ext.gmm_options.GMMOptions`);
* fills ``self._rows`` in ``set_timesteps`` with :func:`coefficient_rows`: one row per inference step, in
  sampling order, on the schedule's device;
* calls :meth:`GMMSchedulerMixin._fused_step` once per ``step``.

Coefficient row of step i (x_t -> x_s on the path x_t = a_t x0 + b_t eps): (a_t, b_t, A, B, c, g) with
mean = A x0 + B eps, A = a_s, B = sqrt(max(b_s^2 - c^2, 0)), c the noise std and g the GMM scale (1 here).
The row is computed in float64 and rounded once to the compute dtype, as the reference does.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from numbers import Integral

import numpy as np
import torch

from ... import _checks, api
from ...gmm import GMM, gmm_step_mask
from ...gmm_options import CONFIG_KEYS, GMMOptions, check_gmm, check_gmm_steps
from .._common import stream_seed


def coefficient_rows(a_t, b_t, a_s, b_s, c, g: torch.Tensor | None = None) -> torch.Tensor:
    """[S, 6] float64 rows (a_t, b_t, A, B, c, g) from [S] float64 path coefficients, noise stds and GMM scales
    ``g`` (default 1; a scheduler passes :meth:`GMMSchedulerMixin._final_step_g`)."""
    big_b = (b_s.square() - c.square()).clamp(min=0).sqrt()
    return torch.stack([a_t, b_t, a_s, big_b, c, torch.ones_like(a_t) if g is None else g], dim=-1)


def zero_snr_rows(a_t: torch.Tensor, prediction_type: str, bounded: bool, config: str) -> None:
    """The rule for a_t = 0 (the zero-SNR timestep of ``rescale_betas_zero_snr=True``) with epsilon prediction,
    one for every scheduler, checked on the [S] float64 a_t of a schedule's rows: x0 = (x - b m) / a_t is +-inf
    there.

    * x0 clipped (``clip_sample`` without ``thresholding``): the op computes x0 as (x - b m) * (1 / a_t) on every
      backend, +-inf, which clipping turns into +-r exactly as the stock scheduler does; the row keeps a_t = 0.
    * not clipped, or thresholded (the quantile of +-inf is NaN): the stock scheduler returns non-finite samples;
      a ValueError naming ``config`` instead, raised by ``set_timesteps`` when the schedule reaches a_t = 0."""
    if prediction_type != "epsilon" or bounded or not bool((a_t == 0).any()):
        return
    raise ValueError(
        f"the schedule reaches a zero-SNR timestep (a_t = 0) with prediction_type='epsilon' and unclipped x0 "
        f"({config}): x0 = (x - b_t m) / a_t is infinite there (the stock scheduler returns non-finite samples). "
        "Use prediction_type='v_prediction' (what zero-SNR models are trained with), clip_sample=True without "
        "thresholding, or a timestep_spacing that does not reach the last training timestep ('leading')"
    )


#: this package's config keys (every scheduler's that it has): stored as Python values (:func:`python_value`)
GMM_CONFIG_KEYS = (*CONFIG_KEYS.values(), "rfim_eta")


def python_value(value):
    """``value`` with NumPy scalars / arrays and tensors made Python numbers and lists (a tuple becomes a list),
    as a config key stores it: ``save_pretrained`` writes JSON, and the JSON round trip gives the same value."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()  # a 0-d one gives a number
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [python_value(v) for v in value]
    return value


def check_begin_index(begin_index) -> int:
    """``set_begin_index``'s argument: an int >= 0, the position of the run's first step (stock diffusers stores
    any value; -1 would index the schedule from its end)."""
    if isinstance(begin_index, bool) or not isinstance(begin_index, Integral) or begin_index < 0:
        raise ValueError(
            f"begin_index must be an int >= 0 (the position in scheduler.timesteps of the run's first step), "
            f"got {begin_index!r}"
        )
    return int(begin_index)


class CheckedBeginIndexMixin:
    """``set_begin_index`` of a stock scheduler that has one, with its argument checked (:func:`check_begin_index`)
    when it is given, not at the step that reads it. Listed before the stock class."""

    def set_begin_index(self, begin_index: int = 0) -> None:
        super().set_begin_index(check_begin_index(begin_index))  # type: ignore[misc]  # the stock class's


def check_host_step(i: int, n_steps: int) -> None:
    """A host step counter past the schedule (a loop run again without ``set_timesteps``): the call to make."""
    if not 0 <= i < n_steps:
        raise ValueError(
            f"step {i} is past the end of the {n_steps}-step schedule; call set_timesteps before sampling again"
        )


class GMMSchedulerMixin:
    """GMM config keys, GMM tables, the step index and the fused step of a drop-in diffusers scheduler.

    GMM config keys (saved with ``save_pretrained``, overridable in ``from_config(config, **keys)``):

    * ``gmm_variant``: None (off), "rand", "ortho", "ortho-vub", "ortho-vub*" (ORTHO-VUB shared by all steps) or
      "ortho-lr" (the exact low-rank kernel);
    * ``gmm_n_components`` (K), ``gmm_scale``, ``gmm_share_across_steps``, ``gmm_uniform_priors``: as
      :meth:`ddim_gmm_ext.GMM.create`;
    * ``gmm_scale_per_dim``: the scale per coordinate instead of ``gmm_scale`` (s = gmm_scale_per_dim *
      sqrt(D)); None: ``gmm_scale`` is used;
    * ``final_step``: "gaussian" (default, the paper's model: no mixture on the last step, where the offsets
      would land on the output uncompensated) or "gmm" (the mixture at every step);
    * ``gmm_steps``: where the mixture acts, "all" (default, the paper's), "matched" (only steps whose kernel is
      moment-matched, nothing clipped: :func:`ddim_gmm_ext.gmm.matched_steps`), a list of step indices (sampling
      order, 0 = first step) or a boolean mask of the steps. Both it and ``final_step`` must allow a step. It
      goes into the coefficient table's g column (g = 0: a Gaussian step), so a step reads no host value. An
      explicit list is applied (and checked against the number of steps) by ``set_timesteps``; "matched"
      reads the GMM tables and each step's c, so it is decided where the tables are built: at the first step
      after ``set_timesteps``, or at :meth:`prepare_gmm` (needed before a compiled loop);
    * ``seed``: the GMM tables and the Philox noise / component stream; None: tables from seed 0, and

      - GMM off: the step's noise (if any) is drawn from torch's global RNG exactly as the stock scheduler draws
        it (``randn_tensor``), so a loop leaves the global RNG as the stock class does and ``torch.manual_seed``
        gives the stock samples;
      - GMM on: the stream seed is drawn from torch's global RNG once per run, lazily, at the run's first step
        that uses the stream (or at :meth:`prepare_gmm`), not at ``set_timesteps``: diffusers pipelines call
        ``set_timesteps`` before ``prepare_latents``, whose draw must stay the stock one. A run begins at
        ``set_timesteps`` and at :meth:`prepare_gmm`, and, for a step whose position in the schedule is known
        on the host, at a step that is not after the previous one (a loop run again without ``set_timesteps``,
        from the start or from a begin index): each run draws fresh noise, as the stock scheduler does.

      With a ``generator`` passed to ``step``, noise and components come from it and no seed is drawn.

    GMM tables are built on the first step after ``set_timesteps`` from that sample's per-sample size, device
    and dtype (one parameter set per inference step) and cached. Tables given with :meth:`set_gmm_params` take
    precedence and are never rebuilt (a size mismatch is an error).

    A configuration whose steps have no noise for a mixture to replace (:meth:`_gmm_refusal`) refuses a GMM from
    either source, ``gmm_variant`` or :meth:`set_gmm_params`, with the same ValueError.
    """

    def _gmm_refusal(self, source: str) -> str | None:
        """Why this configuration takes no GMM, as the message of the ValueError that ``source`` (the user's
        call: "gmm_variant='ortho'" or "set_gmm_params") raises; None where its steps have noise to replace. The
        one rule of a scheduler class, read by its constructor and by :meth:`set_gmm_params`."""
        return None

    def _refuse_gmm(self, source: str) -> None:
        reason = self._gmm_refusal(source)
        if reason is not None:
            raise ValueError(reason)

    def _init_gmm(self) -> None:
        """Check the GMM config keys (a key the scheduler does not have reads as its default) and hold them as
        one :class:`~ddim_gmm_ext.gmm_options.GMMOptions`; called at the end of ``__init__``."""
        # NumPy / tensor values of our keys become Python values in the config, so that save_pretrained's JSON
        # holds them and the checks below see what is stored
        stored = {k: python_value(v) for k, v in self.config.items() if k in GMM_CONFIG_KEYS}  # type: ignore[attr-defined]  # ConfigMixin's
        if stored:  # Euler and UniPC have few or none
            self.register_to_config(**stored)  # type: ignore[attr-defined]
        # gmm_steps: its form here; indices are checked against the steps by set_timesteps
        self._gmm_options = GMMOptions.from_config(self.config)  # type: ignore[attr-defined]
        for key in ("gmm_share_across_steps", "gmm_uniform_priors"):  # GMMOptions takes any truth value
            if key in stored and not isinstance(stored[key], bool):
                raise TypeError(f"{key} must be a bool, got {stored[key]!r}")
        if self._gmm_options.variant is not None:
            self._refuse_gmm(f"gmm_variant={self._gmm_options.variant!r}")
        self._user_gmm: GMM | None = None
        self._built_gmm: GMM | None = None
        self._built_key: tuple | None = None  # (per-sample shape, steps, device, float64) of _built_gmm
        self._rows: torch.Tensor | None = None  # [S, 6] ([S, 8] multistep) float64 on the device, gmm_steps applied
        self._ungated_rows: torch.Tensor | None = None  # the same before gmm_steps
        self._gated_for: GMM | None = None  # the GMM whose "matched" steps are in self._rows (None: not yet)
        self._tables: dict = {}  # (device, dtype) -> the rows in that compute dtype
        self._stream_seed = 0
        self._seed_pending = False  # seed=None: the stream seed is drawn at the first step that uses it
        self._last_stream_index: int | None = None  # host position of the run's latest step that used the stream
        self._prepared_shape: tuple[int, ...] | None = None  # the sample shape of prepare_gmm (None: not called)

    # -- GMM tables -------------------------------------------------------------------------------------
    def set_gmm_params(self, gmm_params: GMM | None = None) -> None:
        """Use these GMM tables (one parameter set per inference step, or shared) instead of building them
        from the config; None goes back to the config. Refused, as ``gmm_variant`` is, where the steps have no
        noise for a mixture to replace."""
        if gmm_params is not None:
            self._refuse_gmm("set_gmm_params")
            if not isinstance(gmm_params, GMM):
                raise TypeError(f"gmm_params must be a ddim_gmm_ext.GMM, got {type(gmm_params).__name__}")
            if self._rows is not None:
                check_gmm_steps(gmm_params, self._n_steps(), "gmm_params")
        self._user_gmm = gmm_params

    @property
    def gmm(self) -> GMM | None:
        """The GMM tables in use: those of :meth:`set_gmm_params`, else the ones built at the last step."""
        return self._user_gmm if self._user_gmm is not None else self._built_gmm

    def _final_step_g(self, n_steps: int) -> torch.Tensor:
        """[n_steps] float64 GMM scales of the final-step rule (:meth:`GMMOptions.final_step_g`): 1, or 0 on a
        step where the mixture is left out."""
        return torch.tensor(self._gmm_options.final_step_g(n_steps), dtype=torch.float64)

    def _schedule_rows(self) -> torch.Tensor:
        """The [S, 6] float64 rows of the schedule; ValueError before ``set_timesteps``."""
        if self._rows is None:
            raise ValueError("call set_timesteps before stepping (the coefficient table is built there)")
        return self._rows

    def _n_steps(self) -> int:
        """Number of steps the GMM needs parameter sets for: the rows of the coefficient table."""
        return self._schedule_rows().shape[0]

    def _set_rows(self, rows: torch.Tensor) -> None:
        """Install the [S, 6] float64 rows of a new schedule (and their float32 copy, so that a compiled step
        finds it built), with ``gmm_steps`` applied (:meth:`_gate`; "matched" waits for the GMM, see
        :meth:`_gate_for`). The run's stream seed is the config's, or drawn later by :meth:`_use_stream`."""
        self._ungated_rows, self._gated_for = rows, None
        rows = self._gate(rows, None)
        self._rows = rows
        self._tables = {(rows.device, torch.float32): rows.float()}
        self._new_run()
        self._prepared_shape = None
        if self._user_gmm is not None:
            check_gmm_steps(self._user_gmm, rows.shape[0], "gmm_params")

    def _gate(self, rows: torch.Tensor, gmm: GMM | None) -> torch.Tensor:
        """``rows`` [S, 6] with g = 0 on the steps ``gmm_steps`` leaves out (:func:`ddim_gmm_ext.gmm.gmm_step_mask`
        on the rows' c and g columns); "matched" without ``gmm`` (off, or not built yet) leaves them as they are."""
        policy = getattr(self.config, "gmm_steps", "all")  # Euler (deterministic) has no such key
        if policy == "all" or (policy == "matched" and gmm is None):
            return rows
        host = rows.detach().to("cpu", torch.float64)
        acts = torch.tensor(gmm_step_mask(policy, gmm, host[:, 4], host[:, 5]), device=rows.device)
        out = rows.clone()
        out[:, 5] = torch.where(acts, rows[:, 5], torch.zeros_like(rows[:, 5]))
        return out

    def _gate_for(self, gmm: GMM | None) -> None:
        """``gmm_steps="matched"``: put the matched steps of ``gmm`` into the rows, once per GMM (on the host,
        where the tables are built: the first step or :meth:`prepare_gmm`)."""
        if gmm is None or gmm is self._gated_for or getattr(self.config, "gmm_steps", "all") != "matched":
            return
        if torch.compiler.is_compiling():
            raise RuntimeError(
                'gmm_steps="matched" is decided from the GMM tables outside the graph: call '
                "scheduler.prepare_gmm(sample) after set_timesteps, before the compiled loop"
            )
        self._regate(gmm)

    def _regate(self, gmm: GMM) -> None:
        """Rebuild the rows (and drop their converted copies) with ``gmm``'s matched steps."""
        assert self._ungated_rows is not None  # set_timesteps ran: _gmm_for checks it
        self._gated_for = gmm
        self._rows = self._gate(self._ungated_rows, gmm)
        self._tables = {(self._rows.device, torch.float32): self._rows.float()}

    def _new_run(self) -> None:
        """A sampling run begins (class docstring): its stream seed is the config's, or (seed=None) pending, drawn
        by :meth:`_use_stream` when the run first uses the stream."""
        seed = getattr(self.config, "seed", None)  # Euler has no seed key
        self._stream_seed = 0 if seed is None else seed
        self._seed_pending = seed is None
        self._last_stream_index = None

    def _use_stream(self, index=None) -> None:
        """The Philox stream is about to be used by the step at ``index`` (its host position in the schedule, or
        None where the host does not know it): draw the run's stream seed from torch's global RNG if it is still
        pending (seed=None). A step not after the run's previous one begins a new run. Lazy so that
        set_timesteps and GMM-off loops leave the global RNG alone."""
        if isinstance(index, int):
            if self._last_stream_index is not None and index <= self._last_stream_index:
                self._new_run()
            self._last_stream_index = index
        if self._seed_pending:
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    "the stream seed (seed=None) is drawn from torch's global RNG at the first GMM step, which "
                    "cannot happen inside a compiled graph: call scheduler.prepare_gmm(sample) after set_timesteps, "
                    "before the compiled loop (or set the seed config key)"
                )
            self._stream_seed = stream_seed(None)
            self._seed_pending = False

    def _torch_noise(self, generator, gmm) -> bool:
        """Whether the step's Gaussian noise comes from ``randn_tensor`` (``generator``, or torch's global RNG as
        the stock scheduler draws it: GMM off and no seed) rather than from the Philox stream."""
        return generator is not None or (gmm is None and getattr(self.config, "seed", None) is None)

    def _check_gmm_ready(self) -> None:
        """A GMM configured before ``set_timesteps`` is an error, not a silent stock step."""
        if self._rows is None and (self._user_gmm is not None or getattr(self.config, "gmm_variant", None)):
            raise ValueError(
                f"{type(self).__name__} has a GMM (gmm_variant={getattr(self.config, 'gmm_variant', None)!r}"
                f"{', set_gmm_params' if self._user_gmm is not None else ''}) but set_timesteps was not called: "
                "call scheduler.set_timesteps(num_inference_steps) before step"
            )

    def _check_prepared(self, sample: torch.Tensor) -> None:
        """After :meth:`prepare_gmm`, a step's sample must have the shape it was given (a compiled loop's graph
        inputs, a multistep solver's zero history, are made for it)."""
        if tuple(sample.shape) != self._prepared_shape:
            raise ValueError(
                f"prepare_gmm was called with a sample of shape {self._prepared_shape} but step got a sample of "
                f"shape {tuple(sample.shape)}: call scheduler.set_timesteps(...), then scheduler.prepare_gmm(sample) "
                "with the loop's sample"
            )

    def _table(self, sample: torch.Tensor) -> torch.Tensor:
        """The rows on the sample's device in its compute dtype (converted once per schedule)."""
        if self._prepared_shape is not None:  # tested here: a call less per step without prepare_gmm
            self._check_prepared(sample)
        cdt = _checks.compute_dtype(sample.dtype)
        key = (sample.device, cdt)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = self._schedule_rows().to(sample.device, cdt)
        return table

    def prepare_gmm(self, sample: torch.Tensor) -> GMM | None:
        """Build (or check) the GMM tables for samples like ``sample`` now; call it after ``set_timesteps`` and
        before running a compiled loop, which cannot build them inside the graph. Returns the tables in use.

        It begins a run (with ``seed=None``, a fresh stream seed; see the class docstring); the loop's steps must
        then take samples of ``sample``'s shape."""
        if not isinstance(sample, torch.Tensor):
            raise TypeError(
                f"prepare_gmm(sample): sample must be a tensor like the loop's samples, got {type(sample).__name__}"
            )
        if self._rows is None:
            raise ValueError("call set_timesteps before prepare_gmm")
        self._prepared_shape = None  # this call's sample sets it
        gmm = self._gmm_for(sample)
        self._new_run()
        if gmm is not None:
            gmm.tables(sample)  # converted to the sample's device and compute dtype outside the graph
            self._use_stream()  # a compiled loop cannot draw the seed (seed=None) inside the graph
        self._table(sample)
        self._prepared_shape = tuple(sample.shape)
        return gmm

    def _gmm_for(self, sample: torch.Tensor) -> GMM | None:
        """The GMM tables of this schedule (None when GMM is off), built or checked against ``sample``."""
        if self._prepared_shape is not None:
            self._check_prepared(sample)
        gmm = self._user_gmm
        if gmm is None and self._gmm_options.variant is None:
            return None
        n_steps = self._n_steps()
        if gmm is not None:
            check_gmm(gmm, sample, n_steps, "gmm_params")
            self._gate_for(gmm)
            return gmm
        key = (tuple(sample.shape[1:]), n_steps, sample.device, sample.dtype == torch.float64)
        if key != self._built_key:
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    "the GMM tables are built at the first step, which cannot happen inside a compiled graph: call "
                    "scheduler.prepare_gmm(sample) (or set_gmm_params) after set_timesteps, before the compiled loop"
                )
            self._built_gmm = self._gmm_options.build(sample, n_steps)
            self._built_key = key
        self._gate_for(self._built_gmm)
        return self._built_gmm

    # -- the step --------------------------------------------------------------------------------------
    def _compiled_index(self, timestep, device: torch.device) -> torch.Tensor:
        """The step index under ``torch.compile``: a 0-d device tensor, the timestep's first position in
        ``self.timesteps`` (no host sync, one graph for every step); -1 when absent (an all-NaN step)."""
        t = torch.as_tensor(timestep, device=device).reshape(())
        match = self.timesteps.to(device) == t.to(self.timesteps.dtype)  # type: ignore[attr-defined]  # the scheduler's
        first = match.to(torch.int64).argmax()
        return torch.where(match.any(), first, torch.full_like(first, -1))

    def _fused_step(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        index,
        *,
        prediction_type: str,
        gmm: GMM | None,
        clip_sample_range: float | None = None,
        use_clipped_model_output: bool = False,
        noise: torch.Tensor | None = None,
        components: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        history: tuple[torch.Tensor, ...] = (),
        return_pred_original: bool = True,
    ):
        """One fused op call for step ``index`` (a host int, or a 0-d int64 tensor on the sample's device).

        ``rows``: the [S, 6] table in the compute dtype (default: this schedule's; [S, 8] with ``history``, a
        multistep solver's previous data predictions, see :func:`ddim_gmm_ext.api.fused_step`). The op gathers
        the row, the GMM parameter set and the Philox step itself: nothing about the step number is read on the
        host. The scheduler has settled every argument :func:`ddim_gmm_ext.step_from_table` would check, so it
        goes to :func:`ddim_gmm_ext.api.fused_step` (the op checks shapes, dtypes and devices itself)."""
        options = _checks.StepOptions(
            prediction_type,
            clip_sample_range=clip_sample_range,
            use_clipped_model_output=use_clipped_model_output,
            seed=self._stream_seed,
            noise=noise,
            components=components,
            return_pred_original=return_pred_original,
        )
        rows = self._table(sample) if rows is None else rows
        return api.fused_step(model_output, sample, rows, index, gmm, options, history=history)


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


def check_step_count(value, name: str = "num_inference_steps") -> int:
    """A step count as a positive int (bool refused: True is not a step count)."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


_OUTPUT_FIELDS: dict[type, tuple[str, ...] | None] = {}


def output_fields(cls) -> tuple[str, ...] | None:
    """The field names of a diffusers output dataclass whose construction is ``BaseOutput``'s (None otherwise),
    cached. Looked up eagerly when a scheduler module is imported (:func:`publish`): ``dataclasses.fields`` inside
    a graph Dynamo compiles fails ("dataclass fields failure"), a dict lookup does not."""
    names = _OUTPUT_FIELDS.get(cls, ())
    if names == ():
        from diffusers.utils import BaseOutput

        standard = all(
            getattr(cls, m) is getattr(BaseOutput, m) for m in ("__post_init__", "__setattr__", "__setitem__")
        )
        names = _OUTPUT_FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls)) if standard else None
    return names


def scheduler_output(cls, **values):
    """``cls(**values)`` for a diffusers output dataclass, built without ``BaseOutput``'s generic
    ``__post_init__`` (about a quarter of a small fused step on CPU): the same entries (the non-None fields, in
    field order) and attributes (every field). Falls back to ``cls(**values)`` for a class whose construction
    is not ``BaseOutput``'s, a class not looked up before a compiled call, or a call that is not one value per
    field."""
    names = _OUTPUT_FIELDS.get(cls, ())
    if names == ():
        names = None if torch.compiler.is_compiling() else output_fields(cls)
    if names is None or values.keys() != set(names) or isinstance(values[names[0]], dict):
        return cls(**values)
    out = cls.__new__(cls)
    OrderedDict.__init__(out)
    for name in names:
        value = values[name]
        if value is not None:
            OrderedDict.__setitem__(out, name, value)
        object.__setattr__(out, name, value)
    return out


def check_generator(generator, batch: int):
    """A generator, or a list of one per sample; a one-element list is one generator (as in randn_tensor)."""
    if isinstance(generator, (list, tuple)):
        if not all(isinstance(g, torch.Generator) for g in generator):
            raise TypeError("generator must be a torch.Generator or a list of torch.Generator")
        if len(generator) == 1:
            return generator[0]
        if len(generator) != batch:
            raise ValueError(
                f"generator is a list of {len(generator)} generators but the batch has {batch} samples; pass one "
                "generator per sample"
            )
        return list(generator)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
    return generator


def check_model_output(model_output, sample: torch.Tensor, name: str = "model_output") -> None:
    """The model output of a fused step: a real floating tensor of the sample's shape (checked before any noise is
    drawn for it, so that an error names the caller's argument)."""
    if not isinstance(model_output, torch.Tensor) or not model_output.is_floating_point():
        what = model_output.dtype if isinstance(model_output, torch.Tensor) else type(model_output).__name__
        raise TypeError(f"{name} must be a real floating-point tensor, got {what}")
    if model_output.shape != sample.shape:
        raise ValueError(f"{name} must have the sample's shape {tuple(sample.shape)}, got {tuple(model_output.shape)}")


def draw_components(generator, gmm: GMM, step_index: int, sample: torch.Tensor) -> torch.Tensor:
    """k [B] ~ Categorical(priors of the step), from one generator for the batch or one per sample."""
    if sample.shape[0] == 0:  # multinomial refuses to draw 0 samples; an empty batch needs none
        return torch.empty(0, dtype=torch.int64, device=sample.device)
    priors = gmm.tables(sample)[0][gmm.set_index(step_index)]
    if isinstance(generator, list):
        k = torch.cat([torch.multinomial(priors.to(g.device), 1, generator=g) for g in generator])
    else:
        k = torch.multinomial(priors.to(generator.device), sample.shape[0], replacement=True, generator=generator)
    return k.to(sample.device)


def publish(cls, output_cls) -> None:
    """What importing ``ddim_gmm_ext.diffusers`` does for a scheduler ``cls``; no stock class changes behaviour:

    * ``cls.__module__`` is the public ``ddim_gmm_ext.diffusers``: ``save_pretrained`` records the component as
      ["ddim_gmm_ext.diffusers", name] and ``from_pretrained`` resolves it there once the module is imported;
    * ``diffusers.<cls name>`` is set (a new name in diffusers' namespace, where diffusers resolves the class
      named in a saved config: a stock scheduler loading our config then drops the GMM keys quietly, and
      ``cls.compatibles`` lists ``cls``);
    * the fields of its output dataclass ``output_cls`` are looked up now (see :func:`output_fields`).

    Listing ``cls`` in the stock schedulers' ``compatibles`` changes stock classes: that is
    :func:`ddim_gmm_ext.diffusers.patch_diffusers`'s, an explicit call."""
    import diffusers

    cls.__module__ = "ddim_gmm_ext.diffusers"
    setattr(diffusers, cls.__name__, cls)
    output_fields(output_cls)
