"""The few-step study (LCM and TCD at 2, 4, 8 steps on the shipped Fashion-MNIST eps model): the stock Gaussian
re-noising vs the moment-matched mixture (ORTHO-VUB, ORTHO-LR, K = 8, the largest scale matched on every step) vs
the per-step matched-noise control, paired seeds, Inception FID / KID (ddim_gmm_ext.quality.fewstep says how).
Resumable: a rerun keeps the cells its JSON already holds and goes on (seeds in order). One thread.

    nice -n 10 python benchmarks/study/fewstep.py [--out benchmarks/results/study/fewstep/fewstep.json]
        [--seeds 0 1 2 3 4 5] [--samples 100] [--reference 1000] [--only-steps 8] [--table] [--summarise]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's package, not another install's
from ddim_gmm_ext.quality.fewstep import StudyConfig, run_study, summarise, table_markdown  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/study/fewstep/fewstep.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--samples", type=int, default=100, help="samples per seed and arm")
    parser.add_argument("--reference", type=int, default=1000, help="the first N Fashion-MNIST test images")
    parser.add_argument("--only-steps", type=int, nargs="+", help="run only the cells of these step counts")
    parser.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    parser.add_argument("--summarise", action="store_true", help="recompute --out's summary from its rows and exit")
    args = parser.parse_args(argv)
    if args.summarise:
        path = Path(args.out)
        payload = json.loads(path.read_text())
        payload["summary"] = summarise(payload["rows"], StudyConfig.from_dict(payload["config"]))
        path.write_text(json.dumps(payload, indent=1) + "\n")
    if args.table or args.summarise:
        print(table_markdown(json.loads(Path(args.out).read_text())))
        return 0
    torch.set_num_threads(1)
    config = StudyConfig(seeds=tuple(args.seeds), samples=args.samples, reference=args.reference)
    run_study(config, args.out, log=lambda line: print(line, flush=True), only_steps=args.only_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
