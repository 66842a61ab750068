"""Writes benchmarks/results/model_loops_cpu.json: whole DDIM sampling loops with the shipped digits MLP and
Fashion-MNIST U-Net at 5, 20 and 50 steps, ours against diffusers' DDIMScheduler, and the sampler's share of
each loop (the loop's time less the network's, over the loop's).

    python benchmarks/model_loop_results.py [--rounds 5] [--threads 1] [--note "what ran"]

The cases are bench_model_loops.py's. Per (model, steps) the variants (ours GMM off at eta 0, diffusers at eta 0,
ours ORTHO-VUB at eta 1) run interleaved, one whole loop each per round, the order reversed every other round.
Each loop times its network calls itself (this thread's CPU time around each call; one torch thread), so the
sampler's time is everything else in the loop: set_timesteps, the scheduler steps and the loop's own Python.
Figures are medians over the rounds of CPU ms per loop, the network's and the sampler's, and the sampler's
share of the loop; the wall time per loop is recorded beside them (on a loaded machine it also counts the time
the process waited for a core). Beside them, the loop's middle step timed alone (interleaved, per-call
medians) and its share: steps x that step's time over the loop's. On CPU a step inside the loop costs more than
alone (right after the network's matrix products even a copy of the sample is several times slower), for both
schedulers alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from bench_model_loops import MODELS, STEPS, VARIANTS, load_model, lone_step, model_loop
from common import interleaved, quartiles, write_json


def measure(model: str, steps: int, net, rounds: int) -> dict:
    """Per variant: CPU ms per loop (quartiles; and the median wall ms), the network's and the sampler's CPU ms
    per loop and the sampler's share; and the per-round ratios diffusers / ours of the whole loop's CPU time and
    of the sampler's part alone."""
    timers = {v: {} for v in VARIANTS}
    loops = {v: model_loop(model, v, steps, net, timers[v]) for v in VARIANTS}
    for loop in loops.values():
        loop()
    rows = {v: {"wall_ms": [], "cpu_ms": [], "model_ms": [], "sampler_ms": []} for v in VARIANTS}
    order = list(VARIANTS)
    for r in range(rounds):
        for v in order if r % 2 == 0 else order[::-1]:
            timers[v].clear()
            w = time.perf_counter()
            loops[v]()
            wall = time.perf_counter() - w
            loop_s, model_s = timers[v]["loop"], timers[v]["model"]
            rows[v]["wall_ms"].append(1e3 * wall)
            rows[v]["cpu_ms"].append(1e3 * loop_s)
            rows[v]["model_ms"].append(1e3 * model_s)
            rows[v]["sampler_ms"].append(1e3 * (loop_s - model_s))
    out: dict = {"model": model, "steps": steps, "batch": MODELS[model][0], "sample_shape": list(MODELS[model][1])}
    for v, row in rows.items():
        shares = [s / c for s, c in zip(row["sampler_ms"], row["cpu_ms"], strict=True)]
        out[v] = {
            "cpu_ms": quartiles(row["cpu_ms"]),
            "median_wall_ms": statistics.median(row["wall_ms"]),
            "median_model_ms": statistics.median(row["model_ms"]),
            "median_sampler_ms": statistics.median(row["sampler_ms"]),
            "sampler_us_per_step": 1e3 * statistics.median(row["sampler_ms"]) / steps,
            "sampler_share": quartiles(shares),
        }
    # the same step alone, interleaved (per-call medians): what it costs without the network around it
    alone = interleaved({v: lone_step(model, v, steps) for v in VARIANTS}, 20, 2.0, 5)
    for v in VARIANTS:
        us = alone[v]["median_call_us"]
        out[v]["lone_step_us"] = us
        out[v]["lone_step_share"] = steps * us / (1e3 * out[v]["cpu_ms"]["median"])
    out["ratio diffusers / ours, lone step"] = alone["ratio diffusers / ours"]["call"]
    ours, theirs = rows["ours"], rows["diffusers"]
    out["ratio diffusers / ours, loop"] = quartiles(
        [d / o for d, o in zip(theirs["cpu_ms"], ours["cpu_ms"], strict=True)]
    )
    out["ratio diffusers / ours, sampler"] = quartiles(
        [d / o for d, o in zip(theirs["sampler_ms"], ours["sampler_ms"], strict=True)]
    )
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--note", default="", help="what else ran on the machine (recorded in the JSON)")
    p.add_argument("--out", default=None, help="default: benchmarks/results/model_loops_cpu.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = []
    for model in MODELS:
        net = load_model(model)
        for steps in STEPS:
            row = measure(model, steps, net, args.rounds)
            results.append(row)
            line = f"{model:8s} {steps:3d} steps"
            for v in VARIANTS:
                r = row[v]
                line += f" | {v}: {r['cpu_ms']['median']:8.1f} ms, sampler {r['sampler_share']['median']:6.2%}"
            line += f" | diffusers / ours {row['ratio diffusers / ours, loop']['median']:.3f}"
            line += f", sampler alone {row['ratio diffusers / ours, sampler']['median']:.2f}"
            line += f", lone step {row['ratio diffusers / ours, lone step']['median']:.2f}"
            print(line, flush=True)
    doc = {
        "benchmark": "whole DDIM loops with the shipped networks, ours vs diffusers, the sampler's share",
        "package": os.path.dirname(__import__("ddim_gmm_ext").__file__),
        "rounds": args.rounds,
        "grad_mode": "no_grad",
        "load": {"loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg(), "note": args.note},
        "results": results,
    }
    print("wrote", write_json(doc, "cpu", args.out, "model_loops_cpu.json"))
    return doc


if __name__ == "__main__":
    main()
