"""GMM parameters of the DDIM-GMM kernel: priors, mean offsets and diagonal variance offsets per step."""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
import torch

from . import _checks, _gmm_tables

_VARIANT_ALIASES = {"ortho-vub*": ("ortho-vub", True)}
#: The variant names GMM.create accepts ("ortho-vub*" is ORTHO-VUB shared across steps).
GMM_VARIANTS = _checks.VARIANTS + tuple(_VARIANT_ALIASES)


def _resolve_device(device=None, gpu=None) -> torch.device:
    if gpu is not None:
        if device is not None:
            raise ValueError("pass either device or gpu, not both")
        return torch.device("cuda", int(gpu))
    return torch.device(device if device is not None else "cpu")


def resolve_scale(scale: float | None, scale_per_dim: float | None, dim: int) -> float:
    """The paper's scale s from either ``scale`` or ``scale_per_dim`` (s = scale_per_dim * sqrt(dim)); neither
    given: s = 1. Both given, or a negative / non-finite value: ValueError."""
    if scale is not None and scale_per_dim is not None:
        raise ValueError(
            f"pass scale or scale_per_dim, not both (got scale={scale!r}, scale_per_dim={scale_per_dim!r})"
        )
    for name, value in (("scale", scale), ("scale_per_dim", scale_per_dim)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0
        ):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if scale_per_dim is not None:
        return float(scale_per_dim) * math.sqrt(dim)
    return 1.0 if scale is None else float(scale)


