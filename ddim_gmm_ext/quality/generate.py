"""``ddim-gmm sample``: N samples of one sampler (DDIM / RFIM, or a GMM variant at one offset scale) written to
an .npz or .pt file, in one process or under ``torchrun --nproc-per-node N`` (each rank samples its slice of the
global sample indices, rank 0 gathers and writes; the file is bitwise the 1-process file's, see
:mod:`ddim_gmm_ext.quality.distributed`).

The file holds ``samples`` [N, D] float32 (the data scale: [-1, 1] for the shipped models) and ``config`` (a
JSON string: model, family, steps, eta, variant, scale, K, final step, seed, initial noise, world size).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .evaluate import FAMILIES
from .sampling import initial_noise, make_gmms


@dataclass
class SampleJob:
    model: str
    family: str = "ddim"
    dim: int = 784
    samples: int = 1000
    steps: int = 20
    eta: float = 0.0
    variant: str | None = None  # None: the baseline (DDIM / RFIM)
    scale: float = 1.0
    scale_per_dim: bool = False
    components: int = 8
    final_step: str = "gaussian"
    seed: int = 0
    model_batch: int = 250
    final_alpha: str = "one"  # ddim: where the last step goes (quality.sampling.FINAL_ALPHAS)


def sample(model, job: SampleJob, ctx: distributed.Context | None = None, progress: bool = False) -> torch.Tensor:
    """This rank's samples [n_r, D] of ``job`` (all N in one process): rows [offset, offset + n_r) of the global
    run, x_T and step noise from the Philox stream of (seed, global sample index)."""
    ctx = ctx or distributed.Context()
    _, sample_fn, _ = FAMILIES[job.family]
    offset, count = distributed.shard(job.samples, ctx, align=job.model_batch)
    x_T = initial_noise(count, job.dim, job.seed, offset)
    entry = [(job.variant or "baseline", job.variant, None if job.variant is None else job.scale)]
    gmms = make_gmms(entry, job.dim, job.components, job.steps, job.seed, per_dim=job.scale_per_dim)
    with torch.no_grad():
        return sample_fn(
            model,
            x_T,
            job.steps,
            job.eta,
            gmms,
            job.seed,
            progress=progress and ctx.main,
            final_step=job.final_step,
            sample_offset=offset,
            model_batch=job.model_batch,
            **({"final_alpha": job.final_alpha} if job.family == "ddim" else {}),
        )[0]


def write(samples: torch.Tensor, job: SampleJob, path, world: int = 1) -> Path:
    """``samples`` and the job's configuration to ``path`` (.npz: numpy arrays, config as a JSON string; .pt: a
    dict of the tensor and the JSON string)."""
    path = Path(path)
    config = json.dumps(
        {
            **asdict(job),
            "initial_noise": "Philox stream of (seed, global sample index, step 2^32 - 1)",
            "world_size": world,
        }
    )
    x = samples.detach().float().cpu().contiguous()
    if path.suffix == ".npz":
        np.savez(path, samples=x.numpy(), config=np.array(config))
    elif path.suffix == ".pt":
        torch.save({"samples": x, "config": config}, path)
    else:
        raise ValueError(f"output must end in .npz or .pt, got {path}")
    return path


def read(path) -> tuple[torch.Tensor, dict]:
    """(samples [N, D], config) of a file written by :func:`write`."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as data:
            return torch.from_numpy(data["samples"].copy()), json.loads(str(data["config"]))
    payload = torch.load(path, weights_only=True)
    return payload["samples"], json.loads(payload["config"])


def run(model, job: SampleJob, out, ctx: distributed.Context | None = None, progress: bool = True) -> Path | None:
    """Sample this rank's slice, gather on every rank, write ``out`` on rank 0 (returns its path; None on the
    other ranks)."""
    ctx = ctx or distributed.Context()
    mine = sample(model, job, ctx, progress)
    everything = distributed.gather_rows(mine, ctx)
    path = write(everything, job, out, ctx.world) if ctx.main else None
    distributed.barrier(ctx)
    return path
