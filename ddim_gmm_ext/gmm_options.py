"""The GMM options of a sampler as one frozen value: checked once, built into tables, planned over the steps.

Every sampler outside diffusers holds one :class:`GMMOptions` (k-diffusion and rectified-flow samplers,
latent-diffusion's ``DDIMSampler``, the ComfyUI nodes): the checks, the table build and the decision of which
steps the mixture acts on (the final-step rule and ``gmm_steps``) live here and nowhere else. The field names are
the function keywords; diffusers config keys spell the same fields with a ``gmm_`` prefix (:data:`CONFIG_KEYS`;
``seed`` and ``final_step`` as here), read by :meth:`GMMOptions.from_config`.
"""

from __future__ import annotations

import dataclasses
import math
from numbers import Integral, Real
from typing import Any, TypedDict

import torch

from . import _checks
from .gmm import GMM, GMM_VARIANTS, gmm_step_mask, resolve_scale, validate_gmm_steps


def per_sample_dim(sample: torch.Tensor) -> int:
    return math.prod(sample.shape[1:])


def check_gmm_steps(gmm: GMM, n_steps: int, name: str = "gmm") -> None:
    if not gmm.shared and gmm.n_steps < n_steps:
        raise ValueError(
            f"{name} has parameter sets for {gmm.n_steps} steps but sampling takes {n_steps}: build it with "
            f"n_steps={n_steps} or share_across_steps=True"
        )


def check_gmm(gmm: GMM, sample: torch.Tensor, n_steps: int, name: str = "gmm") -> None:
    """A user's GMM must match the per-sample size and hold a parameter set for each of the n_steps steps."""
    if not isinstance(gmm, GMM):
        raise TypeError(f"{name} must be a ddim_gmm_ext.GMM, got {type(gmm).__name__}")
    dim = per_sample_dim(sample)
    if gmm.dim != dim:
        raise ValueError(
            f"{name} was built for dim={gmm.dim} but each sample has {dim} elements (shape {tuple(sample.shape)})"
        )
    check_gmm_steps(gmm, n_steps, name)


def check_mixture_options(variant, n_components, scale, scale_per_dim=None, prefix: str = "") -> None:
    """Options of a GMM built by name; the dimension is checked when the first sample is seen. ``prefix``:
    how the caller names them ("gmm_" for the schedulers' config keys). ``scale_per_dim`` replaces ``scale``,
    whose default is 1: a scale_per_dim beside any other scale is an error, not a silent choice."""
    if variant is not None and variant not in GMM_VARIANTS:
        raise ValueError(f"{prefix or 'GMM '}variant must be None (off) or one of {GMM_VARIANTS}, got {variant!r}")
    if isinstance(n_components, bool) or not isinstance(n_components, Integral) or n_components < 1:
        raise ValueError(f"{prefix}n_components must be an int >= 1, got {n_components!r}")
    if isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"{prefix}scale must be a finite number >= 0, got {scale!r}")
    if scale_per_dim is not None:
        resolve_scale(None, scale_per_dim, 1)  # the value's check (the dimension comes with the first sample)
        if scale != 1.0:
            raise ValueError(
                f"pass {prefix}scale or {prefix}scale_per_dim, not both: {prefix}scale_per_dim replaces "
                f"{prefix}scale (got {prefix}scale={scale!r}, {prefix}scale_per_dim={scale_per_dim!r}; leave "
                f"{prefix}scale at its default 1)"
            )


