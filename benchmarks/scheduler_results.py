"""Writes benchmarks/results/schedulers_<device>.json: every fused diffusers scheduler's step against its
diffusers base class (and DDIM / flow matching against the bare op), and a whole 20-step DPM-Solver++ loop, as
ratios measured in the same run.

    python benchmarks/scheduler_results.py [--rounds 30] [--block-ms 4] [--threads 1] [--note "what ran"]

The cases are bench_schedulers.py's (the pytest-benchmark suite). Per case the methods run interleaved, one
block of calls each per round (the order reversed every other round), so that load on a shared machine falls on
all of them alike; each round gives the ratio other / ours (diffusers / ours above 1 when ours is faster;
bare_op / ours, the op's share of our step). The JSON keeps the ratio's median and quartiles (wall and process
CPU time) next to each method's median us per call, the load average before and after, the torch threads and
which package path ran (a script's folder starts sys.path: run with PYTHONPATH=<checkout>).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from bench_schedulers import (
    DPM_ALGORITHMS,
    _cases,
    _dpm_case,
    _dpm_loop_case,
    _new_family_case,
)
from common import write_json

import ddim_gmm_ext

SHAPES = [(1, 4, 64, 64), (4, 4, 128, 128)]
NAMES = {"ddpm": "DDPM", "euler": "Euler", "euler_a": "Euler ancestral"}


def cases():
    """(case name, parameters, {method: zero-argument call}), ours first."""
    out = []
    for family, label in (("ddim", "DDIM"), ("flow", "flow matching")):
        for gmm in (None, "ortho-vub"):
            for shape in SHAPES if family == "flow" else SHAPES[:1]:
                methods = {k: v for k, v in _cases(family, gmm, "cpu", shape).items() if v is not None}
                variant = "GMM off" if gmm is None else "ORTHO-VUB" + (" (eta 1)" if family == "flow" else "")
                name = f"{label}, {variant}" + (f", {list(shape)}" if family == "flow" else "")
                out.append((name, {"family": family, "gmm": gmm, "shape": list(shape)}, methods))
    for family, label in NAMES.items():
        for shape in SHAPES:
            for gen in (False, True):
                methods = {w: _new_family_case(family, w, shape, gen) for w in ("ours", "diffusers")}
                params = {"family": family, "shape": list(shape), "generator": gen}
                out.append((f"{label}, {list(shape)}, {'generator' if gen else 'no generator'}", params, methods))
    for algorithm in DPM_ALGORITHMS:
        for shape in SHAPES:
            for gen in (False, True):
                methods = {w: _dpm_case(w, algorithm, shape, gen) for w in ("ours", "diffusers")}
                params = {"family": "dpm", "algorithm": algorithm, "shape": list(shape), "generator": gen}
                out.append(
                    (f"DPM {algorithm}, {list(shape)}, {'generator' if gen else 'no generator'}", params, methods)
                )
    for algorithm in DPM_ALGORITHMS:
        for gen in (False, True):
            methods = {w: _dpm_loop_case(w, algorithm, gen) for w in ("ours", "diffusers")}
            params = {"family": "dpm_loop", "algorithm": algorithm, "shape": [1, 4, 64, 64], "generator": gen,
                      "steps": 20}  # fmt: skip
            name = f"DPM {algorithm} 20-step loop, 3x3 conv model, {'generator' if gen else 'no generator'}"
            out.append((name, params, methods))
    return out


def _quartiles(xs):
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "min": min(xs), "max": max(xs)}


def _block(fn, n):
    w, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    return 1e6 * (time.perf_counter() - w) / n, 1e6 * (time.process_time() - c) / n


def interleaved(methods, rounds, block_ms):
    """Per method: us per call (median / quartiles of the rounds' block means, wall; median CPU); per other
    method the per-round ratio other / first."""
    calls = {}
    for name, fn in methods.items():  # warm up, then size each method's block to about block_ms
        for _ in range(3):
            fn()
        per_call, _ = _block(fn, 3)
        calls[name] = max(1, int(1e3 * block_ms / max(per_call, 1.0)))
    wall = {name: [] for name in methods}
    cpu = {name: [] for name in methods}
    order = list(methods)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            w, c = _block(methods[name], calls[name])
            wall[name].append(w)
            cpu[name].append(c)
    out = {name: {"calls_per_block": calls[name], "wall_us": _quartiles(wall[name]),
                  "median_cpu_us": statistics.median(cpu[name])} for name in methods}  # fmt: skip
    first, *others = methods
    for name in others:
        out[f"ratio {name} / {first}"] = {
            "wall": _quartiles([o / f for o, f in zip(wall[name], wall[first], strict=True)]),
            "cpu": _quartiles([o / f for o, f in zip(cpu[name], cpu[first], strict=True)]),
        }
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--block-ms", type=float, default=4.0, help="target wall time of one block of calls")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--only", default=None, help="run only cases whose name contains this")
    parser.add_argument("--note", default="", help="what else ran on the machine (recorded in the JSON)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/schedulers_cpu.json")
    args = parser.parse_args()
    if args.threads:  # one thread: no parallel region waiting on a descheduled peer on a loaded machine
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = []
    for name, params, methods in cases():
        if args.only and args.only not in name:
            continue
        row = {"case": name, **params}
        row.update(interleaved(methods, args.rounds, args.block_ms))
        results.append(row)
        line = f"{name:72s} ours {row['ours']['wall_us']['median']:9.1f} us"
        for other in list(methods)[1:]:
            r = row[f"ratio {other} / ours"]["wall"]
            line += f" | {other} {row[other]['wall_us']['median']:9.1f} us, {other}/ours {r['median']:.2f}"
            line += f" [{r['q1']:.2f}, {r['q3']:.2f}]"
        print(line, flush=True)
    load = {"loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg(), "note": args.note}
    doc = {
        "benchmark": "diffusers scheduler step (and a 20-step DPM-Solver++ loop), ours vs diffusers, interleaved",
        "package": os.path.dirname(ddim_gmm_ext.__file__),
        "rounds": args.rounds,
        "block_ms": args.block_ms,
        "grad_mode": "steps: torch default (enabled, as bench_schedulers.py); loops: no_grad",
        "load": load,
        "results": results,
    }
    print("wrote", write_json(doc, "cpu", args.out, "schedulers_cpu.json"))


if __name__ == "__main__":
    main()
