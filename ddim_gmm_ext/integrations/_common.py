"""What the sampler integrations share: argument checks, seeds, GMM tables, progress bars.

Seeds (one rule for every integration):

* ``seed`` an int: the GMM tables are built from it and the per-step noise / component draws come from the
  Philox stream of ``(seed, sample index, step index)`` (docs/design.md section 2): reproducible, and the same
  sample whatever the batch size or position.
* ``seed=None``: the tables are built from seed 0 and each sampling run draws its stream seed from torch's
  default CPU generator, so ``torch.manual_seed`` controls the run as it does for diffusers / k-diffusion.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Integral, Real

import torch

from .. import _checks
from ..gmm import GMM, GMM_VARIANTS, gmm_step_mask, resolve_scale, validate_gmm_steps


def check_eta(eta, name: str = "eta") -> float:
    """eta as a float in [0, 1] (beyond 1 the noise would exceed the noise level of the target time)."""
    if isinstance(eta, torch.Tensor) or not isinstance(eta, Real) or not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {eta!r}")
    return float(eta)


def check_loop_arguments(model, extra_args, callback, noise_sampler=None) -> Mapping:
    """A sampling loop's model, extra_args, callback and noise_sampler, checked before any work (each is first
    used inside the loop, where a bad one failed naming nothing): model callable, extra_args None or a mapping
    (the model's keyword arguments; returned, {} for None), callback and noise_sampler callable or None."""
    if not callable(model):
        raise TypeError(f"model must be callable (the denoiser), got {type(model).__name__}")
    if extra_args is not None and not isinstance(extra_args, Mapping):
        raise TypeError(
            f"extra_args must be None or a dict of the model's keyword arguments, got {type(extra_args).__name__}"
        )
    for name, value in (("callback", callback), ("noise_sampler", noise_sampler)):
        if value is not None and not callable(value):
            raise TypeError(f"{name} must be callable or None, got {type(value).__name__} {value!r}")
    return {} if extra_args is None else extra_args


def check_seed(seed) -> int | None:
    """A sampler's ``seed``: None or an int in [0, 2**64)."""
    return _checks.check_seed(seed, allow_none=True)


def stream_seed(seed: int | None) -> int:
    """The Philox seed of one sampling run (see the module docstring)."""
    if seed is not None:
        return int(seed)  # a NumPy integer too (np.uint64 arithmetic overflows where int does not)
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def check_gmm_options(variant, n_components, scale, scale_per_dim=None, prefix: str = "") -> None:
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


def step_gmms(gmm: GMM | None, gmm_steps, final_step: str, c, g=1.0) -> list[GMM | None]:
    """The GMM each step of a host loop passes (None: a Gaussian step), decided once before the loop: where
    ``final_step`` and ``gmm_steps`` (:func:`ddim_gmm_ext.gmm.gmm_step_mask`; "matched" reads the tables and the
    noise std c of every step) both allow the mixture. ``gmm=None`` on a step is what g = 0 is in a coefficient
    table (the same noise, no offset), and the list is host data: no sync in the loop. ``c``: [S] noise stds in
    the loop's sample space; ``g``: the GMM scale per step (1 on VP paths)."""
    n = len(c)
    policy = validate_gmm_steps(gmm_steps, n)  # checked with the GMM off too, as the other GMM options
    if gmm is None:
        return [None] * n
    gs = torch.as_tensor(g, dtype=torch.float64).expand(n).clone()
    if final_step == "gaussian":
        gs[-1] = 0.0
    return [gmm if acts else None for acts in gmm_step_mask(policy, gmm, c, gs)]


def multistep_weights(order: int, k: tuple[float, float, float], r0: float, r1: float) -> tuple[float, ...]:
    """(w0, w1, w2): k0 D0 + k1 D1 + k2 D2 as weights of (m0, m1, m2), the data predictions of this step and the
    two before. Order 2: D1 = (m0 - m1) / r0. Order 3: D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1,
    D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1) (DPM-Solver++ paper, eq. 3.x).
    Shared by the diffusers scheduler and the k-diffusion samplers."""
    k0, k1, k2 = k
    if order == 1:
        return k0, 0.0, 0.0
    if order == 2:
        return k0 + k1 / r0, -k1 / r0, 0.0
    d10 = (1 / r0, -1 / r0, 0.0)
    d11 = (0.0, 1 / r1, -1 / r1)
    diff = [p - q for p, q in zip(d10, d11, strict=True)]
    d1 = [p + r0 / (r0 + r1) * q for p, q in zip(d10, diff, strict=True)]
    d2 = [q / (r0 + r1) for q in diff]
    return tuple(k0 * (j == 0) + k1 * p + k2 * q for j, (p, q) in enumerate(zip(d1, d2, strict=True)))


def per_sample_dim(sample: torch.Tensor) -> int:
    return math.prod(sample.shape[1:])


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


def check_gmm_steps(gmm: GMM, n_steps: int, name: str = "gmm") -> None:
    if not gmm.shared and gmm.n_steps < n_steps:
        raise ValueError(
            f"{name} has parameter sets for {gmm.n_steps} steps but sampling takes {n_steps}: build it with "
            f"n_steps={n_steps} or share_across_steps=True"
        )


def build_gmm(
    variant,
    sample: torch.Tensor,
    n_steps: int,
    *,
    n_components,
    scale,
    share_across_steps,
    uniform_priors,
    seed: int | None,
    scale_per_dim: float | None = None,
) -> GMM:
    """GMM tables for ``sample``'s per-sample size on its device (float64 tables for float64 samples).
    ``scale_per_dim``, when given, replaces ``scale`` (s = scale_per_dim * sqrt(D), :func:`GMM.create`)."""
    return GMM.create(
        per_sample_dim(sample),
        n_components=n_components,
        n_steps=n_steps,
        scale=None if scale_per_dim is not None else float(scale),
        scale_per_dim=scale_per_dim,
        variant=variant,
        share_across_steps=share_across_steps,
        uniform_priors=uniform_priors,
        seed=0 if seed is None else seed,
        device=sample.device,
        dtype=_checks.compute_dtype(sample.dtype),
    )


def resolve_gmm(
    gmm,
    sample: torch.Tensor,
    n_steps: int,
    *,
    n_components,
    scale,
    share_across_steps,
    uniform_priors,
    seed: int | None,
    scale_per_dim: float | None = None,
) -> GMM | None:
    """``gmm`` as a sampler argument: None (plain DDIM / RFIM), a :class:`GMM` (checked against the sample and
    the number of steps), or a variant name (tables built for this run from the other options)."""
    if gmm is None:
        return None
    if isinstance(gmm, str):
        check_gmm_options(gmm, n_components, scale, scale_per_dim)
        return build_gmm(
            gmm,
            sample,
            n_steps,
            n_components=n_components,
            scale=scale,
            share_across_steps=share_across_steps,
            uniform_priors=uniform_priors,
            seed=seed,
            scale_per_dim=scale_per_dim,
        )
    check_gmm(gmm, sample, n_steps)
    return gmm


def progress_bar(iterable, disable: bool | None, desc: str):
    """A tqdm.auto bar over ``iterable``; ``disable`` as tqdm's (None: off when the output is not a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=disable)
