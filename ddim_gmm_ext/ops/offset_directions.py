"""Fake (meta) kernel of ``ddimgmm::offset_directions``: O [n_sets, dim, n_components] float64 on the CPU."""

from __future__ import annotations

import torch

from .._checks import op_seed


@torch.library.register_fake("ddimgmm::offset_directions")
def _offset_directions_fake(n_sets: int, dim: int, n_components: int, seed: int) -> torch.Tensor:
    return torch.empty((n_sets, dim, n_components), dtype=torch.float64)


def offset_directions(n_sets: int, dim: int, n_components: int, *, seed: int) -> torch.Tensor:
    """The package's one call of ``torch.ops.ddimgmm.offset_directions``; ``seed`` an unsigned 64-bit int."""
    return torch.ops.ddimgmm.offset_directions(int(n_sets), int(dim), int(n_components), op_seed(seed))
