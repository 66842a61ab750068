"""Pure-torch reference of DDIM-GMM: the specification in code (docs/design.md sections 1 and 2).

Everything the fused kernels compute is defined here, readably and float64-capable:

* noise schedules of the VP family exactly as diffusers builds them, DDIM timestep spacings, rectified-flow
  time grids;
* the general Gaussian-path step x_t = a_t x0 + b_t eps  ->  x_s (DDIM eq. 12, paper eq. 6 / 20), with the
  Gaussian-mixture kernel of paper eq. 7;
* the noise levels c of DDIM-eta, RFIM and gDDIM-lambda;
* the random stream (Philox4x32-10) every kernel must reproduce, so that the same seed gives the same
  samples on every device and batch layout;
* the GMM parameters RAND / ORTHO / ORTHO-VUB / ORTHO-LR (paper eq. 9-12), and the thin SVD they need.

A leaf of the package: it imports only the argument rules (:mod:`._checks`) and the schedules and path
coefficients (:mod:`._schedules`), both shared with the runtime, never the runtime itself (api, ops, gmm,
integrations; tests/test_imports.py). It builds its own coefficient rows and its own GMM tables (LAPACK SVD), so
that the oracle tests compare the fused runtime with an independent implementation.

Compute precision: float64 inputs are computed in float64, every other floating dtype in float32; the
result is cast back to the sample's dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from typing_extensions import Unpack

from . import _checks, _schedules
from ._checks import PREDICTION_TYPES, VARIANTS, check_gmm_config, compute_dtype
from ._schedules import (
    _sqrt_pos,
    alphas_cumprod,
    betas_for_alpha_bar,
    ddim_coefficients,
    ddim_timesteps,
    make_betas,
    noise_std,
    rf_times,
    rfim_coefficients,
    vp_coefficients,
)

__all__ = [
    "StepOutput",
    "betas_for_alpha_bar",
    "make_betas",
    "alphas_cumprod",
    "ddim_timesteps",
    "rf_times",
    "vp_coefficients",
    "noise_std",
    "ddim_coefficients",
    "rfim_coefficients",
    "predict_x0_eps",
    "coefficient_row",
    "step_from_table",
    "step",
    "ddim_step",
    "rfim_step",
    "philox4x32",
    "normals",
    "gaussian_noise",
    "draw_components",
    "offset_directions",
    "random_priors",
    "thin_svd",
    "gmm_parameters",
    "VARIANTS",
]


class StepOutput(NamedTuple):
    """prev_sample x_s; pred_original_sample x0_hat (after guidance and clipping); components [B] int64 or
    None without GMM."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None
    components: torch.Tensor | None


# ---------------------------------------------------------------------------------------------------------
# The random stream: Philox4x32-10 (Salmon et al. 2011), counters (c0, c1, c2, c3), key = seed
# ---------------------------------------------------------------------------------------------------------
#
#   noise z[n, j] of sample n (global index: sample_offset + batch position), element j, step i:
#       philox(c0 = j // 4, c1 = n, c2 = i, c3 = NOISE) -> 4 words -> 4 normals, lane j % 4
#   component k[n] at step i:
#       philox(c0 = 0, c1 = n, c2 = i, c3 = COMPONENT) word 0 -> u in [0, 1) -> inverse CDF of the priors
#   GMM direction matrix O[s] (D x K, row-major flat index f = d K + k), parameter set s:
#       philox(c0 = (f // 4) mod 2^32, c1 = (f // 4) >> 32, c2 = s, c3 = OFFSETS) -> normals, lane f % 4
#   random priors of set s: philox(c0 = k, c1 = 0, c2 = s, c3 = PRIORS) word 0
# Words -> normals (Box-Muller, exact in float32):
#   u1 = ((w0 >> 8) + 1) 2^-24 in (0, 1], u2 = (w1 >> 8) 2^-24 in [0, 1)
#   r = sqrt(-2 log u1), th = 2 pi (u2 - 1/2);  n0 = r cos th, n1 = r sin th;  likewise (w2, w3) -> (n2, n3)

NOISE, COMPONENT, OFFSETS, PRIORS = 0, 1, 2, 3
_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo32(a: torch.Tensor, b: int):
    """(hi, lo) 32-bit words of a * b for a in [0, 2^32) held in int64; b split in 16-bit halves so no
    intermediate exceeds 2^49."""
    p_lo = a * (b & 0xFFFF)
    p_hi = a * (b >> 16)
    mid = p_lo + ((p_hi & 0xFFFF) << 16)
    return ((p_hi >> 16) + (mid >> 32)) & _MASK32, mid & _MASK32