@dataclasses.dataclass(frozen=True)
class GMMOptions:
    """Where and how a sampler's GMM acts; checked when made (ValueError / TypeError naming the option).

    ``variant``: None (off) or a name of :data:`ddim_gmm_ext.gmm.GMM_VARIANTS`, built per run with
    ``n_components`` (K), ``scale`` (the paper's s) or ``scale_per_dim`` (s = scale_per_dim sqrt(D); with it
    ``scale`` stays 1), ``share_across_steps``, ``uniform_priors`` and ``seed`` (None: tables from seed 0, the
    run's stream from torch's generator). ``tables``: a user's :class:`~ddim_gmm_ext.GMM` instead of a variant
    (checked against the sample when the run starts). ``final_step``: "gaussian" (no mixture on the last step,
    the paper's model) or "gmm". ``gmm_steps``: "all", "matched" (only steps whose kernel does not clip), step
    indices or a boolean mask (normalised by :func:`~ddim_gmm_ext.gmm.validate_gmm_steps`; indices are checked
    against the steps of each run)."""

    variant: str | None = None
    n_components: int = 8
    scale: float = 1.0
    scale_per_dim: float | None = None
    share_across_steps: bool = False
    uniform_priors: bool = True
    seed: int | None = None
    final_step: str = "gaussian"
    gmm_steps: Any = "all"
    tables: GMM | None = None

    def __post_init__(self) -> None:
        if self.variant is not None and self.tables is not None:
            raise ValueError("pass a GMM variant or GMM tables, not both")
        check_mixture_options(self.variant, self.n_components, self.scale, self.scale_per_dim)
        _checks.check_final_step(self.final_step)
        object.__setattr__(self, "seed", _checks.check_seed(self.seed, allow_none=True))
        object.__setattr__(self, "gmm_steps", validate_gmm_steps(self.gmm_steps))

    @classmethod
    def from_config(cls, config) -> GMMOptions:
        """The options of a diffusers scheduler's config (a mapping or an attribute namespace), keys as
        :data:`CONFIG_KEYS`; the mixture options are checked under their config names (``gmm_scale`` ...)."""
        get = config.get if hasattr(config, "get") else lambda key, default: getattr(config, key, default)
        values = {field: get(key, _DEFAULTS[field]) for field, key in CONFIG_KEYS.items()}
        check_mixture_options(
            values["variant"], values["n_components"], values["scale"], values["scale_per_dim"], prefix="gmm_"
        )
        return cls(**values)

    @property
    def on(self) -> bool:
        """Whether a mixture is configured (a variant or tables)."""
        return self.variant is not None or self.tables is not None

    def replace(self, **changes) -> GMMOptions:
        """A copy with ``changes``, checked as a new value."""
        return dataclasses.replace(self, **changes)

    def build(self, sample: torch.Tensor, n_steps: int, variant: str | None = None) -> GMM:
        """Tables of ``variant`` (default: this value's) for ``sample``'s per-sample size on its device (float64
        tables for float64 samples), one parameter set per step of ``n_steps`` (or one shared)."""
        variant = variant if variant is not None else self.variant
        if variant is None:
            raise ValueError("GMMOptions.build needs a variant (the options have none)")
        return GMM.create(
            per_sample_dim(sample),
            n_components=self.n_components,
            n_steps=n_steps,
            scale=None if self.scale_per_dim is not None else float(self.scale),
            scale_per_dim=self.scale_per_dim,
            variant=variant,
            share_across_steps=self.share_across_steps,
            uniform_priors=self.uniform_priors,
            seed=0 if self.seed is None else self.seed,
            device=sample.device,
            dtype=_checks.compute_dtype(sample.dtype),
        )

    def resolve(self, sample: torch.Tensor, n_steps: int, name: str = "gmm") -> GMM | None:
        """The GMM of a run over ``n_steps`` steps from ``sample``: None (off), the user's tables (checked
        against the sample and the steps, naming ``name``) or tables built from the variant."""
        if self.tables is not None:
            check_gmm(self.tables, sample, n_steps, name)
            return self.tables
        return None if self.variant is None else self.build(sample, n_steps)

    def final_step_g(self, n_steps: int) -> list[float]:
        """Per step of ``n_steps`` 1.0 where the final-step rule (:func:`ddim_gmm_ext._checks.final_step_allows`)
        lets the mixture act and 0.0 where it does not: the g column of a VP coefficient table."""
        return [1.0 if _checks.final_step_allows(self.final_step, i, n_steps) else 0.0 for i in range(n_steps)]

    def plan(self, gmm: GMM | None, c, g=1.0) -> list[GMM | None]:
        """The GMM each step of a host loop passes (None: a Gaussian step), decided once before the loop: where
        the final-step rule (:func:`ddim_gmm_ext._checks.final_step_allows`) and ``gmm_steps``
        (:func:`ddim_gmm_ext.gmm.gmm_step_mask`; "matched" reads the tables and the noise std c of every step)
        both allow the mixture. ``gmm=None`` on a step is what g = 0 is in a coefficient table (the same noise,
        no offset), and the list is host data: no sync in the loop. ``c``: [S] noise stds in the loop's sample
        space; ``g``: the GMM scale per step (1 on VP paths)."""
        n = len(c)
        policy = validate_gmm_steps(self.gmm_steps, n)  # checked with the GMM off too, as the other options
        if gmm is None:
            return [None] * n
        gs = torch.as_tensor(g, dtype=torch.float64).expand(n) * torch.tensor(self.final_step_g(n), dtype=torch.float64)
        return [gmm if acts else None for acts in gmm_step_mask(policy, gmm, c, gs)]


class GMMKwargs(TypedDict, total=False):
    """:class:`GMMOptions` but ``variant`` / ``tables`` as the keywords of a sampler function
    (``**gmm_options: Unpack[GMMKwargs]``), beside its ``gmm`` (a variant name or tables, with the sampler's own
    default): the same names and types as the fields (a test holds them equal), in the order of :data:`CONFIG_KEYS`;
    the defaults are GMMOptions' (:func:`ddim_gmm_ext.integrations._common.gmm_keywords` lists them in a sampler's
    signature)."""

    n_components: int
    scale: float
    share_across_steps: bool
    uniform_priors: bool
    seed: int | None
    scale_per_dim: float | None
    final_step: str
    gmm_steps: Any


#: GMMOptions field -> the diffusers schedulers' config key (their convention: a ``gmm_`` prefix), in the order of
#: the schedulers' ``__init__`` signatures.
CONFIG_KEYS = {
    "variant": "gmm_variant",
    "n_components": "gmm_n_components",
    "scale": "gmm_scale",
    "share_across_steps": "gmm_share_across_steps",
    "uniform_priors": "gmm_uniform_priors",
    "seed": "seed",
    "scale_per_dim": "gmm_scale_per_dim",
    "final_step": "final_step",
    "gmm_steps": "gmm_steps",
}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GMMOptions)}
