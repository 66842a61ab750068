"""Sampling loops over the public steps (:func:`ddim_gmm_ext.ddim_step`, :func:`ddim_gmm_ext.rfim_step`) that
run several samplers side by side with paired randomness: every sampler starts from the same x_T and draws
the same step noise (the Philox stream is a function of seed, sample index and step), so their differences
are not blurred by sampling noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .. import _schedules, reference
from .._checks import check_final_step
from ..api import ddim_step, rfim_step
from ..gmm import GMM, GMM_VARIANTS
from ..gmm_options import GMMOptions

# The paper's training schedule (its appendix A.5); DDIM timesteps as latent-diffusion's (leading, +1).
BETAS: dict[str, Any] = dict(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="linear")
#: The most DDIM steps the schedule takes: leading timesteps with offset 1 reach t = 1000 at 1000 steps.
MAX_DDIM_STEPS = BETAS["num_train_timesteps"] - 1


def samplers(scales, variants=GMM_VARIANTS, baseline: str | None = "DDIM", per_dim: bool = False):
    """(name, variant, scale) of the baseline (variant None; left out if ``baseline`` is None) and of every
    GMM variant at every offset scale, named like "GMM-ORTHO-VUB s=1" (or "GMM-ORTHO-VUB s/vD=0.1" when the
    scales are per-coordinate, ``per_dim``: s = scale_per_dim * sqrt(D))."""
    if baseline is not None:
        yield baseline, None, None
    label = "s/vD" if per_dim else "s"
    for variant in variants:
        for s in scales:
            yield f"GMM-{variant.upper()} {label}={s:g}", variant, s


def make_gmms(sampler_list, dim: int, n_components: int, steps: int, seed: int, per_dim: bool = False) -> list:
    """One GMM (None for the baseline) per (name, variant, scale) of ``sampler_list``, for ``steps`` sampling
    steps, uniform priors, drawn from ``seed``; ``per_dim``: the scales are ``scale_per_dim`` of
    :meth:`GMM.create` (s = scale_per_dim * sqrt(dim))."""
    key = "scale_per_dim" if per_dim else "scale"
    return [
        None
        if variant is None
        else GMM.create(dim, n_components=n_components, n_steps=steps, variant=variant, seed=seed, **{key: scale})
        for _, variant, scale in sampler_list
    ]


#: The Philox step counter of the initial noise x_T: no sampling step reaches it (steps <= 1000), so x_T and the
#: step noise are independent draws of the same stream.
INITIAL_NOISE_STEP = 2**32 - 1


def initial_noise(samples: int, dim: int, seed: int, sample_offset: int = 0) -> torch.Tensor:
    """x_T [samples, dim] float32 of the package's randomness contract: sample n (global index
    ``sample_offset + row``) is the Philox stream of (seed, n, step :data:`INITIAL_NOISE_STEP`), so a shard of
    samples [offset, offset + samples) of a larger run gets exactly that run's rows, whatever the split."""
    return reference.gaussian_noise((samples, dim), seed, sample_offset, INITIAL_NOISE_STEP)


#: Philox step index of the matched-noise control's draws at step i: CONTROL_STEP + i, beyond any sampling step,
#: so its noise is independent of the step noise of the same seed (which the control shares with DDIM).
CONTROL_STEP = 2**31


@dataclass(frozen=True)
class MatchedNoise:
    """The per-step matched-noise control of a GMM sampler, an entry of ``gmms`` in :func:`sample_ddim` /
    :func:`sample_rfim`: the baseline's steps (no mixture) plus, at each step i where the GMM acts
    (``acts[i]``), white noise whose per-coordinate variance is what the offsets add there,
    sum_k pi_k g^2 delta_k^2 ([D], g = 1 on these paths; :func:`offset_variance`), independent of the step
    noise. Where the kernel clips, the mixture is the baseline plus offsets that no noise compensates: a gain this
    control matches is a noise effect, not moment matching."""

    gmm: GMM
    acts: tuple[bool, ...]


#: Philox step index of a :class:`LowRankNoise` control's random basis at step i: BASIS_STEP + i (its coefficients
#: are drawn at CONTROL_STEP + i, per sample).
BASIS_STEP = 2**31 + 2**30


@dataclass(frozen=True)
class LowRankNoise:
    """The low-rank matched-noise control of a GMM sampler (an entry of ``gmms`` like :class:`MatchedNoise`):
    the baseline's steps plus, at each step i where the GMM acts, a Gaussian offset confined to a random
    subspace of the offsets' rank r (the rank of that step's offset table), with the offsets' mean squared norm
    sum_k pi_k |delta_k|^2 spread evenly over it. At eta 0 the GMM kernel clips at every step (the component
    covariance is negative in the offsets' span) and DDIM-GMM is DDIM plus one of K low-rank offsets: this
    control keeps rank and norm and drops the mixture's structure (its K atoms and their directions)."""

    gmm: GMM
    acts: tuple[bool, ...]