def philox4x32(c0, c1, c2, c3, seed: int, rounds: int = 10):
    """Philox4x32 of the counters (int64 tensors holding uint32 values, broadcast together) under the 64-bit
    key ``seed``. Returns four int64 tensors of uint32 words."""
    c0, c1, c2, c3 = torch.broadcast_tensors(*(torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3)))
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(rounds):
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def _uniform24(word: torch.Tensor, dtype) -> torch.Tensor:
    """u in [0, 1), a multiple of 2^-24 (exact in float32)."""
    return (word >> 8).to(dtype) * 2.0**-24


def _box_muller(w_a: torch.Tensor, w_b: torch.Tensor, dtype):
    u1 = ((w_a >> 8) + 1).to(dtype) * 2.0**-24
    th = 2 * math.pi * (_uniform24(w_b, dtype) - 0.5)
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th), r * torch.sin(th)


def normals(words, dtype=torch.float32) -> torch.Tensor:
    """Four words [...] -> normals [..., 4] (lanes 0..3)."""
    n0, n1 = _box_muller(words[0], words[1], dtype)
    n2, n3 = _box_muller(words[2], words[3], dtype)
    return torch.stack([n0, n1, n2, n3], dim=-1)


def _stream_normals(numel: int, c1, c2, c3: int, seed: int, dtype, device) -> torch.Tensor:
    """normals [..., numel] of element f from philox(f // 4, c1, c2, c3) lane f % 4; c1, c2 broadcast over
    leading dims."""
    groups = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    words = philox4x32(groups, c1, c2, c3, seed)
    return normals(words, dtype).flatten(-2)[..., :numel]


def gaussian_noise(shape, seed: int, sample_offset: int, step_index: int, dtype=torch.float32, device="cpu"):
    """z [B, ...] of the randomness contract: a pure function of (seed, sample_offset + b, step_index)."""
    batch, per_sample = shape[0], math.prod(shape[1:])
    n = torch.arange(sample_offset, sample_offset + batch, dtype=torch.int64, device=device)[:, None]
    return _stream_normals(per_sample, n, step_index, NOISE, seed, dtype, device).reshape(shape)


def draw_components(priors: torch.Tensor, batch: int, seed: int, sample_offset: int, step_index: int):
    """k [B] int64 ~ Categorical(priors): k = #{j < K - 1 : u >= cdf_j} with u in [0, 1) from the stream and
    cdf the running sum of the priors in the priors' dtype (a zero prior is never drawn)."""
    n = torch.arange(sample_offset, sample_offset + batch, dtype=torch.int64, device=priors.device)
    u = _uniform24(philox4x32(0, n, step_index, COMPONENT, seed)[0], priors.dtype)
    cdf = torch.cumsum(priors, 0)[:-1]
    return (u[:, None] >= cdf[None, :]).sum(-1).to(torch.int64)


def offset_directions(n_sets: int, dim: int, n_components: int, seed: int, device="cpu") -> torch.Tensor:
    """O [S, D, K] float64 ~ N(0, I) from the stream (docs/design.md 1.3)."""
    numel = dim * n_components
    s = torch.arange(n_sets, dtype=torch.int64, device=device)[:, None]
    groups = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    words = philox4x32(groups & _MASK32, groups >> 32, s, OFFSETS, seed)
    z = normals(words, torch.float64).flatten(-2)[..., :numel]
    return z.reshape(n_sets, dim, n_components)


def random_priors(n_sets: int, n_components: int, seed: int, device="cpu") -> torch.Tensor:
    """priors [S, K] float64, Dirichlet(1, ..., 1): normalised exponential draws, all > 0."""
    k = torch.arange(n_components, dtype=torch.int64, device=device)
    s = torch.arange(n_sets, dtype=torch.int64, device=device)[:, None]
    u = ((philox4x32(k, 0, s, PRIORS, seed)[0] >> 8).to(torch.float64) + 0.5) * 2.0**-24  # in (0, 1)
    e = -torch.log(u)
    return e / e.sum(-1, keepdim=True)


# ---------------------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------------------


