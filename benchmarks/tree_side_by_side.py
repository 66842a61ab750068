"""Two builds of the package side by side on one core: per-call CPU time of the same calls in two source trees,
each with its own compiled ``_C`` (for example the tree before the C++ moved to the LibTorch stable ABI, built
against the ATen API, and today's abi3 build). Writes benchmarks/results/<out>.json.

    python benchmarks/tree_side_by_side.py OLD_TREE NEW_TREE [--rounds 15] [--out tree_side_by_side_cpu.json]

Each tree runs in a worker process of its own (two ``_C`` libraries register the same op names, so they cannot
share a process), pinned to the same core when ``taskset`` is there; the parent hands each worker blocks of
calls of about 20 ms in turn, the order reversed every other round, so that load on a shared machine falls on
both alike. Per case: the median and quartiles of the blocks' CPU time per call, and of the per-round ratio
new / old. The calls use only what both trees have: the raw op (its 20 arguments by position, below the
Autograd key, as the package's wrapper calls it), ``dg.step`` and three drop-in ``step`` methods."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

SHAPES = ((1, 4, 64, 64), (4, 4, 128, 128))


def build_cases() -> dict:
    """name -> call, in the worker's tree."""
    import torch

    import ddim_gmm_ext as dg
    from ddim_gmm_ext.diffusers import (
        DDIMGMMScheduler,
        EulerAncestralDiscreteGMMScheduler,
        FlowMatchEulerDiscreteGMMScheduler,
    )

    raw = torch.ops.ddimgmm.step.default
    cases = {}
    for shape in SHAPES:
        s = "x".join(map(str, shape))
        g = torch.Generator().manual_seed(0)
        x, m = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        buf = torch.empty_like(x)
        # rows (a_t, b_t, A, B, c, g): noiseless, and with in-kernel noise of std 0.3
        noiseless, noisy = torch.tensor([0.9, 0.4, 0.95, 0.2, 0.0, 0.0]), torch.tensor([0.9, 0.4, 0.95, 0.1, 0.3, 0.0])

        def op(row, x=x, m=m):
            args = (m, x, row, None, None, None, None, None, None, None, 0, None, None, False, 0, 0, 3, False)

            def call():
                with torch._C._AutoDispatchBelowAutograd():
                    return raw(*args, None, None)

            return call

        cases[f"copy {s}"] = lambda buf=buf, x=x: buf.copy_(x)
        cases[f"raw op eta 0 {s}"] = op(noiseless)
        cases[f"raw op in-kernel noise {s}"] = op(noisy)
        cases[f"dg.step eta 0 {s}"] = lambda x=x, m=m: dg.step(
            m, x, 0.9, 0.4, 0.95, 0.2, 0.0, return_pred_original=False
        )
        for name, cls in (
            ("DDIMGMMScheduler", DDIMGMMScheduler),
            ("EulerAncestralDiscreteGMMScheduler", EulerAncestralDiscreteGMMScheduler),
            ("FlowMatchEulerDiscreteGMMScheduler", FlowMatchEulerDiscreteGMMScheduler),
        ):
            scheduler = cls(seed=0)
            scheduler.set_timesteps(7)
            t = scheduler.timesteps[3]

            def step(scheduler=scheduler, t=t, x=x, m=m):
                scheduler._step_index = 3  # the same step every call (DDIM has no step index: unused there)
                return scheduler.step(m, t, x)

            cases[f"{name}.step {s}"] = step
    return cases


def worker(tree: str) -> None:
    """Serves "<case> <calls>" lines on stdin with the CPU us per call of a block, for the package in ``tree``."""
    sys.path.insert(0, tree)
    import torch

    torch.set_num_threads(1)
    import ddim_gmm_ext

    if not ddim_gmm_ext.__file__.startswith(os.path.abspath(tree)):
        raise SystemExit(f"imported {ddim_gmm_ext.__file__}, not the package in {tree}")
    cases = build_cases()
    for fn in cases.values():
        fn()
    print("ready " + "|".join(cases), flush=True)
    for line in sys.stdin:
        name, n = line.rstrip("\n").rsplit(" ", 1)
        fn, calls = cases[name], int(n)
        start = time.process_time()
        for _ in range(calls):
            fn()
        print(1e6 * (time.process_time() - start) / calls, flush=True)


def quartiles(values: list[float]) -> dict:
    q1, _, q3 = statistics.quantiles(values, n=4)
    return {"median": statistics.median(values), "q1": q1, "q3": q3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--core", type=int, default=0, help="the core both workers are pinned to")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", default="tree_side_by_side_cpu.json")
    args = parser.parse_args()
    pin = ["taskset", "-c", str(args.core)] if shutil.which("taskset") else []
    trees = {"old": os.path.abspath(args.old), "new": os.path.abspath(args.new)}
    procs = {
        k: subprocess.Popen(
            [*pin, sys.executable, os.path.abspath(__file__), "--worker", tree],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
        )
        for k, tree in trees.items()
    }
    names = None
    for p in procs.values():
        line = p.stdout.readline().strip()
        if not line.startswith("ready "):
            raise SystemExit(f"a worker failed to start: {line!r}")
        names = line[len("ready ") :].split("|")

    def block(k: str, name: str, calls: int) -> float:
        procs[k].stdin.write(f"{name} {calls}\n")
        procs[k].stdin.flush()
        return float(procs[k].stdout.readline())

    results = {}
    for name in names or []:
        calls = max(20, int(20000 / max(block("old", name, 20), 1.0)))  # blocks of about 20 ms
        times: dict[str, list[float]] = {"old": [], "new": []}
        for r in range(args.rounds):
            for k in ("old", "new") if r % 2 == 0 else ("new", "old"):
                times[k].append(block(k, name, calls))
        ratio = [n / o for n, o in zip(times["new"], times["old"], strict=True)]
        results[name] = {
            "old_us": quartiles(times["old"]),
            "new_us": quartiles(times["new"]),
            "ratio new / old": quartiles(ratio),
        }
        o, n, q = results[name]["old_us"], results[name]["new_us"], results[name]["ratio new / old"]
        print(
            f"{name:48s} old {o['median']:8.2f} us  new {n['median']:8.2f} us  new / old {q['median']:.3f} "
            f"[{q['q1']:.3f}, {q['q3']:.3f}]",
            flush=True,
        )
    for p in procs.values():
        p.stdin.close()
        p.wait()

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import write_json

    def commit(tree: str) -> str:
        out = subprocess.run(["git", "-C", tree, "rev-parse", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip()

    doc = {
        "note": args.note,
        "trees": {k: {"path": v, "commit": commit(v)} for k, v in trees.items()},
        "threads": 1,
        "rounds": args.rounds,
        "timing": "process CPU time per call, blocks of ~20 ms alternating between the two workers",
        "cases": results,
    }
    print(write_json(doc, "cpu", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", args.out), ""))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main()
