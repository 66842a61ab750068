"""The CPU step's two limits, side by side in one process: the in-kernel normals against torch.randn and a bare
Philox loop, and the streaming step's bandwidth against a copy of the same bytes. Writes
benchmarks/results/stream_noise_cpu.json.

    PYTHONPATH=. python benchmarks/stream_noise_results.py [--rounds 15] [--threads 1,2] [--heap steady|default]

- normals: ns per normal on one thread of each path of the kernel's generator (csrc/cpu/normals.h: portable,
  AVX2, AVX-512, the same bits), of that path's bare Philox loop (its bound: no Box-Muller, no store) and of
  torch.randn into a preallocated buffer; 2^18 normals a call, into a buffer that stays in L2.
- step: at each shape (float32) and thread count, the op (x_s only unless named) at eta 0, eta 0 with x0_hat,
  eta 1 with the noise given, eta 1 with in-kernel noise (each normals path), and GMM steps (ORTHO-VUB diagonal
  and ORTHO-LR low rank, K = 8, eta 1, noise and components given or drawn), against `dst.copy_(x)` into a
  preallocated tensor and a clone (a fresh output). Effective bandwidth = the bytes a step must move (read
  x_t, the model output and the given noise, write x_s and x0_hat; the tables of the components once) / time; its
  fraction of a copy's moving the same bytes (12 or 16 an element, half read, half written) is the figure to read.
- schedulers: the SDE-type steps (DDPM, Euler ancestral, DPM-Solver++ SDE) without a generator at
  [4, 4, 128, 128], one thread, ours through each normals path against diffusers.

Every method of a group runs interleaved (common.interleaved: a block of calls each per round, the order reversed
every other round), so load on a shared machine falls on all alike; figures are process-CPU medians (the wall
medians and the quartiles are in the JSON). `--heap steady` fixes glibc's malloc thresholds (gate.steady_heap:
no page faults on fresh outputs), `--heap default` leaves them adaptive, as in a user's process, `--heap fresh`
maps every large output anew (the worst case of the adaptive thresholds).
"""

from __future__ import annotations

import argparse
import math
import os

import torch
from common import interleaved, write_json
from gate import steady_heap

import ddim_gmm_ext as dg
from ddim_gmm_ext import reference as R
from ddim_gmm_ext._checks import StepOptions
from ddim_gmm_ext.ops import cpu_normals
from ddim_gmm_ext.ops.step import step as step_op

NORMALS_GROUPS = 1 << 16  # 2^18 normals, 1 MB: stays in L2
ALPHA_T, ALPHA_PREV, STEP = 0.3, 0.45, 1


def normals_cases() -> dict:
    """name -> (call, normals per call)."""
    buf = torch.empty(4 * NORMALS_GROUPS)
    n = 4 * NORMALS_GROUPS
    cases = {}
    draw = cpu_normals.normals
    for name in cpu_normals.PATHS:
        if cpu_normals.supported(name):
            cases[f"normals {name}"] = (lambda name=name: draw(name, 0, NORMALS_GROUPS, 1, 2, 0, 3, buf), n)
            cases[f"bare philox {name}"] = (lambda name=name: cpu_normals.philox_bound(name, NORMALS_GROUPS, 3), n)
    cases["torch.randn"] = (lambda: torch.randn(n, out=buf), n)
    return cases