def predict_x0_eps(model_output, sample, a_t, b_t, prediction_type: str):
    """(x0_hat, eps_hat) from the model output m on the path x_t = a_t x0 + b_t eps (docs/design.md 1.1).

    v_prediction is defined on every Gaussian path with n = sqrt(a_t^2 + b_t^2): v = (a_t eps - b_t x0) / n,
    so x0 = (a_t x - b_t n m) / n^2 and eps = (b_t x + a_t n m) / n^2 (n = 1 on VP paths; on VE paths, a_t = 1
    and b_t = sigma, this is diffusers' Euler v_prediction)."""
    m, x = model_output, sample
    if prediction_type == "epsilon":
        return (x - b_t * m) / a_t, m
    if prediction_type == "sample":
        return m, (x - a_t * m) / b_t
    if prediction_type == "v_prediction":
        n2 = a_t * a_t + b_t * b_t
        n = n2**0.5
        return (a_t * x - (b_t * n) * m) / n2, (b_t * x + (a_t * n) * m) / n2
    if prediction_type == "flow":  # v = eps - x0 on x_t = (1 - t) x0 + t eps, a_t = 1 - t, b_t = t
        return x - b_t * m, x + a_t * m
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def coefficient_row(a_t, b_t, a_s, b_s, c, g=1.0) -> tuple:
    """The op's coefficient row (a_t, b_t, A, B, c, g) of a step x_t -> x_s with noise std c and GMM scale g:
    mean = A x0 + B eps with A = a_s and B = sqrt(max(b_s^2 - c^2, 0)) (the DDIM / RFIM mean). Numbers give
    numbers (B in float64), tensors give tensors."""
    return a_t, b_t, a_s, _sqrt_pos(b_s * b_s - c * c), c, g


def step_from_table(
    model_output: torch.Tensor, sample: torch.Tensor, coeffs: torch.Tensor, step_index, *, gmm=None,
    history: tuple[torch.Tensor, ...] = (), **options: Unpack[_checks.StepKwargs],
) -> StepOutput:  # fmt: skip
    """One step x_t -> x_s from row ``step_index`` of a coefficient table (the spec of ``ddimgmm::step``).

    coeffs: [S, 6] or [S, 8] rows, or one row [6] / [8], of (a_t, b_t, A, B, c, g[, H1, H2]) in the compute
    dtype (6 columns: H1 = H2 = 0); step_index i: an int or a 0-d int64 tensor. i selects the row, the GMM
    parameter set (set 0 when the GMM is shared) and the Philox step of the noise and component draws.
    history: up to two tensors of the sample's shape, (h1,) or (h1, h2), the previous steps' data predictions
    of a linear multistep solver (h1 the latest), read in the compute dtype; a row with H_j != 0 needs h_j.

        m    = m_u + w (m_c - m_u)                    with guidance_scale w ([2B, ...] output, uncond first)
        x0, eps from m (:func:`predict_x0_eps`); x0 <- clamp(x0, -r, r); eps <- (x_t - a_t x0) / b_t if
             use_clipped_model_output
        mean = A x0 + B eps + H1 h1 + H2 h2           (multistep solvers; the history is not clipped)
        x_s  = mean + c z                                                   without GMM
        x_s  = mean + g delta_k + sqrt(max(c^2 - g^2 v_k, 0)) z             k ~ Categorical(pi), one per sample
        x_s  = mean + g delta_k + c z + sum_i (sqrt(max(c^2 - g^2 v_k[i], 0)) - c) (w_i . z) w_i
                                                        low-rank GMM (basis W, var_offsets its eigenvalues)

    The last form has noise covariance c^2 I - g^2 W^T diag(v_k) W, each eigen-direction clipped at 0.
    A tensor index outside the table gives NaN samples and components -1 (the op's device convention).
    """
    history = _checks.check_history(history)
    o = _checks.step_options("step_from_table", options)
    cdt = compute_dtype(sample.dtype)
    i = step_index
    n_rows = coeffs.shape[0] if coeffs.dim() == 2 else 0
    n_sets = 0 if gmm is None or gmm.shared else gmm.n_steps
    if isinstance(i, torch.Tensor):
        i = int(i)  # the reference may read it; the op never does
        valid = 0 <= i < _checks.MAX_INDEX and (n_rows == 0 or i < n_rows) and (n_sets == 0 or i < n_sets)
        if not valid:
            nan = torch.full_like(sample, math.nan)
            k = None if gmm is None else torch.full((sample.shape[0],), -1, dtype=torch.int64)
            return StepOutput(nan, nan.clone() if o.return_pred_original else None, k)
    row = (coeffs[i] if n_rows else coeffs).to(cdt)
    a_t, b_t, A, B, c, g = row[:6].unbind()
    H = row[6:].tolist()
    if len(history) > 2 or (history and not H):
        raise ValueError(f"history takes at most 2 tensors and 8-column coeffs, got {len(history)} with {len(row)}")
    for j, h in enumerate(H):
        if h != 0 and j >= len(history):
            raise ValueError(f"coeffs row {i} has H{j + 1} = {h} but history{j} is None")

    x = sample.to(cdt)
    m = model_output.to(cdt)
    if o.guidance_scale is not None:
        m_uncond, m_cond = m.chunk(2)
        m = m_uncond + o.guidance_scale * (m_cond - m_uncond)
    x0, eps = predict_x0_eps(m, x, a_t, b_t, o.prediction_type)
    if o.clip_sample_range is not None:
        x0 = x0.clamp(-o.clip_sample_range, o.clip_sample_range)
        if o.use_clipped_model_output:
            eps = (x - a_t * x0) / b_t

    batch = sample.shape[0]
    flat = (batch, math.prod(sample.shape[1:]))
    mean = A * x0 + B * eps
    for h_j, hist in zip(row[6:], history, strict=False):
        mean = mean + h_j * hist.to(cdt)
    mean = mean.reshape(flat)
    z = (
        o.noise.to(cdt)
        if o.noise is not None
        else gaussian_noise(sample.shape, o.seed, o.sample_offset, i, cdt, sample.device)
    )
    z = z.reshape(flat)
    k = None
    if gmm is None:
        prev = mean + c * z
    else:
        all_priors, all_offsets, all_var, all_basis = gmm.tables(x)
        j = 0 if gmm.shared else i  # the step's parameter set
        priors, offsets, var_offsets = all_priors[j], all_offsets[j], all_var[j]
        basis = None if all_basis is None else all_basis[j]
        k = (
            o.components.to(torch.int64)
            if o.components is not None
            else draw_components(priors, batch, o.seed, o.sample_offset, i)
        )
        v = var_offsets[k]  # [B, Dv]
        sd = (c * c - (g * g) * v).clamp(min=0).sqrt()
        if basis is None:
            std = torch.full(flat, 1.0, dtype=cdt, device=x.device) * c
            std[:, : v.shape[1]] = sd  # v_k is zero beyond Dv
            prev = mean + g * offsets[k] + std * z
        else:
            p = z @ basis.T  # [B, Dv]: the noise in the basis
            prev = mean + g * offsets[k] + c * z + ((sd - c) * p) @ basis
    prev = prev.reshape(sample.shape)
    return StepOutput(prev.to(sample.dtype), x0.to(sample.dtype) if o.return_pred_original else None, k)


