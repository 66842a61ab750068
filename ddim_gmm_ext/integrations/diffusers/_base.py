"""What the fused diffusers schedulers share: the row table and the one fused step call
(:class:`FusedStepMixin`), and for the schedulers whose steps draw noise the GMM config keys, tables and Philox
stream (:class:`GMMSchedulerMixin`).

A scheduler (a diffusers scheduler subclass listing the mixin first):

* with :class:`GMMSchedulerMixin`, calls :meth:`GMMSchedulerMixin._init_gmm` at the end of its ``__init__`` (it
  reads the GMM config keys as one :class:`~ddim_gmm_ext.gmm_options.GMMOptions`); a scheduler whose steps draw no
  noise (Euler, UniPC) lists :class:`DeterministicMixin` instead and takes no GMM;
* installs its rows in ``set_timesteps`` with :meth:`FusedStepMixin._set_rows` (:func:`coefficient_rows`: one row
  per inference step, in sampling order, on the schedule's device; they go into a
  :class:`~._row_table.RowTable`);
* calls :meth:`FusedStepMixin._fused_step` once per ``step``.

The argument checks (:mod:`._args`), the row table (:mod:`._row_table`), the hand-built output (:mod:`._output`),
the registration (:mod:`._publish`) and the multistep helpers (:mod:`._multistep`) have modules of their own; their
names are importable from here too.
"""

from __future__ import annotations

import torch

from ... import _checks, api
from ...gmm import GMM
from ...gmm_options import CONFIG_KEYS, GMMOptions, check_gmm, check_gmm_steps
from .._common import stream_seed
from ._args import (
    CheckedBeginIndexMixin,
    check_begin_index,
    check_generator,
    check_host_step,
    check_model_output,
    check_step_count,
    python_value,
)
from ._multistep import (
    MULTISTEP_PREDICTIONS,
    check_multistep_prediction,
    check_multistep_sigmas,
    fused_data_prediction,
    multistep_alpha_sigma,
    torch_data_prediction,
)
from ._output import output_fields, scheduler_output
from ._publish import publish
from ._row_table import RowTable, coefficient_rows, zero_snr_rows

__all__ = [
    "GMM_CONFIG_KEYS",
    "MULTISTEP_PREDICTIONS",
    "CheckedBeginIndexMixin",
    "DeterministicMixin",
    "FusedStepMixin",
    "GMMSchedulerMixin",
    "HostCounterIndexMixin",
    "RowTable",
    "check_begin_index",
    "check_generator",
    "check_host_step",
    "check_model_output",
    "check_multistep_prediction",
    "check_multistep_sigmas",
    "check_step_count",
    "coefficient_rows",
    "draw_components",
    "fused_data_prediction",
    "multistep_alpha_sigma",
    "output_fields",
    "publish",
    "python_value",
    "scheduler_output",
    "torch_data_prediction",
    "zero_snr_rows",
]

_new_options = tuple.__new__  # StepOptions(...) without its Python __new__: this runs on every step

#: this package's config keys (every scheduler's that it has): stored as Python values (:func:`python_value`)
GMM_CONFIG_KEYS = (*CONFIG_KEYS.values(), "rfim_eta")


