"""The Inception-FID study of the paper's claim on Fashion-MNIST, in CI-independent stages (one results JSON per
stage, resumable: a stage rerun keeps the rows it already has). Each stage is one (model, steps) slice of the grid:
eta 0, 0.5, 1; RAND, ORTHO-VUB, ORTHO-LR with K = 8; s chosen by FID on seeds 5-6 over {0, 0.01, 0.1, 0.3, 1, 3,
10} (flagged at the grid's edge) and scored on seeds 0-4; per-step matched-noise control, low-rank matched-noise
control at eta 0, best Gaussian (best eta); 2000 samples per seed against the 10,000 test images. ``exact_gap``:
DDIM alone with the exact denoiser at 10, 100 and 999 steps (the room a better kernel can take; 1000 steps fall
outside the leading timesteps + 1).

    python benchmarks/study/stages.py STAGE [--out benchmarks/results/study] [--samples N] [--seeds ...]
        [--select-seeds ...] [--reference N] [--model SPEC] [--steps ...] [--etas ...]
    python benchmarks/study/stages.py --list

Writes OUT/STAGE.json (ddim_gmm_ext.quality.study.run_stage says what it holds). One thread per process.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's package, not another install's
from ddim_gmm_ext.quality.study import Stage, run_stage  # noqa: E402

GRID = dict(etas=(0.0, 0.5, 1.0), variants=("rand", "ortho-vub", "ortho-lr"), components=8)
STAGES = {
    "exact_gap": Stage("exact_gap", "exact-fashion", steps=(10, 100, 999), etas=(0.0,)),
    **{
        f"{short}_{steps}": Stage(f"{short}_{steps}", model, steps=(steps,), **GRID)
        for short, model in (("exact", "exact-fashion"), ("unet", "fashion"))
        for steps in (5, 10, 20)
    },
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", nargs="?", choices=sorted(STAGES))
    parser.add_argument("--list", action="store_true", help="print the stages and exit")
    parser.add_argument("--out", default="benchmarks/results/study", help="folder of the stage JSON files")
    parser.add_argument("--samples", type=int, help="samples per seed and sampler (default 2000)")
    parser.add_argument("--seeds", type=int, nargs="+", help="scored seeds (default 0-4)")
    parser.add_argument("--select-seeds", type=int, nargs="*", help="selection seeds (default 5 6)")
    parser.add_argument("--reference", type=int, help="the first N test images as the FID reference (10000)")
    parser.add_argument("--model", help="override the stage's model (e.g. exact-fashion:10000)")
    parser.add_argument("--steps", type=int, nargs="+", help="override the stage's steps")
    parser.add_argument("--etas", type=float, nargs="+", help="override the stage's etas")
    args = parser.parse_args(argv)
    if args.list or args.stage is None:
        for stage in STAGES.values():
            print(stage)
        return 0
    overrides = {
        "samples": args.samples,
        "seeds": tuple(args.seeds) if args.seeds else None,
        "select_seeds": tuple(args.select_seeds) if args.select_seeds is not None else None,
        "reference": args.reference,
        "model": args.model,
        "steps": tuple(args.steps) if args.steps else None,
        "etas": tuple(args.etas) if args.etas else None,
    }
    stage = dataclasses.replace(STAGES[args.stage], **{k: v for k, v in overrides.items() if v is not None})
    torch.set_num_threads(1)
    run_stage(stage, f"{args.out}/{stage.name}.json", log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