def step(
    model_output: torch.Tensor, sample: torch.Tensor, a_t, b_t, a_s, b_s, noise_std, *, gmm=None, step_index: int = 0,
    **options: Unpack[_checks.StepKwargs],
) -> StepOutput:  # fmt: skip
    """One step x_t -> x_s of a Gaussian path x_t = a_t x0 + b_t eps with noise std c = ``noise_std``
    (docs/design.md 1.2, 1.3): :func:`step_from_table` with the one row :func:`coefficient_row` (g = 1) and
    ``gmm``'s parameter set ``step_index``:

        x_s  = a_s x0 + sqrt(b_s^2 - c^2) eps + c z                              without GMM
        x_s  = a_s x0 + sqrt(b_s^2 - c^2) eps + delta_k + sqrt(max(c^2 - v_k, 0)) z,  k ~ Categorical(pi)

    Coefficients are Python numbers or 0-d tensors; z and k come from the Philox stream of
    (seed, sample_offset + b, step_index) unless ``noise`` / ``components`` are given.
    ``return_pred_original=False`` leaves pred_original_sample None (a fused step then writes 12 B per
    element instead of 16).
    """
    settled = _checks.step_options("step", options)
    _checks.check_step(model_output, sample, a_t, b_t, a_s, b_s, noise_std, settled, gmm=gmm, step_index=step_index)
    # The row in float64 tensors on the sample's device (a coefficient that requires grad stays in the graph),
    # then in the compute dtype, as step_from_table takes it.
    a_t, b_t, a_s, b_s, c = (
        torch.as_tensor(v, dtype=torch.float64, device=sample.device).reshape(())
        for v in (a_t, b_t, a_s, b_s, noise_std)
    )
    row = torch.stack(coefficient_row(a_t, b_t, a_s, b_s, c, torch.ones_like(c))).to(compute_dtype(sample.dtype))
    return step_from_table(model_output, sample, row, step_index, gmm=gmm, **options)


