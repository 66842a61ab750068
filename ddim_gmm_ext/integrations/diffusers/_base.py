"""What the fused diffusers schedulers share: the GMM config keys, the per-step coefficient table, the step index
taken from the ``timestep`` argument, the one fused step call, and the registration with diffusers.

A scheduler built on :class:`GMMSchedulerMixin` (a diffusers scheduler subclass listing the mixin first):

* calls :meth:`GMMSchedulerMixin._init_gmm` at the end of its ``__init__`` with the GMM config keys;
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

import torch

from ... import _checks, api
from ...gmm import GMM
from .._common import build_gmm, check_gmm, check_gmm_options, check_gmm_steps, check_seed, stream_seed


def coefficient_rows(a_t, b_t, a_s, b_s, c, final_step: str = "gmm") -> torch.Tensor:
    """[S, 6] float64 rows (a_t, b_t, A, B, c, g) from [S] float64 path coefficients and noise stds: g = 1,
    except g = 0 (the Gaussian step) on the last row when ``final_step`` is "gaussian"."""
    big_b = (b_s.square() - c.square()).clamp(min=0).sqrt()
    g = torch.ones_like(a_t)
    if final_step == "gaussian":
        g[-1] = 0.0
    return torch.stack([a_t, b_t, a_s, big_b, c, g], dim=-1)


class GMMSchedulerMixin:
    """GMM config keys, GMM tables, the step index and the fused step of a drop-in diffusers scheduler.

    GMM config keys (saved with ``save_pretrained``, overridable in ``from_config(config, **keys)``):

    * ``gmm_variant``: None (off), "rand", "ortho", "ortho-vub" or "ortho-vub*" (ORTHO-VUB shared by all steps);
    * ``gmm_n_components`` (K), ``gmm_scale``, ``gmm_share_across_steps``, ``gmm_uniform_priors``: as
      :meth:`ddim_gmm_ext.GMM.create`;
    * ``gmm_scale_per_dim``: the scale per coordinate instead of ``gmm_scale`` (s = gmm_scale_per_dim *
      sqrt(D)); None: ``gmm_scale`` is used;
    * ``final_step``: "gaussian" (default, the paper's model: no mixture on the last step, where the offsets
      would land on the output uncompensated) or "gmm" (the mixture at every step);
    * ``seed``: the GMM tables and the Philox noise / component stream; None: tables from seed 0, stream seed
      drawn from torch's default generator at each ``set_timesteps``.

    GMM tables are built on the first step after ``set_timesteps`` from that sample's per-sample size, device
    and dtype (one parameter set per inference step) and cached. Tables given with :meth:`set_gmm_params` take
    precedence and are never rebuilt (a size mismatch is an error).
    """

    def _init_gmm(self, gmm_variant, gmm_n_components, gmm_scale, seed, final_step="gaussian", scale_per_dim=None):
        check_gmm_options(gmm_variant, gmm_n_components, gmm_scale, scale_per_dim, prefix="gmm_")
        _checks.check_final_step(final_step)
        check_seed(seed)
        self._user_gmm: GMM | None = None
        self._built_gmm: GMM | None = None
        self._built_key = None
        self._rows: torch.Tensor | None = None  # [S, 6] float64 on the schedule's device
        self._tables: dict = {}  # (device, dtype) -> the rows in that compute dtype
        self._stream_seed = 0

    # -- GMM tables -------------------------------------------------------------------------------------
    def set_gmm_params(self, gmm_params: GMM | None = None) -> None:
        """Use these GMM tables (one parameter set per inference step, or shared) instead of building them
        from the config; None goes back to the config."""
        if gmm_params is not None:
            if not isinstance(gmm_params, GMM):
                raise TypeError(f"gmm_params must be a ddim_gmm_ext.GMM, got {type(gmm_params).__name__}")
            if self._rows is not None:
                check_gmm_steps(gmm_params, self._n_steps(), "gmm_params")
        self._user_gmm = gmm_params

    @property
    def gmm(self) -> GMM | None:
        """The GMM tables in use: those of :meth:`set_gmm_params`, else the ones built at the last step."""
        return self._user_gmm if self._user_gmm is not None else self._built_gmm

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
        finds it built); picks the run's stream seed."""
        self._rows = rows
        self._tables = {(rows.device, torch.float32): rows.float()}
        self._stream_seed = stream_seed(getattr(self.config, "seed", None))  # Euler has no seed key
        if self._user_gmm is not None:
            check_gmm_steps(self._user_gmm, rows.shape[0], "gmm_params")

    def _table(self, sample: torch.Tensor) -> torch.Tensor:
        """The rows on the sample's device in its compute dtype (converted once per schedule)."""
        cdt = torch.float64 if sample.dtype == torch.float64 else torch.float32
        key = (sample.device, cdt)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = self._schedule_rows().to(sample.device, cdt)
        return table

    def prepare_gmm(self, sample: torch.Tensor) -> GMM | None:
        """Build (or check) the GMM tables for samples like ``sample`` now; call it after ``set_timesteps`` and
        before running a compiled loop, which cannot build them inside the graph. Returns the tables in use."""
        if self._rows is None:
            raise ValueError("call set_timesteps before prepare_gmm")
        gmm = self._gmm_for(sample)
        if gmm is not None:
            gmm.tables(sample)  # converted to the sample's device and compute dtype outside the graph
        self._table(sample)
        return gmm

    def _gmm_for(self, sample: torch.Tensor) -> GMM | None:
        """The GMM tables of this schedule (None when GMM is off), built or checked against ``sample``."""
        gmm = self._user_gmm
        if gmm is None and self.config.gmm_variant is None:
            return None
        n_steps = self._n_steps()
        if gmm is not None:
            check_gmm(gmm, sample, n_steps, "gmm_params")
            return gmm
        c = self.config
        if c.gmm_variant is None:
            return None
        key = (tuple(sample.shape[1:]), n_steps, sample.device, sample.dtype == torch.float64)
        if key != self._built_key:
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    "the GMM tables are built at the first step, which cannot happen inside a compiled graph: call "
                    "scheduler.prepare_gmm(sample) (or set_gmm_params) after set_timesteps, before the compiled loop"
                )
            self._built_gmm = build_gmm(
                c.gmm_variant,
                sample,
                n_steps,
                n_components=c.gmm_n_components,
                scale=c.gmm_scale,
                share_across_steps=c.gmm_share_across_steps,
                uniform_priors=c.gmm_uniform_priors,
                seed=c.seed,
                scale_per_dim=c.gmm_scale_per_dim,
            )
            self._built_key = key
        return self._built_gmm

    # -- the step --------------------------------------------------------------------------------------
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
    ):
        """One fused op call for step ``index`` (a host int, or a 0-d int64 tensor on the sample's device).

        ``rows``: the [S, 6] table in the compute dtype (default: this schedule's). The op gathers the row, the
        GMM parameter set and the Philox step itself: nothing about the step number is read on the host. The
        scheduler has settled every argument :func:`ddim_gmm_ext.step_from_table` would check, so it goes to
        :func:`ddim_gmm_ext.api.fused_step` (the op checks shapes, dtypes and devices itself)."""
        return api.fused_step(
            model_output,
            sample,
            self._table(sample) if rows is None else rows,
            index,
            gmm,
            prediction_type=prediction_type,
            clip_sample_range=clip_sample_range,
            use_clipped_model_output=use_clipped_model_output,
            seed=self._stream_seed,
            noise=noise,
            components=components,
        )