class FusedStepMixin:
    """The row table of a schedule and the one fused op call of a step: what every fused scheduler has, GMM or not.

    The rows live in one :class:`~._row_table.RowTable` (``self._row_table``, None before ``set_timesteps``);
    ``self._rows`` reads its float64 rows."""

    _row_table: RowTable | None = None
    _prepared_shape: tuple[int, ...] | None = None  # the sample shape of prepare_gmm (None: not called)
    _stream_seed: int = 0  # the Philox seed of the run (GMMSchedulerMixin draws it; 0 where no step draws noise)

    @property
    def _rows(self) -> torch.Tensor | None:
        """The schedule's float64 rows (gmm_steps applied); None before ``set_timesteps``."""
        return None if self._row_table is None else self._row_table.rows()

    def _set_rows(self, rows, *, default=None, warm: tuple = ()) -> None:
        """Install the rows of a new schedule (:class:`~._row_table.RowTable`'s ``rows``, ``default`` and ``warm``;
        the float32 copy on their device is made now, so that a compiled step finds it built), with ``gmm_steps``
        applied."""
        policy = getattr(self.config, "gmm_steps", "all")
        self._row_table = RowTable(rows, policy, default=default, warm=warm)
        self._prepared_shape = None

    def _restart_rows(self, rows: torch.Tensor) -> None:
        """New rows of the same schedule (a multistep run beginning at another step): ``gmm_steps`` as before,
        the run's stream seed kept."""
        self._row_table_or_raise().restart(rows)

    def _row_table_or_raise(self) -> RowTable:
        if self._row_table is None:
            raise ValueError("call set_timesteps before stepping (the coefficient table is built there)")
        return self._row_table

    def _schedule_rows(self) -> torch.Tensor:
        """The [S, 6] float64 rows of the schedule; ValueError before ``set_timesteps``."""
        return self._row_table_or_raise().rows()

    def _n_steps(self) -> int:
        """Number of steps (the GMM needs a parameter set for each): the rows of the coefficient table."""
        table = self._row_table  # read here, not through _row_table_or_raise: this runs on every step
        return (self._row_table_or_raise() if table is None else table).n_steps

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
        table = self._row_table
        if table is None:
            table = self._row_table_or_raise()
        return table.for_sample(sample)

    def _check_sample_arg(self, sample) -> None:
        if not isinstance(sample, torch.Tensor):
            raise TypeError(
                f"prepare_gmm(sample): sample must be a tensor like the loop's samples, got {type(sample).__name__}"
            )
        if self._row_table is None:
            raise ValueError("call set_timesteps before prepare_gmm")

    def prepare_gmm(self, sample: torch.Tensor) -> GMM | None:
        """Make what the steps need for samples like ``sample`` now (the rows in the sample's device and compute
        dtype); call it after ``set_timesteps`` and before running a compiled loop. Returns the GMM tables in use
        (None here: no GMM). The loop's steps must then take samples of ``sample``'s shape."""
        self._check_sample_arg(sample)
        self._prepared_shape = None  # this call's sample sets it
        self._table(sample)
        self._prepared_shape = tuple(sample.shape)
        return None

    # -- the step --------------------------------------------------------------------------------------
    def _compiled_index(self, timestep, device: torch.device) -> torch.Tensor:
        """The step index under ``torch.compile``: a 0-d device tensor, the timestep's first position in
        ``self.timesteps`` (no host sync, one graph for every step); -1 when absent (an all-NaN step)."""
        t = torch.as_tensor(timestep, device=device).reshape(())
        match = self.timesteps.to(device) == t.to(self.timesteps.dtype)
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
        # every field, in order: prediction_type, guidance_scale, clip_sample_range, use_clipped_model_output, seed,
        # sample_offset, noise, components, return_pred_original
        options = _new_options(
            _checks.StepOptions,
            (
                prediction_type,
                None,
                clip_sample_range,
                use_clipped_model_output,
                self._stream_seed,
                0,
                noise,
                components,
                return_pred_original,
            ),
        )
        if rows is None:
            table = self._row_table
            if table is None or self._prepared_shape is not None:
                rows = self._table(sample)
            else:  # _table's common case written out (no prepare_gmm shape to check): this runs on every step
                rows = table.for_sample(sample)
        return api.fused_step(model_output, sample, rows, index, gmm, options, history=history)


class DeterministicMixin(FusedStepMixin):
    """A scheduler whose steps draw no noise (Euler, UniPC): no GMM. ``gmm_variant`` (where the class has the key)
    and :meth:`set_gmm_params` are refused with :meth:`_gmm_refusal`'s message."""

    gmm = None  # the GMM tables in use: none

    def _gmm_refusal(self, source: str) -> str:
        """Why this scheduler takes no GMM, as the message of the ValueError that ``source`` (the user's call:
        "gmm_variant='ortho'" or "set_gmm_params") raises."""
        raise NotImplementedError

    def _refuse_gmm_variant(self) -> None:
        """At the end of ``__init__``: a ``gmm_variant`` other than None is refused."""
        variant = getattr(self.config, "gmm_variant", None)
        if variant is not None:
            raise ValueError(self._gmm_refusal(f"gmm_variant={variant!r}"))

    def set_gmm_params(self, gmm_params: GMM | None = None) -> None:
        """Refused (no noise for a mixture to replace) but for None, which changes nothing."""
        if gmm_params is not None:
            raise ValueError(self._gmm_refusal("set_gmm_params"))