def ddim_step(model_output, sample, alpha_prod_t, alpha_prod_prev, *, eta: float = 0.0, **options) -> StepOutput:
    """DDIM(-GMM) step on the VP path from abar_t to abar_prev with c = eta * DDIM's sigma (eq. 16).

    ``options`` are those of :func:`step` (gmm, step_index, prediction_type, guidance_scale, clip_sample_range,
    use_clipped_model_output, seed, sample_offset, noise, components)."""
    return step(model_output, sample, *_schedules.ddim_path(alpha_prod_t, alpha_prod_prev, eta, options), **options)


def rfim_step(model_output, sample, t, s, *, eta: float = 0.0, prediction_type: str = "flow", **options) -> StepOutput:
    """RFIM(-GMM) step from time t to s < t of a rectified flow (paper eq. 20 with its sign typo fixed:
    E[x_s | x0] = (1 - s) x0). ``prediction_type`` "flow" takes the velocity v = eps - x0; "sample" x0."""
    options["prediction_type"] = prediction_type
    return step(model_output, sample, *_schedules.rfim_path(t, s, eta, options), **options)


# ---------------------------------------------------------------------------------------------------------
# GMM parameters (paper eq. 9-12, docs/design.md 1.3, 1.4)
# ---------------------------------------------------------------------------------------------------------


def thin_svd(O: torch.Tensor) -> torch.Tensor:  # noqa: E741 (the paper's name; a public keyword)
    """U [S, D, K] of O [S, D, K] by LAPACK, columns ordered by singular value, signs fixed so that each
    column's entry of largest magnitude is positive (the first such entry on ties)."""
    _checks.check_thin_svd_input(O)
    U = torch.linalg.svd(O, full_matrices=False).U
    return _fix_signs(U)


def _fix_signs(U: torch.Tensor) -> torch.Tensor:
    if U.numel() == 0:
        return U
    sign = torch.sign(torch.gather(U, 1, U.abs().argmax(dim=1, keepdim=True)))
    return U * torch.where(sign == 0, torch.ones_like(sign), sign)