CONTROLS = (MatchedNoise, LowRankNoise)


def low_rank_basis(gmm: GMM, step_index: int, seed: int, like: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(Q [D, r] orthonormal, random from the Philox stream of ``seed``; the per-direction variance
    sum_k pi_k |delta_k|^2 / r) of a :class:`LowRankNoise` control at ``step_index``."""
    priors, offsets, _, _ = gmm.tables(like)
    i = gmm.set_index(step_index)
    table = offsets[i].double()
    rank = int(torch.linalg.matrix_rank(table))
    total = float((priors[i].double()[:, None] * table**2).sum())
    if rank == 0:
        return torch.zeros(table.shape[1], 0, dtype=torch.float64), 0.0
    g = reference.gaussian_noise((rank, table.shape[1]), seed, 0, BASIS_STEP + step_index, torch.float64)
    q, _ = torch.linalg.qr(g.T)
    return q, total / rank


def offset_variance(gmm: GMM, step_index: int, like: torch.Tensor, g: float = 1.0) -> torch.Tensor:
    """sum_k pi_k g^2 delta_k^2 [D]: the per-coordinate variance the offsets of step ``step_index`` add."""
    priors, offsets, _, _ = gmm.tables(like)
    i = gmm.set_index(step_index)
    return (g * g) * (priors[i][:, None] * offsets[i] ** 2).sum(0)


def ddim_noise_stds(steps: int, eta: float, final_alpha: str = "one") -> list[float]:
    """The noise std c of each step of :func:`sample_ddim` (sampling order)."""
    return [float(_schedules.ddim_coefficients(a, p, eta)[4]) for _, a, p in vp_schedule(steps, final_alpha)]


def rfim_noise_stds(steps: int, eta: float) -> list[float]:
    """The noise std c = eta * s of each step of :func:`sample_rfim` (sampling order)."""
    return [eta * float(s) for s in _schedules.rf_times(steps)[1:]]


def _plan(gmms, gmm_steps, final_step: str, stds: list[float]) -> list:
    """Per entry of ``gmms`` the GMM of each step (None: no mixture), by :meth:`GMMOptions.plan` (``gmm_steps`` one
    policy, or one per entry); a :class:`MatchedNoise` entry runs the baseline's steps."""
    # a list of policies (names or sequences) is one per entry; a list of ints / bools is one explicit policy
    per_entry = isinstance(gmm_steps, list) and all(isinstance(p, (str, list, tuple)) for p in gmm_steps)
    policies = gmm_steps if per_entry else [gmm_steps] * len(gmms)
    if len(policies) != len(gmms):
        raise ValueError(f"gmm_steps must be one policy or one per sampler ({len(gmms)}), got {len(policies)}")
    return [
        GMMOptions(final_step=final_step, gmm_steps=p).plan(None if isinstance(g, CONTROLS) else g, stds)
        for g, p in zip(gmms, policies, strict=True)
    ]


def _add_control_noise(x: torch.Tensor, entry, step_index: int, seed: int, sample_offset: int = 0) -> torch.Tensor:
    """``x`` plus a :class:`MatchedNoise` entry's white noise (a :class:`LowRankNoise` entry's low-rank noise) at
    ``step_index`` (unchanged elsewhere), drawn at the global sample indices from ``sample_offset`` (a shard draws
    its own rows of a 1-process run's noise)."""
    if not isinstance(entry, CONTROLS) or not entry.acts[step_index]:
        return x
    if isinstance(entry, LowRankNoise):
        q, variance = low_rank_basis(entry.gmm, step_index, seed, x)
        shape = (x.shape[0], q.shape[1])
        z = reference.gaussian_noise(shape, seed, sample_offset, CONTROL_STEP + step_index, torch.float64, x.device)
        return (x.double() + math.sqrt(variance) * (z @ q.T.to(x.device))).to(x.dtype)
    std = offset_variance(entry.gmm, step_index, x).sqrt()
    z = reference.gaussian_noise(x.shape, seed, sample_offset, CONTROL_STEP + step_index, std.dtype, x.device)
    return (x + std * z).to(x.dtype)


def training_alphas_cumprod() -> torch.Tensor:
    """abar_t [1000] float64 of the paper's schedule."""
    return _schedules.alphas_cumprod(_schedules.make_betas(**BETAS)).double()


#: Where the last DDIM step goes. "one": abar = 1, the output is the model's x0_hat (a pixel-space sampler's clean
#: sample, as diffusers' DDIM with ``set_alpha_to_one``; the default). "abar0": abar_0 = 0.9985 of the training
#: schedule, latent-diffusion's convention (a VAE decodes afterwards), which leaves noise of std sqrt(1 - abar_0)
#: ~ 0.039 in every pixel-space sample.
FINAL_ALPHAS = ("one", "abar0")


def check_final_alpha(final_alpha) -> None:
    if final_alpha not in FINAL_ALPHAS:
        raise ValueError(f"final_alpha must be one of {FINAL_ALPHAS}, got {final_alpha!r}")


def vp_schedule(steps: int, final_alpha: str = "one"):
    """[(t, abar_t, abar_prev)] in sampling order: t the training timestep the model sees; the last step goes
    to abar = 1 (``final_alpha`` "one", whatever its previous timestep: with 501-999 steps that is t = 0) or to
    abar_0 (see :data:`FINAL_ALPHAS`)."""
    check_final_alpha(final_alpha)
    n_train = BETAS["num_train_timesteps"]
    if not 1 <= steps <= MAX_DDIM_STEPS:
        raise ValueError(f"steps must be in [1, {MAX_DDIM_STEPS}] (leading timesteps + 1), got {steps}")
    abar = training_alphas_cumprod()
    timesteps, prev = _schedules.ddim_timesteps(steps, n_train, "leading", steps_offset=1)
    out = [(int(t), abar[t], abar[p] if p >= 0 else abar[0]) for t, p in zip(timesteps, prev, strict=False)]
    if final_alpha == "one":
        out[-1] = (out[-1][0], out[-1][1], torch.ones((), dtype=abar.dtype))
    return out


def check_finite(xs, step_index: int, where: str) -> None:
    """FloatingPointError naming the sampler (its position in ``gmms``), the samples and the step at which a
    sampling loop went non-finite (a model that returns NaN at some timesteps, for example)."""
    for j, x in enumerate(xs):
        bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten()
        if len(bad):
            raise FloatingPointError(
                f"sampler {j}: samples {bad[:8].tolist()}{' ...' if len(bad) > 8 else ''} ({len(bad)} of {len(x)}) "
                f"went non-finite at step {step_index} ({where})"
            )


def _steps(items, progress: bool, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, disable=not progress, leave=False)


def _model_outputs(model, xs: list, time, n: int, sample_offset: int, model_batch: int | None) -> list:
    """The model's output for every sampler's x [n, D] at ``time`` (a Python number, broadcast to the batch).
    ``model_batch`` None: one stacked call [len(xs) * n, D] (the digits harness). Otherwise each sampler's rows
    in chunks of the *global* sample indices [j * model_batch, (j + 1) * model_batch): the same batches whatever
    the shard, so a model whose kernels round differently by batch size still gives a shard the rows of a
    1-process run (``sample_offset`` must then be a multiple of ``model_batch``)."""
    dtype = torch.int64 if isinstance(time, int) else torch.get_default_dtype()
    if model_batch is None:
        x = torch.cat(xs)
        return list(model(x, torch.full((len(x),), time, dtype=dtype)).split(n))
    if sample_offset % model_batch:
        raise ValueError(f"sample_offset {sample_offset} must be a multiple of model_batch {model_batch}")
    outs = []
    for x in xs:
        chunks = [x[j : j + model_batch] for j in range(0, len(x), model_batch)]
        if not chunks:  # an empty shard (fewer chunks than ranks): no model call (a UNet cannot take 0 rows)
            outs.append(torch.empty_like(x))
            continue
        outs.append(torch.cat([model(c, torch.full((len(c),), time, dtype=dtype)) for c in chunks]))
    return outs


def paired_loop(model, x_T, gmms, times, step, seed: int, sample_offset: int = 0, model_batch: int | None = None,
                time_format: str = "") -> list:  # fmt: skip
    """The loop every harness sampler runs: one arm per entry of ``gmms`` (None, a GMM or a :class:`MatchedNoise`
    control), all from ``x_T`` [N, D] with the same draws (paired). At step i, with model time ``times[i]`` (an
    iterable, a progress bar too): the model's output for every arm (:func:`_model_outputs`), ``step(i, out, x, j)``
    (arm j's step, returning its next x), the control's extra noise (:func:`_add_control_noise`) and a finiteness
    check naming the step's t (formatted with ``time_format``). Returns one output [N, D] per arm."""
    xs = [x_T] * len(gmms)
    for i, t in enumerate(times):
        outs = _model_outputs(model, xs, t, len(x_T), sample_offset, model_batch)
        xs = [step(i, out, x, j) for j, (out, x) in enumerate(zip(outs, xs, strict=True))]
        xs = [_add_control_noise(x, entry, i, seed, sample_offset) for x, entry in zip(xs, gmms, strict=True)]
        check_finite(xs, i, f"t = {t:{time_format}}")
    return xs


def sample_ddim(
    eps_model,
    x_T,
    steps: int,
    eta: float,
    gmms,
    seed: int,
    progress: bool = False,
    final_step: str = "gaussian",
    gmm_steps="all",
    sample_offset: int = 0,
    model_batch: int | None = None,
    final_alpha: str = "one",
) -> list:
    """DDIM(-GMM) sampling loops of an epsilon model ``eps_model(x [B, D], t [B] int64)``, one per entry of ``gmms``
    (None = DDIM, a GMM, or a :class:`MatchedNoise` control), all from ``x_T`` [N, D] with the same step noise
    (paired). ``final_step``: "gaussian" (no mixture on the last step) or "gmm" (see
    :func:`ddim_gmm_ext._checks.gmm_for_step`); ``gmm_steps``: where the mixture acts ("all", "matched", indices or
    a mask; one for every entry or a list, one per entry). ``sample_offset``: the global index of x_T's first row
    (the randomness contract's, for a shard of a larger run); ``model_batch``: see :func:`_model_outputs` (default:
    the model sees one stacked batch [len(gmms) * N, D] per step); ``final_alpha``: where the last step goes ("one":
    the output is x0_hat, the default; "abar0": latent-diffusion's abar_0; :data:`FINAL_ALPHAS`). Returns one x0
    [N, D] per entry of ``gmms``."""
    check_final_step(final_step)
    plan = _plan(gmms, gmm_steps, final_step, ddim_noise_stds(steps, eta, final_alpha))
    schedule = vp_schedule(steps, final_alpha)

    def step(i, eps, x, j):
        _, abar_t, abar_prev = schedule[i]
        out = ddim_step(eps, x, abar_t, abar_prev, eta=eta, gmm=plan[j][i], step_index=i, seed=seed,
                        sample_offset=sample_offset, return_pred_original=False)  # fmt: skip
        return out.prev_sample

    times = _steps([t for t, _, _ in schedule], progress, "DDIM steps")
    return paired_loop(eps_model, x_T, gmms, times, step, seed, sample_offset, model_batch)


def sample_rfim(
    flow_model,
    x_T,
    steps: int,
    eta: float,
    gmms,
    seed: int,
    progress: bool = False,
    final_step: str = "gaussian",
    gmm_steps="all",
    sample_offset: int = 0,
    model_batch: int | None = None,
) -> list:
    """RFIM(-GMM) loops of a velocity model ``flow_model(x [B, D], t [B] float) -> v = eps - x0`` from t = 1 to
    0 on the uniform grid, as :func:`sample_ddim` (paired, one x0 [N, D] per entry of ``gmms``)."""
    check_final_step(final_step)
    plan = _plan(gmms, gmm_steps, final_step, rfim_noise_stds(steps, eta))
    grid = _schedules.rf_times(steps)

    def step(i, v, x, j):
        out = rfim_step(v, x, grid[i], grid[i + 1], eta=eta, gmm=plan[j][i], step_index=i, seed=seed,
                        sample_offset=sample_offset, return_pred_original=False)  # fmt: skip
        return out.prev_sample

    times = _steps([float(t) for t in grid[:-1]], progress, "RFIM steps")
    return paired_loop(flow_model, x_T, gmms, times, step, seed, sample_offset, model_batch, time_format=".4g")


def matched_output_noise(x0: torch.Tensor, gmm: GMM, steps: int, seed: int) -> torch.Tensor:
    """The "DDIM + matched output noise" control of a GMM sampler: ``x0`` [N, D] (the baseline's output) plus
    white noise whose per-coordinate variance is what the mixture's last-step offsets add to the output,
    sum_k pi_k delta_k^2 [D] (the offset delta_k is added to the step's mean, with the step's noise std c ~ 0
    at the last step). If the GMM's gain at the last step matches this control's, it is a noise effect, not
    moment matching. The noise is torch.randn of torch.Generator().manual_seed(seed + 1) (paired over
    samplers of a seed, independent of x_T)."""
    all_priors, all_offsets, _, _ = gmm.tables(x0)
    last = gmm.set_index(steps - 1)
    priors, offsets = all_priors[last], all_offsets[last]
    std = (priors[:, None] * offsets**2).sum(0).sqrt()
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed((seed + 1) % 2**64), dtype=std.dtype)
    return (x0 + std * z).to(x0.dtype)