def check_step_count(value, name: str = "num_inference_steps") -> int:
    """A step count as a positive int (bool refused: True is not a step count)."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


_OUTPUT_FIELDS: dict[type, tuple[str, ...] | None] = {}


def scheduler_output(cls, **values):
    """``cls(**values)`` for a diffusers output dataclass, built without ``BaseOutput``'s generic
    ``__post_init__`` (about a quarter of a small fused step on CPU): the same entries (the non-None fields, in
    field order) and attributes (every field). Falls back to ``cls(**values)`` for a class whose construction
    is not ``BaseOutput``'s or a call that is not one value per field."""
    names = _OUTPUT_FIELDS.get(cls, ())
    if names == ():
        from diffusers.utils import BaseOutput

        standard = all(
            getattr(cls, m) is getattr(BaseOutput, m) for m in ("__post_init__", "__setattr__", "__setitem__")
        )
        names = _OUTPUT_FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls)) if standard else None
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


def draw_components(generator, gmm: GMM, step_index: int, sample: torch.Tensor) -> torch.Tensor:
    """k [B] ~ Categorical(priors of the step), from one generator for the batch or one per sample."""
    priors = gmm.tables(sample)[0][gmm.set_index(step_index)]
    if isinstance(generator, list):
        k = torch.cat([torch.multinomial(priors.to(g.device), 1, generator=g) for g in generator])
    else:
        k = torch.multinomial(priors.to(generator.device), sample.shape[0], replacement=True, generator=generator)
    return k.to(sample.device)


def register_with_diffusers(cls, stock_name: str) -> None:
    """Make ``cls`` (a subclass of the diffusers scheduler ``stock_name``) a first-class diffusers scheduler.

    * ``diffusers.<cls name>`` is set, so ``scheduler.compatibles`` (which diffusers resolves by name in its
      own namespace) can list it, and configs naming it load in any compatible class;
    * its name joins the ``_compatibles`` of ``stock_name`` and of every scheduler compatible with it, so
      ``pipe.scheduler.compatibles`` offers it wherever the stock scheduler is offered;
    * ``cls.__module__`` is the public ``ddim_gmm_ext.diffusers``: ``save_pretrained`` records the component as
      ["ddim_gmm_ext.diffusers", name] and ``from_pretrained`` resolves it there once the module is imported.
    """
    import diffusers

    name = cls.__name__
    cls.__module__ = "ddim_gmm_ext.diffusers"
    setattr(diffusers, name, cls)
    stock = getattr(diffusers, stock_name)
    for other in {stock_name, *stock._compatibles}:
        klass = getattr(diffusers, other, None)
        if isinstance(klass, type) and name not in klass._compatibles:
            klass._compatibles = [*klass._compatibles, name]