def _centre(C: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """C[:, :, k] - sum_l pi_l C[:, :, l] for C [S, D, K], priors [S, K]."""
    return C - (C @ priors[:, :, None])


def diagonal_var_offsets(offsets: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """v_k[d] = (1 / (K pi_k)) sum_l pi_l delta_l[d]^2 (diagonal of eq. 11): every coordinate's marginal
    variance matches exactly. offsets [S, K, D], priors [S, K] -> [S, K, D]; zero for a zero prior."""
    K = offsets.shape[1]
    w = (priors[:, :, None] * offsets**2).sum(1, keepdim=True)  # [S, 1, D]
    inv = torch.where(priors > 0, 1.0 / (K * priors), torch.zeros_like(priors))
    return inv[:, :, None] * w


def vub_var_offsets(priors: torch.Tensor, scale: float) -> torch.Tensor:
    """v_k[i] = s^2 pi_(i) / (K pi_k) for the first K coordinates, pi_(i) the priors in ascending order
    (the eigenvalue upper bounds of eq. 12 / 34). priors [S, K] -> [S, K, K]; zero for a zero prior, and
    zero for K = 1, whose only (centred) offset is 0: there is no offset variance to bound."""
    K = priors.shape[1]
    if K == 1:
        return torch.zeros_like(priors)[:, :, None]
    ascending = priors.sort(-1).values
    inv = torch.where(priors > 0, 1.0 / (K * priors), torch.zeros_like(priors))
    s2 = float(scale) * float(scale)  # (float ** 2 would raise beyond ~1.3e154; gmm_parameters refuses that first)
    return s2 * inv[:, :, None] * ascending[:, None, :]


def low_rank_moments(offsets: torch.Tensor, priors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ORTHO-LR's exact second moments in the offsets' span: (var_offsets [S, K, r], basis [S, r, D]), r = K - 1.

    The mixture's offsets contribute M = sum_l pi_l delta_l delta_l^T (rank <= K - 1, since sum pi_l delta_l
    = 0) to the covariance. With M = W^T diag(lam) W (eigen-decomposition, orthonormal rows W) and component
    k's noise covariance c^2 I - W^T diag(v_k) W, v_k = lam / (K pi_k) (the weighting of the diagonal
    variant, so sum_k pi_k v_k = lam), the mixture's covariance is c^2 I exactly, in every direction, as long
    as c^2 >= g^2 v_k (each direction is clipped at 0 beyond).

    In float64 by LAPACK: M = P^T P with P = diag(sqrt(pi)) offsets [K, D], so the SVD P^T = W^T diag(sigma) V^T
    gives W and lam = sigma^2 (descending). A direction without variance (lam <= K eps lam_max: a zero prior)
    gets a zero row, which adds nothing to the noise whatever its v."""
    p64, d64 = priors.double(), offsets.double()
    K = d64.shape[1]
    r = max(K - 1, 0)
    weighted = d64 * p64[:, :, None].sqrt()  # P [S, K, D]
    U, sigma, _ = torch.linalg.svd(weighted.transpose(1, 2), full_matrices=False)  # P^T [S, D, K], tall
    lam = sigma[:, :r] ** 2  # [S, r]
    keep = lam > K * torch.finfo(torch.float64).eps * lam[:, :1]
    basis = torch.where(keep[..., None], U[:, :, :r].transpose(1, 2), 0)
    lam = torch.where(keep, lam, torch.zeros_like(lam))
    inv = torch.where(p64 > 0, 1.0 / (K * p64), torch.zeros_like(p64))  # [S, K]
    return inv[:, :, None] * lam[:, None, :], basis.contiguous()


def gmm_parameters(
    dim: int,
    n_components: int,
    n_steps: int,
    scale: float = 1.0,
    variant: str = "ortho-vub",
    share_across_steps: bool = False,
    uniform_priors: bool = True,
    seed: int = 0,
    device="cpu",
    dtype=torch.float32,
    thin_svd_fn=thin_svd,
    offset_directions_fn=offset_directions,
):
    """(priors [S, K], offsets [S, K, D], var_offsets [S, K, Dv]), S = 1 if shared else n_steps.

    RAND (eq. 9):  C_k = O_k - sum_l pi_l O_l, delta_k = s C_k / ||C_k||, then centred once more so that
                   sum_k pi_k delta_k = 0 holds exactly (normalising each column breaks it by O(1/sqrt(D))).
    ORTHO (eq. 10): U = thin SVD of O, delta_k = s (U_k - sum_l pi_l U_l).
    var_offsets: diagonal of eq. 11 for RAND / ORTHO (Dv = D); VUB bounds of eq. 12 for ORTHO-VUB (Dv = K);
    for ORTHO-LR (ORTHO's offsets) the eigenvalues of :func:`low_rank_moments` (Dv = K - 1); :class:`GMM`'s
    tables (built by the runtime) carry that basis beside them. RAND with K = 1: the one centred offset is 0 (the
    Gaussian kernel). Built in float64, returned in ``dtype``. ``thin_svd_fn`` and ``offset_directions_fn`` let
    the fused ops stand in for the reference's; they must compute the same values. A scale whose ORTHO-VUB /
    ORTHO-LR tables would overflow ``dtype`` is refused before any table is drawn (:func:`_checks.check_gmm_scale`).
    """
    check_gmm_config(dim, n_components, n_steps, scale, variant)
    dim, n_components, n_steps = int(dim), int(n_components), int(n_steps)  # NumPy integers are accepted too
    n_sets = 1 if share_across_steps else n_steps
    if uniform_priors:
        priors = torch.full((n_sets, n_components), 1.0 / n_components, dtype=torch.float64, device=device)
    else:
        priors = random_priors(n_sets, n_components, seed, device)
    _checks.check_gmm_scale(scale, variant, priors, dtype)
    O = offset_directions_fn(n_sets, dim, n_components, seed, device)  # noqa: E741
    if variant == "rand":
        C = _centre(O, priors)
        C = scale * C / C.norm(dim=1, keepdim=True).clamp(min=torch.finfo(C.dtype).tiny)  # K = 1: C = 0
        C = _centre(C, priors)
    else:
        C = scale * _centre(thin_svd_fn(O), priors)
    offsets = C.transpose(1, 2).contiguous()
    if variant == "ortho-vub":
        var_offsets = vub_var_offsets(priors, scale)
    elif variant == "ortho-lr":
        var_offsets = low_rank_moments(offsets, priors)[0]
    else:
        var_offsets = diagonal_var_offsets(offsets, priors)
    offsets, var_offsets = offsets.to(dtype), var_offsets.to(dtype)
    if not (torch.isfinite(offsets).all() and torch.isfinite(var_offsets).all()):
        raise _checks.gmm_overflow_error(scale, dtype)
    return priors.to(dtype), offsets, var_offsets
