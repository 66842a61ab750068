"""Fake (meta) kernel of ``ddimgmm::offset_directions``: O [n_sets, dim, n_components] float64 on the CPU."""

from __future__ import annotations

import torch


@torch.library.register_fake("ddimgmm::offset_directions")
def _offset_directions_fake(n_sets: int, dim: int, n_components: int, seed: int) -> torch.Tensor:
    return torch.empty((n_sets, dim, n_components), dtype=torch.float64)
