"""Fake (meta) kernel of ``ddimgmm::thin_svd``: U has O's shape, dtype and device (contiguous)."""

from __future__ import annotations

import torch


@torch.library.register_fake("ddimgmm::thin_svd")
def _thin_svd_fake(O: torch.Tensor) -> torch.Tensor:  # noqa: E741 (the schema's argument name)
    torch._check(O.dim() == 3, lambda: f"thin_svd: O must have shape [S, D, K], got {O.dim()} dimensions")
    torch._check(
        O.dtype in (torch.float32, torch.float64), lambda: f"thin_svd: O must be float32 or float64, got {O.dtype}"
    )
    torch._check(O.shape[2] <= O.shape[1], lambda: f"thin_svd: O [S, D, K] needs K <= D, got {tuple(O.shape)}")
    return torch.empty_like(O, memory_format=torch.contiguous_format)


def thin_svd(O: torch.Tensor) -> torch.Tensor:  # noqa: E741 (the schema's argument name)
    """The package's one call of ``torch.ops.ddimgmm.thin_svd`` (the public, checked form is
    :func:`ddim_gmm_ext.api.thin_svd`)."""
    return torch.ops.ddimgmm.thin_svd(O)