class GMM:
    """Parameters M_t = (pi_t^k, delta_t^k, v_t^k) for S parameter sets (one per sampling step, in sampling
    order, or one shared by all steps).

    Attributes (tensors on ``device`` in ``dtype``): ``priors`` [S, K], ``offsets`` [S, K, D],
    ``var_offsets`` [S, K, Dv] with Dv = D for RAND / ORTHO, Dv = K for ORTHO-VUB (zero beyond Dv) and
    Dv = K - 1 for ORTHO-LR (eigenvalues along ``basis`` [S, K - 1, D]). ``shared``: one set (S = 1) used at every
    step, as opposed to per-step sets (S = ``n_steps``, which may be 1).

    Build with :meth:`create`, with :meth:`initialize` (the reference repository's argument names), or from
    tensors with :meth:`from_params`.
    """

    def __init__(self, device=None, gpu=None, dtype: torch.dtype = torch.float32):
        self.device = _resolve_device(device, gpu)
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.dtype = dtype
        self.priors: torch.Tensor | None = None
        self.offsets: torch.Tensor | None = None
        self.var_offsets: torch.Tensor | None = None
        # [S, r, D] orthonormal rows for a low-rank variant: var_offsets [S, K, r] are then the eigenvalues of
        # each component's variance offset in that basis, not per-coordinate values.
        self.basis: torch.Tensor | None = None
        self.variant = None
        self.scale = None
        self.shared = False
        self.n_steps: int = 0  # parameter sets are for this many sampling steps (0: not initialised)
        self._cache: dict[tuple, tuple] = {}

    # -- construction ------------------------------------------------------------------------------------
    def initialize(
        self,
        dim: int,
        n_components: int,
        n_steps: int,
        scale: float = 1.0,
        uniform_priors: bool = True,
        orthonormal: bool = True,
        upper_bound_vars: bool = False,
        share_across_steps: bool = False,
        seed: int = 0,
    ) -> GMM:
        """Reference-repository names: orthonormal=False -> RAND; orthonormal=True -> ORTHO;
        orthonormal=True, upper_bound_vars=True -> ORTHO-VUB."""
        key = _checks.check_seed(seed)
        assert key is not None  # check_seed refuses None here
        if upper_bound_vars and not orthonormal:
            raise ValueError("upper_bound_vars=True needs orthonormal=True (the VUB bounds hold for ORTHO offsets)")
        variant = ("ortho-vub" if upper_bound_vars else "ortho") if orthonormal else "rand"
        return self._build(dim, n_components, n_steps, scale, variant, share_across_steps, uniform_priors, key)

    def _build(self, dim, n_components, n_steps, scale, variant, share_across_steps, uniform_priors, seed) -> GMM:
        """Tables of ``variant`` from the package's random stream, by the fused ops (:mod:`._gmm_tables`)."""
        for name, flag in (("share_across_steps", share_across_steps), ("uniform_priors", uniform_priors)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        _checks.check_gmm_config(dim, n_components, n_steps, scale, variant)
        dim, n_components, n_steps = int(dim), int(n_components), int(n_steps)  # NumPy integers too
        if self.device.type == "meta":
            raise ValueError("device must hold data (cpu or cuda): the tables are drawn, then validated, got meta")
        tables = (share_across_steps, uniform_priors, seed, self.device, self.dtype)
        priors, offsets, var_offsets, basis = _gmm_tables.build(dim, n_components, n_steps, scale, variant, *tables)
        self._set(
            priors,
            offsets,
            var_offsets,
            variant=variant,
            scale=float(scale),
            n_steps=n_steps,
            shared=share_across_steps,
            basis=basis,
        )
        return self

    @classmethod
    def create(
        cls,
        dim: int,
        n_components: int = 8,
        n_steps: int = 50,
        scale: float | None = None,
        variant: str = "ortho-vub",
        share_across_steps: bool = False,
        uniform_priors: bool = True,
        seed: int = 0,
        device=None,
        dtype: torch.dtype = torch.float32,
        *,
        scale_per_dim: float | None = None,
    ) -> GMM:
        """variant: "rand", "ortho", "ortho-vub", "ortho-vub*" (ORTHO-VUB shared across steps) or "ortho-lr"
        (ORTHO's offsets with the exact low-rank covariance: the mixture's covariance is c^2 I in every direction,
        see :func:`ddim_gmm_ext.reference.low_rank_moments`; needs K < D).

        The offsets' size is given either as the paper's ``scale`` s (default 1.0) or as ``scale_per_dim``,
        with s = scale_per_dim * sqrt(dim): the per-coordinate size of an offset is s / sqrt(dim), so a
        ``scale_per_dim`` means the same thing at every model size (see :func:`resolve_scale`)."""
        scale = resolve_scale(scale, scale_per_dim, dim)
        if variant in _VARIANT_ALIASES:
            variant, share_across_steps = _VARIANT_ALIASES[variant]
        if variant not in _checks.VARIANTS:
            raise ValueError(f"variant must be one of {GMM_VARIANTS}, got {variant!r}")
        key = _checks.check_seed(seed)
        assert key is not None  # check_seed refuses None here
        return cls(device=device, dtype=dtype)._build(
            dim, n_components, n_steps, scale, variant, share_across_steps, uniform_priors, key
        )

    @classmethod
    def from_params(cls, priors, offsets, var_offsets, *, n_steps: int | None = None, basis=None) -> GMM:
        """A GMM from user tables: priors [S, K], offsets [S, K, D], var_offsets [S, K, Dv] with Dv <= D.
        S = 1 is shared across steps (``n_steps`` may then be any number of steps). With ``basis`` [S, Dv, D]
        (orthonormal rows), the low-rank form: var_offsets are then the eigenvalues, per component, of the
        variance offset in that basis (the noise covariance of component k is c^2 I - W^T diag(v_k) W, each
        direction clipped at 0). The tables are validated (finite, priors non-negative and summing to one,
        var_offsets >= 0, sum_k pi_k delta_k = 0 to 1e-4 relative, basis rows orthonormal to 1e-4) and not
        modified."""
        for name, t in (("priors", priors), ("offsets", offsets), ("var_offsets", var_offsets)):
            _checks.check_floating(name, t)
        _checks.check_same_device(priors=priors, offsets=offsets, var_offsets=var_offsets)
        if priors.dim() != 2 or offsets.dim() != 3 or var_offsets.dim() != 3:
            raise ValueError("priors, offsets, var_offsets must have shapes [S, K], [S, K, D], [S, K, Dv]")
        S, K = priors.shape
        if offsets.shape[:2] != (S, K) or var_offsets.shape[:2] != (S, K) or var_offsets.shape[2] > offsets.shape[2]:
            raise ValueError(
                f"inconsistent GMM tables: priors {tuple(priors.shape)}, offsets {tuple(offsets.shape)}, "
                f"var_offsets {tuple(var_offsets.shape)} (expected [S, K], [S, K, D], [S, K, Dv <= D])"
            )
        _checks.check_priors(priors)
        for name, t in (("offsets", offsets), ("var_offsets", var_offsets)):
            if not torch.isfinite(t).all():
                raise ValueError(f"{name} must be finite")
        if (var_offsets < 0).any():
            raise ValueError("var_offsets must be >= 0 (a negative variance offset would add noise beyond c)")
        if basis is not None:
            _checks.check_floating("basis", basis)
            _checks.check_same_device(priors=priors, basis=basis)
            Dv, D = var_offsets.shape[2], offsets.shape[2]
            if tuple(basis.shape) != (S, Dv, D):
                raise ValueError(f"basis must have shape [S, Dv, D] = [{S}, {Dv}, {D}], got {tuple(basis.shape)}")
            gram = basis.double() @ basis.double().transpose(1, 2)
            if (
                not torch.isfinite(gram).all()
                or (gram - torch.eye(Dv, dtype=torch.float64, device=gram.device)).abs().max() > 1e-4
            ):
                raise ValueError("basis rows must be orthonormal (basis @ basis^T = I to 1e-4)")
        mean = (priors.double()[:, :, None] * offsets.double()).sum(1)
        tol = 1e-4 * offsets.double().abs().amax().clamp(min=1e-30)
        if (mean.abs() > tol).any():
            raise ValueError("offsets must satisfy sum_k priors_k offsets_k = 0 (paper eq. 8)")
        if n_steps is not None and (not _checks.is_int(n_steps) or n_steps < 1):
            raise ValueError(f"n_steps must be None or an int >= 1, got {n_steps!r}")
        gmm = cls(device=priors.device, dtype=_checks.compute_dtype(priors.dtype))
        gmm._set(
            priors.to(gmm.dtype),
            offsets.to(gmm.dtype),
            var_offsets.to(gmm.dtype),
            variant="custom",
            scale=None,
            n_steps=int(n_steps) if n_steps is not None else S,
            shared=S == 1,
            basis=None if basis is None else basis.to(gmm.dtype),
        )
        return gmm

    def _set(self, priors, offsets, var_offsets, *, variant, scale, n_steps, shared, basis=None):
        if not shared and priors.shape[0] != n_steps:
            raise ValueError(f"n_steps ({n_steps}) must equal the number of parameter sets ({priors.shape[0]})")
        self.priors, self.offsets, self.var_offsets = priors, offsets, var_offsets
        self.basis = basis
        self.variant, self.scale, self.n_steps, self.shared = variant, scale, n_steps, shared
        self._cache = {}

    # -- use ---------------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._require()[1].shape[-1]

    @property
    def n_components(self) -> int:
        return self._require()[1].shape[1]

    def _require(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(priors, offsets, var_offsets), or RuntimeError for a GMM that was never built."""
        if self.priors is None or self.offsets is None or self.var_offsets is None:
            raise RuntimeError("GMM is not initialised: call initialize(...) or use GMM.create(...)")
        return self.priors, self.offsets, self.var_offsets

    def set_index(self, step_index: int) -> int:
        """Index into the S parameter sets for sampling step ``step_index``: a shared set serves any step (the
        op's index range), per-step sets the steps they were built for."""
        self._require()
        _checks.check_index("step_index", step_index, _checks.MAX_INDEX if self.shared else self.n_steps)
        return 0 if self.shared else step_index

    def tables(self, like: torch.Tensor):
        """All parameter sets: (priors [S, K], offsets [S, K, D], var_offsets [S, K, Dv], basis [S, r, D] or
        None), on ``like``'s device in its compute dtype (float64 for float64 samples, float32 otherwise).
        Converted tables are cached, so a sampling loop converts them once."""
        key = (like.device, _checks.compute_dtype(like.dtype))
        if key not in self._cache:
            device, dtype = key
            priors, offsets, var_offsets = (t.to(device=device, dtype=dtype) for t in self._require())
            basis = None if self.basis is None else self.basis.to(device=device, dtype=dtype)
            if torch.compiler.is_compiling():
                # Converted in the graph, not cached: filling the cache inside a compiled function makes the
                # graph depend on the cache's contents, and the next call (step 2) recompiles.
                return priors, offsets, var_offsets, basis
            self._cache[key] = (priors, offsets, var_offsets, basis)
        return self._cache[key]

    def step_tables(self, like: torch.Tensor):
        """:meth:`tables` as ``ddimgmm::step`` takes them: per-step sets stacked ([S, K], ...; the op range-checks
        the step index against S, even S = 1), a shared set unstacked ([K], [K, D], ...; used at every step).
        Cached as :meth:`tables`."""
        key = (like.device, _checks.compute_dtype(like.dtype), "step")
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        tables = self.tables(like)
        if self.shared:
            tables = tuple(None if t is None else t[0] for t in tables)
        if not torch.compiler.is_compiling():  # see tables()
            self._cache[key] = tables
        return tables

    def to(self, device=None, dtype=None) -> GMM:
        """A copy on another device / dtype."""
        out = GMM(device=device if device is not None else self.device, dtype=dtype or self.dtype)
        out._set(
            *(t.to(out.device, out.dtype) for t in self._require()),
            variant=self.variant,
            scale=self.scale,
            n_steps=self.n_steps,
            shared=self.shared,
            basis=None if self.basis is None else self.basis.to(out.device, out.dtype),
        )
        return out

    def __repr__(self) -> str:
        if self.offsets is None:
            return f"GMM(uninitialised, device={self.device})"
        S, K, D = self.offsets.shape
        return (
            f"GMM(variant={self.variant}, dim={D}, n_components={K}, n_steps={self.n_steps}, sets={S}, "
            f"scale={self.scale}, device={self.device}, dtype={self.dtype})"
        )


# -- where the mixture acts (gmm_steps) ------------------------------------------------------------------
#: ``gmm_steps`` by name: "all" (the mixture at every step ``final_step`` allows, the paper's) or "matched"
#: (only where the kernel is moment-matched, :func:`matched_steps`). The explicit forms are a list of step
#: indices (sampling order, 0 = first step) or a list of S bools (a mask).
GMM_STEP_POLICIES = ("all", "matched")


def validate_gmm_steps(gmm_steps, n_steps: int | None = None, name: str = "gmm_steps"):
    """``gmm_steps`` checked (ValueError naming ``name``) and normalised: "all", "matched", or, for the explicit
    forms, a tuple of ints (indices, with ``n_steps`` None) or a tuple of ``n_steps`` bools (the mask).

    Without ``n_steps`` (a config key, before the schedule is known) only the form is checked; with it the
    indices must lie in [0, n_steps) and a mask must have n_steps entries. Indices are ints by
    :func:`_checks.is_int` (NumPy integers too, bool refused); a mask holds only bools (NumPy's too), so a JSON
    round trip (tuple -> list) keeps its meaning."""
    if isinstance(gmm_steps, str):
        if gmm_steps not in GMM_STEP_POLICIES:
            raise ValueError(
                f"{name} must be one of {GMM_STEP_POLICIES}, a list of step indices or a boolean mask of the steps, "
                f"got {gmm_steps!r}"
            )
        return gmm_steps
    values = gmm_steps.tolist() if isinstance(gmm_steps, (torch.Tensor, np.ndarray)) else gmm_steps
    if not isinstance(values, (list, tuple)):
        raise ValueError(
            f"{name} must be one of {GMM_STEP_POLICIES}, a list of step indices or a boolean mask of the steps, "
            f"got {type(gmm_steps).__name__} {gmm_steps!r}"
        )
    if values and all(isinstance(v, (bool, np.bool_)) for v in values):
        if n_steps is not None and len(values) != n_steps:
            raise ValueError(f"{name} as a boolean mask must have one entry per step ({n_steps}), got {len(values)}")
        return tuple(bool(v) for v in values)
    bad = [v for v in values if not _checks.is_int(v)]
    if bad:
        raise ValueError(
            f"{name} must hold step indices (ints) or only bools (a mask), got {bad[0]!r} in {list(values)!r}"
        )
    outside = [int(v) for v in values if v < 0 or (n_steps is not None and v >= n_steps)]
    if outside:
        bound = f"[0, {n_steps})" if n_steps is not None else ">= 0"
        raise ValueError(f"{name} step indices must be in {bound} (sampling order, 0 = first step), got {outside}")
    if n_steps is None:
        return tuple(int(v) for v in values)
    chosen = {int(v) for v in values}
    return tuple(i in chosen for i in range(n_steps))


def _per_step(values, n_steps: int, name: str) -> torch.Tensor:
    """[n_steps] float64 on the CPU from a number or a sequence / tensor of n_steps numbers."""
    t = torch.as_tensor(values, dtype=torch.float64).detach().cpu().reshape(-1)
    if t.numel() == 1:
        t = t.expand(n_steps)
    if t.numel() != n_steps:
        raise ValueError(f"{name} must give one value per step ({n_steps}), got {t.numel()}")
    return t


def matched_steps(gmm: GMM, c, g=1.0) -> list[bool]:
    """The one rule of where the mixture is moment-matched: per step i (sampling order), whether nothing clips.

    Step i's mixture draws k ~ pi and noise of covariance c_i^2 I - g_i^2 Delta_k, each coordinate (RAND, ORTHO,
    ORTHO-VUB: variance offsets v_k[i][d]) or eigen-direction (ORTHO-LR: v_k[i][j] along ``gmm.basis`` row j)
    clipped at 0 (docs/design.md 1.3). Its covariance is c_i^2 I, the Gaussian kernel's, only where no direction
    clips:

        matched(i)  <=>  g_i^2 v_k[i][j] <= c_i^2   for every component k and every coordinate / direction j
                    <=>  g_i^2 max_{k, j} v_k[i][j] <= c_i^2

    Elsewhere (low noise: late steps, small eta) the offsets add variance that no noise compensates. A step with
    g_i = 0 (a Gaussian step) is matched.

    Args:
        gmm: the tables; step i uses parameter set i (set 0 when shared).
        c: the noise std per step ([S] numbers, or one for every step), in the sample space of the path.
        g: the GMM scale per step (the coefficient rows' g column: 1 on VP paths, 1 / a_s on VE paths; 0 on a
            Gaussian step), or one number.

    Decided on the host in float64 from one copy of the tables' per-set maxima: call it where the tables are
    built (a scheduler's first step or ``prepare_gmm``, a sampler before its loop), never per step.
    Returns S bools."""
    c = torch.as_tensor(c, dtype=torch.float64).detach().cpu().reshape(-1)
    n = c.numel()
    g = _per_step(g, n, "g")
    vmax = gmm._require()[2].detach().amax(dim=(1, 2)).to("cpu", torch.float64)  # noqa: SLF001  [S sets]
    if gmm.shared:
        vmax = vmax[:1].expand(n)
    elif vmax.numel() < n:
        raise ValueError(f"gmm has parameter sets for {vmax.numel()} steps but {n} noise stds were given")
    return (g.square() * vmax[:n] <= c.square()).tolist()


def gmm_step_mask(gmm_steps, gmm: GMM | None, c, g=1.0, name: str = "gmm_steps") -> list[bool]:
    """Whether the mixture acts at each step: ``gmm_steps`` (checked, naming ``name``) and g != 0 (a Gaussian
    step, such as the last one under ``final_step="gaussian"``: both must allow it). "matched" applies
    :func:`matched_steps` (needs ``gmm``). ``c``, ``g`` as there; S = len(c)."""
    n = torch.as_tensor(c).numel()
    gs = _per_step(g, n, "g")
    policy = validate_gmm_steps(gmm_steps, n, name)
    if policy == "all":
        allowed = [True] * n
    elif policy == "matched":
        if gmm is None:
            raise ValueError(f'{name}="matched" needs the GMM tables (the rule reads their variance offsets)')
        allowed = matched_steps(gmm, c, gs)
    else:
        allowed = list(policy)
    return [a and bool(gi != 0) for a, gi in zip(allowed, gs.tolist(), strict=True)]


def clipped_fraction(gmm: GMM, c, g=1.0, mask=None) -> float:
    """The fraction of mixture steps (g != 0 and ``mask``, default every step) whose kernel clips (not
    :func:`matched_steps`); NaN when the mixture acts at no step."""
    n = torch.as_tensor(c).numel()
    gs = _per_step(g, n, "g").tolist()
    acting = [gi != 0 and (mask is None or bool(mask[i])) for i, gi in enumerate(gs)]
    matched = matched_steps(gmm, c, gs)
    n_acting = sum(acting)
    if n_acting == 0:
        return math.nan
    return sum(a and not m for a, m in zip(acting, matched, strict=True)) / n_acting