def step_cases(shape) -> dict:
    """name -> (call, bytes it must move), and the number of elements."""
    g = torch.Generator().manual_seed(0)
    x, m, z = (torch.randn(shape, generator=g) for _ in range(3))
    numel, D = x.numel(), math.prod(shape[1:])
    # copies of the bytes the steps move: 12 B an element (x_t, the model output, x_s) and 16 (with the noise or
    # x0_hat), read half and written half, so that they need as much cache as the steps (a copy of x alone fits
    # the L3 of many machines where the step's three tensors do not)
    src12, src16 = torch.randn(numel * 3 // 2), torch.randn(2 * numel)
    dst12, dst16 = torch.empty_like(src12), torch.empty_like(src16)
    row = {eta: torch.tensor(R.coefficient_row(*R.ddim_coefficients(ALPHA_T, ALPHA_PREV, eta)), dtype=torch.float32)
           for eta in (0.0, 1.0)}  # fmt: skip
    k = torch.randint(0, 8, (shape[0],), generator=g)

    def op(eta, tables=None, x0=False, **kw):
        options = StepOptions(return_pred_original=x0, **kw)
        return lambda: step_op(m, x, row[eta], options, step_index=STEP, tables=tables)

    cases = {
        "copy 12": (lambda: dst12.copy_(src12), 12 * numel),
        "copy 16": (lambda: dst16.copy_(src16), 16 * numel),
        "clone 12": (lambda: src12.clone(), 12 * numel),
        # the eta 0 step's own streams (read x and m, write a fresh output) in one ATen kernel: what a streaming
        # pass of these bytes reaches here, beside the copy
        "torch.add x + a m": (lambda: torch.add(x, m, alpha=0.5), 12 * numel),
        "eta 0": (op(0.0), 12 * numel),
        "eta 0, x0": (op(0.0, x0=True), 16 * numel),
        "eta 1, noise given": (op(1.0, noise=z), 16 * numel),
    }
    for name in cpu_normals.PATHS:
        if cpu_normals.supported(name):
            fn = op(1.0)

            def in_kernel(fn=fn, name=name):
                with cpu_normals.use_path(name):
                    return fn()

            cases[f"eta 1, in-kernel ({name})"] = (in_kernel, 12 * numel)
    for variant, label in (("ortho-vub", "GMM ORTHO-VUB"), ("ortho-lr", "GMM ORTHO-LR")):
        gmm = dg.GMM.create(D, n_components=8, n_steps=4, variant=variant)
        tables = gmm.step_tables(x)
        table_bytes = sum(4 * t[STEP].numel() for t in tables[1:] if t is not None)  # offsets, var, basis
        cases[f"{label}, noise given"] = (op(1.0, tables, noise=z, components=k), 16 * numel + table_bytes)
        cases[f"{label}, in-kernel"] = (op(1.0, tables), 12 * numel + table_bytes)
    return cases, numel


def scheduler_cases() -> dict:
    """case name -> {method: call}, ours first."""
    from bench_schedulers import _dpm_case, _new_family_case

    shape = (4, 4, 128, 128)
    out = {}
    for label, build in (
        ("DDPM", lambda w: _new_family_case("ddpm", w, shape, False)),
        ("Euler ancestral", lambda w: _new_family_case("euler_a", w, shape, False)),
        ("DPM sde-dpmsolver++", lambda w: _dpm_case(w, "sde-dpmsolver++", shape, False)),
    ):
        ours = build("ours")
        methods = {}
        for name in reversed(cpu_normals.PATHS):
            if cpu_normals.supported(name):

                def call(name=name, ours=ours):
                    with cpu_normals.use_path(name):
                        return ours()

                methods[f"ours ({name})"] = call
        methods["diffusers"] = build("diffusers")
        out[f"{label}, {list(shape)}, no generator"] = methods
    return out


def fresh_heap() -> bool:
    """glibc's malloc serving every block from 128 KB on with a fresh mmap (the threshold fixed at its initial
    value): each large output is faulted in anew, a page fault per 4 KB (2 MB with THP_MEM_ALLOC_ENABLE=1)."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10))  # M_MMAP_THRESHOLD
    except OSError:
        return False


def _cpu_us(res: dict, name: str) -> float:
    return res[name]["median_cpu_us"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--block-ms", type=float, default=30.0)
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}", help="thread counts of the step part")
    parser.add_argument("--shapes", default="16x3x256x256", help="comma-separated, e.g. 16x3x256x256,8x4x128x128")
    parser.add_argument("--heap", choices=("steady", "default", "fresh"), default="steady")
    parser.add_argument("--only", default="normals,step,schedulers", help="parts to run")
    parser.add_argument("--note", default="", help="what else ran on the machine (recorded in the JSON)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/stream_noise_cpu.json")
    args = parser.parse_args()
    heap = steady_heap() if args.heap == "steady" else fresh_heap() if args.heap == "fresh" else False
    doc: dict = {"heap": args.heap, "steady_heap_applied": heap, "note": args.note, "load_before": os.getloadavg()}
    doc["normals_path"] = cpu_normals.path()
    parts = args.only.split(",")

    if "normals" in parts:
        torch.set_num_threads(1)
        cases = normals_cases()
        res = interleaved({k: fn for k, (fn, _) in cases.items()}, args.rounds, args.block_ms, min_calls=5)
        table = {k: {"ns_per_normal": 1e3 * _cpu_us(res, k) / n, "normals_per_s": n / _cpu_us(res, k) * 1e6}
                 for k, (_, n) in cases.items()}  # fmt: skip
        doc["normals"] = {"threads": 1, "per_normal": table, "timings": res}
        for k, v in table.items():
            print(f"  {k:28s} {v['ns_per_normal']:6.3f} ns/normal  {v['normals_per_s'] / 1e6:8.1f} M/s", flush=True)

    if "step" in parts:
        doc["step"] = []
        for shape in ([int(s) for s in spec.split("x")] for spec in args.shapes.split(",")):
            cases, numel = step_cases(shape)
            for threads in (int(t) for t in args.threads.split(",")):
                torch.set_num_threads(threads)
                res = interleaved({k: fn for k, (fn, _) in cases.items()}, args.rounds, args.block_ms, min_calls=5)
                rows = {}
                for k, (_, nbytes) in cases.items():
                    us = _cpu_us(res, k) if threads == 1 else res[k]["wall_us"]["median"]
                    bw = nbytes / us / 1e3  # GB/s
                    copy = "copy 12" if nbytes < 16 * numel else "copy 16"  # the copy of (about) the same bytes
                    copy_us = _cpu_us(res, copy) if threads == 1 else res[copy]["wall_us"]["median"]
                    copy_bw = cases[copy][1] / copy_us / 1e3
                    rows[k] = {"us": us, "bytes": nbytes, "GB_s": bw, "fraction_of_copy": bw / copy_bw,
                               "page_faults_per_call": res[k]["page_faults_per_call"]}  # fmt: skip
                    print(f"  {shape} {threads} thr {k:34s} {us:9.1f} us {bw:6.1f} GB/s {bw / copy_bw:5.2f} of copy"
                          f"  faults/call {res[k]['page_faults_per_call']:.1f}", flush=True)  # fmt: skip
                doc["step"].append({"shape": shape, "threads": threads, "time": "process CPU" if threads == 1
                                    else "wall", "rows": rows, "timings": res})  # fmt: skip
        torch.set_num_threads(1)

    if "schedulers" in parts:
        torch.set_num_threads(1)
        doc["schedulers"] = {}
        for case, methods in scheduler_cases().items():
            res = interleaved(methods, args.rounds, args.block_ms / 3, min_calls=5)
            doc["schedulers"][case] = res
            ours = [k for k in methods if k.startswith("ours")]
            ratios = ", ".join(f"{k}: {_cpu_us(res, 'diffusers') / _cpu_us(res, k):.2f}x" for k in ours)
            print(f"  {case}: diffusers {_cpu_us(res, 'diffusers'):.0f} us; diffusers / {ratios}", flush=True)

    doc["load_after"] = os.getloadavg()
    print(write_json(doc, "cpu", args.out, "stream_noise_cpu.json"))


if __name__ == "__main__":
    main()
