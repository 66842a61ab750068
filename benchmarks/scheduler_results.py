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

import torch
from bench_schedulers import (
    DPM_ALGORITHMS,
    _cases,
    _consistency_case,
    _dpm_case,
    _dpm_loop_case,
    _edm_case,
    _new_family_case,
    _sde_case,
    _sde_loop_case,
)
from common import interleaved, write_json

import ddim_gmm_ext

SHAPES = [(1, 4, 64, 64), (4, 4, 128, 128)]
NAMES = {"ddpm": "DDPM", "euler": "Euler", "euler_a": "Euler ancestral"}
CONSISTENCY_NAMES = {"lcm": "LCM", "tcd": "TCD (eta 0.3)", "flow_lcm": "flow-matching LCM"}


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
    for family, label in CONSISTENCY_NAMES.items():
        for shape in SHAPES:
            for gen in (False, True):
                methods = {w: _consistency_case(family, w, shape, gen) for w in ("ours", "diffusers")}
                params = {"family": family, "shape": list(shape), "generator": gen}
                out.append((f"{label}, {list(shape)}, {'generator' if gen else 'no generator'}", params, methods))
    for algorithm in DPM_ALGORITHMS:
        for gen in (False, True):
            methods = {w: _dpm_loop_case(w, algorithm, gen) for w in ("ours", "diffusers")}
            params = {"family": "dpm_loop", "algorithm": algorithm, "shape": [1, 4, 64, 64], "generator": gen,
                      "steps": 20}  # fmt: skip
            name = f"DPM {algorithm} 20-step loop, 3x3 conv model, {'generator' if gen else 'no generator'}"
            out.append((name, params, methods))
    labels = {"edm_euler": "EDM Euler", "edm_dpm": "EDM DPM dpmsolver++", "edm_sde_dpm": "EDM DPM sde-dpmsolver++"}
    for family, label in labels.items():
        for shape in SHAPES:
            for gen in (False, True) if family == "edm_sde_dpm" else (False,):  # only the SDE draws noise
                methods = {w: _edm_case(w, family, shape, gen) for w in ("ours", "diffusers")}
                params = {"family": family, "shape": list(shape), "generator": gen}
                out.append((f"{label}, {list(shape)}, {'generator' if gen else 'no generator'}", params, methods))
    for shape in SHAPES:
        methods = {w: _sde_case(w, shape) for w in ("ours", "diffusers")}
        params = {"family": "dpm_sde", "shape": list(shape), "noise": "fixed"}
        out.append((f"DPM++ SDE step (2 evaluations), fixed noise, {list(shape)}", params, methods))
        for tree in (False, True):
            methods = {w: _sde_loop_case(w, shape, tree) for w in ("ours", "diffusers")}
            params = {"family": "dpm_sde_loop", "shape": list(shape), "noise": "tree" if tree else "fixed", "steps": 10}
            noise = "Brownian tree" if tree else "fixed noise"
            out.append((f"DPM++ SDE 10-step loop, {noise}, {list(shape)}", params, methods))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--block-ms", type=float, default=4.0, help="target wall time of one block of calls")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--only", default=None, help="run only cases whose name contains this (or one of a|b|...)")
    parser.add_argument("--note", default="", help="what else ran on the machine (recorded in the JSON)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/schedulers_cpu.json")
    args = parser.parse_args()
    if args.threads:  # one thread: no parallel region waiting on a descheduled peer on a loaded machine
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = []
    for name, params, methods in cases():
        if args.only and not any(part in name for part in args.only.split("|")):
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
