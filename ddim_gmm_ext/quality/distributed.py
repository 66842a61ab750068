"""Scale-out of sampling and evaluation under ``torchrun --nproc-per-node N`` (gloo on CPU, nccl on CUDA).

Every rank samples a contiguous slice of the global sample indices and passes its first index as
``sample_offset``: the package's randomness contract makes the step noise and the mixture components of a sample
pure functions of (seed, global sample index, step), and :func:`ddim_gmm_ext.quality.sampling.initial_noise`
draws x_T the same way, so the union of the shards is the 1-process run. The model is called on fixed chunks of
``model_batch`` global indices (shards start on a chunk boundary), so even a model whose kernels change their
rounding with the batch size sees the same batches in both runs.

Outside torchrun (no ``WORLD_SIZE`` in the environment) everything runs as rank 0 of 1 and nothing is imported
from ``torch.distributed``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init() -> Context:
    """The process group of a torchrun launch (``WORLD_SIZE`` > 1: nccl with one CUDA device per local rank where
    CUDA is available, else gloo on CPU), or the 1-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    import torch.distributed as dist

    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Context(dist.get_rank(), dist.get_world_size(), device)


def shard(n: int, ctx: Context, align: int = 1) -> tuple[int, int]:
    """(offset, count) of this rank's slice of n global samples: contiguous, in rank order, starting on multiples
    of ``align`` (the model's chunk), as even as that allows; the slices cover [0, n) exactly."""
    if n < 0 or align < 1:
        raise ValueError(f"need n >= 0 and align >= 1, got n = {n}, align = {align}")
    chunks = -(-n // align)
    first = chunks * ctx.rank // ctx.world
    last = chunks * (ctx.rank + 1) // ctx.world
    offset = min(first * align, n)
    return offset, min(last * align, n) - offset


def gather_rows(x: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The rows [n_r, ...] of every rank concatenated in rank order, on every rank (shards of unequal size are
    padded for the collective and trimmed)."""
    if not ctx.active:
        return x
    import torch.distributed as dist

    count = torch.tensor([len(x)], dtype=torch.int64, device=ctx.device)
    counts = [torch.zeros_like(count) for _ in range(ctx.world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=ctx.device)
    padded[: len(x)] = x.to(ctx.device)
    parts = [torch.empty_like(padded) for _ in range(ctx.world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]).to(x.device)


def all_reduce_sum(x: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The sum over ranks of ``x`` (a new tensor on x's device; x itself when not distributed)."""
    if not ctx.active:
        return x
    import torch.distributed as dist

    y = x.to(ctx.device).clone()
    dist.all_reduce(y)
    return y.to(x.device)


def barrier(ctx: Context) -> None:
    if ctx.active:
        import torch.distributed as dist

        dist.barrier()


def finish(ctx: Context) -> None:
    if ctx.active:
        import torch.distributed as dist

        dist.destroy_process_group()
