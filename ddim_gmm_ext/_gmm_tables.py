"""The runtime's GMM tables (docs/design.md 1.3): the direction matrices drawn by ``ddimgmm::offset_directions``,
ORTHO's orthonormal directions by the fused thin SVD, ORTHO-LR's low-rank moments from a K x K Gram matrix.

:class:`ddim_gmm_ext.gmm.GMM` builds its tables here. The specification builds the same tables with plain torch
and LAPACK (:func:`ddim_gmm_ext.reference.gmm_parameters`); the tests compare the two."""

from __future__ import annotations

import torch

from . import _checks, api, reference


def build(
    dim: int,
    n_components: int,
    n_steps: int,
    scale: float,
    variant: str,
    shared: bool,
    uniform_priors: bool,
    seed: int,
    device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(priors [S, K], offsets [S, K, D], var_offsets [S, K, Dv], basis [S, K - 1, D] or None) in ``dtype`` on
    ``device``, S = 1 if ``shared`` else ``n_steps``; computed in float64. Arguments checked by the caller
    (:func:`_checks.check_gmm_config`); a scale whose tables overflow ``dtype`` is refused, for ORTHO-VUB and
    ORTHO-LR before any table is drawn."""
    n_sets = 1 if shared else n_steps
    f64 = torch.float64
    if uniform_priors:
        priors = torch.full((n_sets, n_components), 1.0 / n_components, dtype=f64, device=device)
    else:
        priors = reference.random_priors(n_sets, n_components, seed, device)  # the stream's priors, in torch
    _checks.check_gmm_scale(scale, variant, priors, dtype)
    directions = api.offset_directions(n_sets, dim, n_components, seed, device)
    if variant == "rand":
        centred = _centre(directions, priors)
        columns = scale * centred / centred.norm(dim=1, keepdim=True).clamp(min=torch.finfo(f64).tiny)  # K = 1: 0
        columns = _centre(columns, priors)  # normalising each column broke the centring by O(1/sqrt(D))
    else:
        columns = scale * _centre(api.thin_svd(directions), priors)
    offsets = columns.transpose(1, 2).contiguous()  # [S, K, D]
    inverse = torch.where(priors > 0, 1.0 / (n_components * priors), torch.zeros_like(priors))  # 1 / (K pi_k)
    basis = None
    if variant == "ortho-vub":
        var_offsets = _vub_bounds(priors, inverse, scale)
    elif variant == "ortho-lr":
        eigenvalues, basis = _low_rank(offsets, priors)
        var_offsets = inverse[:, :, None] * eigenvalues[:, None, :]
    else:  # the diagonal of Delta_k = M / (K pi_k)
        var_offsets = inverse[:, :, None] * (priors[:, :, None] * offsets**2).sum(1, keepdim=True)
    offsets, var_offsets = offsets.to(dtype), var_offsets.to(dtype)
    if not (torch.isfinite(offsets).all() and torch.isfinite(var_offsets).all()):
        raise _checks.gmm_overflow_error(scale, dtype)
    return priors.to(dtype), offsets, var_offsets, None if basis is None else basis.to(dtype)


def _centre(columns: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """columns[:, :, k] - sum_l pi_l columns[:, :, l] for columns [S, D, K], priors [S, K]."""
    return columns - (columns @ priors[:, :, None])


def _vub_bounds(priors: torch.Tensor, inverse: torch.Tensor, scale: float) -> torch.Tensor:
    """ORTHO-VUB: v_k[i] = s^2 pi_(i) / (K pi_k) on the first K coordinates (pi_(i) ascending); zero for K = 1,
    whose one centred offset is 0."""
    if priors.shape[1] == 1:
        return torch.zeros_like(priors)[:, :, None]
    return (float(scale) * float(scale)) * inverse[:, :, None] * priors.sort(-1).values[:, None, :]


def _low_rank(offsets: torch.Tensor, priors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ORTHO-LR: (lam [S, K - 1] descending, W [S, K - 1, D] orthonormal rows) with M = W^T diag(lam) W, M =
    sum_l pi_l delta_l delta_l^T. From the K x K Gram matrix, not an SVD of the K x D matrix (seconds per set at
    D = 16384): with P = diag(sqrt(pi)) offsets, M = P^T P shares its nonzero eigenvalues with G = P P^T =
    V diag(lam) V^T, and W = diag(lam)^(-1/2) V^T P. A direction without variance (lam <= K eps lam_max: a zero
    prior) gets a zero row and lam = 0."""
    K = offsets.shape[1]
    r = max(K - 1, 0)
    weighted = offsets * priors[:, :, None].sqrt()  # P [S, K, D]
    lam_all, V = torch.linalg.eigh(weighted @ weighted.transpose(1, 2))  # ascending
    lam = lam_all.flip(-1)[:, :r].clamp(min=0)
    rows = V.flip(-1)[:, :, :r].transpose(1, 2) @ weighted  # row i has norm sqrt(lam_i)
    keep = lam > K * torch.finfo(torch.float64).eps * lam[:, :1]
    basis = torch.where(keep[..., None], rows / lam.clamp(min=torch.finfo(torch.float64).tiny).sqrt()[..., None], 0)
    return torch.where(keep, lam, torch.zeros_like(lam)), basis.contiguous()
