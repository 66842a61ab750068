"""Run by ``torchrun --nproc-per-node 2`` in test_fashion_distributed.py: each rank samples its shard of a small
job and scores its shard of fixed stand-in samples; rank 0 writes the gathered samples and the metrics."""

import json
import sys
from pathlib import Path

import torch

from ddim_gmm_ext.quality import distributed, generate
from ddim_gmm_ext.quality.fid import FashionQuality
from tests.quality import tiny_models

JOB = generate.SampleJob(
    model="tiny", dim=784, samples=10, steps=3, eta=1.0, variant="ortho-lr", scale=2.0, model_batch=4
)


def quality(ctx=None):
    return FashionQuality(
        fid=True,
        reference=tiny_models.reference_images(),
        classifier=tiny_models.tiny_classifier,
        inception=tiny_models.tiny_inception,
        ctx=ctx,
        batch=5,
    )


def main(out: Path) -> int:
    ctx = distributed.init()
    mine = generate.sample(tiny_models.tiny_unet, JOB, ctx)
    everything = distributed.gather_rows(mine, ctx)
    samples = tiny_models.metric_samples()
    offset, count = distributed.shard(len(samples), ctx)
    metrics = quality(ctx)(samples[offset : offset + count])
    if ctx.main:
        generate.write(everything, JOB, out / "samples.pt", ctx.world)
        (out / "metrics.json").write_text(json.dumps({**metrics, "shard_rows": len(mine), "world": ctx.world}))
    distributed.barrier(ctx)
    distributed.finish(ctx)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main(Path(sys.argv[1])))
