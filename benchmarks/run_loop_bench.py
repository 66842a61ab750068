"""A whole sampling loop (model + scheduler step), eager vs compiled vs CUDA-graph replay, with diffusers'
DDIMScheduler beside it; writes benchmarks/results/loop_<device>.json.

    python benchmarks/run_loop_bench.py                  # CPU: eager and torch.compile
    python benchmarks/run_loop_bench.py --device cuda    # GPU: also one CUDA graph of the whole loop

The model is one 3x3 convolution, so the scheduler's share of a step is visible (with a real UNet the model
dominates every variant alike). Per variant the whole N-step loop is timed: CPU with perf_counter (median of
--repeats), CUDA with CUDA events around --repeats back-to-back loops (no sync per step or per loop).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import cpu_times, cuda_time, write_json

from ddim_gmm_ext.diffusers import DDIMGMMScheduler


def _scheduler(kind: str, gmm: str | None, steps: int, x: torch.Tensor):
    from diffusers import DDIMScheduler

    if kind == "diffusers":
        s = DDIMScheduler(clip_sample=False)
    else:
        s = DDIMGMMScheduler(clip_sample=False, gmm_variant=gmm, gmm_n_components=8, seed=0)
    s.set_timesteps(steps, device=x.device)
    if kind != "diffusers":
        s.prepare_gmm(x)  # GMM tables are built outside a compiled graph
    return s


def _timer(device: str, repeats: int):
    """ms per whole loop: CPU, ``repeats`` wall times (:func:`common.cpu_times`); CUDA, one mean over
    ``repeats`` back-to-back loops between CUDA events (:func:`common.cuda_time`)."""
    if device == "cuda":
        return lambda run: [1e3 * cuda_time(run, min_run_time=0.2 * repeats / 20)]
    return lambda run: cpu_times(run, repeats)["ms"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--shape", type=int, nargs=4, default=[1, 4, 64, 64], metavar=("B", "C", "H", "W"))
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/loop_<device>.json)")
    args = p.parse_args(argv)
    device = args.device
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(args.shape[1], args.shape[1], 3, padding=1).to(device).eval()
    x_T = torch.randn(args.shape, device=device)

    def step_fn(s, x, t):
        return s.step(conv(x), t, x, eta=args.eta).prev_sample

    compiled_step = torch.compile(step_fn, fullgraph=True)

    def loop(s, fn, x):
        if hasattr(s, "set_begin_index"):
            s.set_begin_index(0)  # a host-side counter reset (no device work), as a new pipeline call does
        for t in s.timesteps:
            x = fn(s, x, t)
        return x

    torch.set_grad_enabled(False)  # inference, as pipelines run under no_grad
    timer = _timer(device, args.repeats)
    cases = []  # (variant, gmm, zero-argument run)
    for gmm in (None, "ortho-vub"):
        variants = {"ours_eager": ("ours", step_fn), "ours_compiled": ("ours", compiled_step)}
        if gmm is None:
            variants["diffusers_eager"] = ("diffusers", step_fn)
        for name, (kind, fn) in variants.items():
            s = _scheduler(kind, gmm, args.steps, x_T)
            cases.append((name, gmm, lambda s=s, fn=fn: loop(s, fn, x_T)))
        if device == "cuda":
            s = _scheduler("ours", gmm, args.steps, x_T)
            static = x_T.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loop(s, step_fn, static.clone())
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                loop(s, step_fn, static)
            cases.append(("ours_cuda_graph", gmm, graph.replay))
    for _ in range(3):  # warm every case up first (tables, kernels, compilation, the thread pool)
        for _, _, run in cases:
            run()
    results = [{"variant": name, "gmm": gmm, "ms": timer(run)} for name, gmm, run in cases]
    for r in results:
        r["median_ms"] = statistics.median(r["ms"])
        r["per_step_us"] = 1e3 * r["median_ms"] / args.steps
    doc = {
        "benchmark": "whole sampling loop (3x3 conv model + scheduler step)",
        "shape": args.shape,
        "steps": args.steps,
        "eta": args.eta,
        "timing": "CUDA events over back-to-back loops" if device == "cuda" else "perf_counter, median of repeats",
        "results": results,
    }
    write_json(doc, device, args.out, f"loop_{device}.json")
    for r in results:
        print(f"{r['variant']:18s} gmm={r['gmm']!s:10s} {r['median_ms']:8.3f} ms/loop {r['per_step_us']:8.1f} us/step")
    return doc


if __name__ == "__main__":
    main()