class GMMSchedulerMixin(FusedStepMixin):
    """The GMM plumbing of a drop-in diffusers scheduler whose steps draw noise: its GMM config keys, GMM tables and
    Philox stream, on top of :class:`FusedStepMixin` (the rows and the fused step).

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
        stored = {k: python_value(v) for k, v in self.config.items() if k in GMM_CONFIG_KEYS}
        if stored:  # Euler and UniPC have few or none
            self.register_to_config(**stored)
        # gmm_steps: its form here; indices are checked against the steps by set_timesteps
        self._gmm_options = GMMOptions.from_config(self.config)
        for key in ("gmm_share_across_steps", "gmm_uniform_priors"):  # GMMOptions takes any truth value
            if key in stored and not isinstance(stored[key], bool):
                raise TypeError(f"{key} must be a bool, got {stored[key]!r}")
        if self._gmm_options.variant is not None:
            self._refuse_gmm(f"gmm_variant={self._gmm_options.variant!r}")
        self._user_gmm: GMM | None = None
        self._built_gmm: GMM | None = None
        self._built_key: tuple | None = None  # (per-sample shape, steps, device, float64) of _built_gmm
        self._stream_seed = 0
        self._seed_pending = False  # seed=None: the stream seed is drawn at the first step that uses it
        self._last_stream_index: int | None = None  # host position of the run's latest step that used the stream

    # -- GMM tables -------------------------------------------------------------------------------------
    def set_gmm_params(self, gmm_params: GMM | None = None) -> None:
        """Use these GMM tables (one parameter set per inference step, or shared) instead of building them
        from the config; None goes back to the config. Refused, as ``gmm_variant`` is, where the steps have no
        noise for a mixture to replace."""
        if gmm_params is not None:
            self._refuse_gmm("set_gmm_params")
            if not isinstance(gmm_params, GMM):
                raise TypeError(f"gmm_params must be a ddim_gmm_ext.GMM, got {type(gmm_params).__name__}")
            if self._row_table is not None:
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

    def _set_rows(self, rows, *, default=None, warm: tuple = ()) -> None:
        """As :meth:`FusedStepMixin._set_rows` ("matched" waits for the GMM: :meth:`RowTable.gate_for`); a new
        schedule begins a run: its stream seed is the config's, or drawn later by :meth:`_use_stream`."""
        super()._set_rows(rows, default=default, warm=warm)
        self._new_run()
        if self._user_gmm is not None:
            check_gmm_steps(self._user_gmm, self._n_steps(), "gmm_params")

    def prepare_gmm(self, sample: torch.Tensor) -> GMM | None:
        """Build (or check) the GMM tables for samples like ``sample`` now; call it after ``set_timesteps`` and
        before running a compiled loop, which cannot build them inside the graph. Returns the tables in use.

        It begins a run (with ``seed=None``, a fresh stream seed; see the class docstring); the loop's steps must
        then take samples of ``sample``'s shape."""
        self._check_sample_arg(sample)
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
        table = self._row_table_or_raise()
        n_steps = table.n_steps
        if gmm is not None:
            check_gmm(gmm, sample, n_steps, "gmm_params")
            table.gate_for(gmm)
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
        table.gate_for(self._built_gmm)
        return self._built_gmm

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

    def _gmm_components(self, generator, gmm: GMM | None, index, sample: torch.Tensor, position=None):
        """The GMM components of step ``index`` (None where the op draws them, or GMM off): from ``generator``
        where one is given (:func:`draw_components`), else the op's Philox stream, whose run seed
        :meth:`_use_stream` settles (``position``: the step's host position in the schedule, where known)."""
        if gmm is None:
            return None
        if generator is not None:
            return draw_components(generator, gmm, int(index), sample)
        self._use_stream(position)
        return None

    def _torch_noise(self, generator, gmm) -> bool:
        """Whether the step's Gaussian noise comes from ``randn_tensor`` (``generator``, or torch's global RNG as
        the stock scheduler draws it: GMM off and no seed) rather than from the Philox stream."""
        return generator is not None or (gmm is None and getattr(self.config, "seed", None) is None)

    def _check_gmm_ready(self) -> None:
        """A GMM configured before ``set_timesteps`` is an error, not a silent stock step."""
        if self._row_table is None and (self._user_gmm is not None or getattr(self.config, "gmm_variant", None)):
            raise ValueError(
                f"{type(self).__name__} has a GMM (gmm_variant={getattr(self.config, 'gmm_variant', None)!r}"
                f"{', set_gmm_params' if self._user_gmm is not None else ''}) but set_timesteps was not called: "
                "call scheduler.set_timesteps(num_inference_steps) before step"
            )


class HostCounterIndexMixin:
    """The step index of a drop-in that steps with the stock class's host counter (``step_index``, set from
    ``timestep`` or the begin index at the first step), listed before the stock class."""

    def _index(self, timestep, device: torch.device):
        """The host counter, checked against the schedule's length, or under ``torch.compile`` a 0-d device
        tensor (the timestep's first position in the schedule; -1 when absent: an all-NaN step)."""
        if torch.compiler.is_compiling():
            return self._compiled_index(timestep, device)
        i = self._step_index  # the stock step_index property's value
        if i is None:
            try:
                self._init_step_index(timestep)
            except IndexError:
                raise ValueError(
                    f"timestep {timestep!r} is not in the schedule (scheduler.timesteps); pass one of "
                    "scheduler.timesteps or call set_begin_index"
                ) from None
            i = self._step_index
        table = self._row_table  # _n_steps's common case written out: this runs on every step
        check_host_step(i, self._n_steps() if table is None else table.n_steps)
        return i


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
