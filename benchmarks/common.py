"""What every benchmark script shares: the machine and versions a result was measured with, the timers (CUDA
events over back-to-back calls on a GPU, never a sync per call; perf_counter / process time on a CPU) and the
JSON writer. Each script stays a thin list of cases over these."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine(device: str) -> dict:
    """CPU model, core and thread counts, the ISA torch dispatches to, and the GPU on CUDA."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return info


def versions() -> dict:
    """Python, torch, this package, triton and diffusers (None when absent)."""
    import ddim_gmm_ext

    out = {"python": platform.python_version(), "torch": torch.__version__, "ddim_gmm_ext": ddim_gmm_ext.__version__}
    for name in ("triton", "diffusers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def cuda_time(fn: Callable[[], object], min_run_time: float = 1.0, blocks: int = 5) -> float:
    """Seconds per call of ``fn`` on the current CUDA device: the mean over back-to-back calls between two
    CUDA events (a sync per call would time the launch, not the kernel), enough calls to fill about
    ``min_run_time`` in all, median of ``blocks`` such blocks."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def block(n: int) -> float:
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / n

    for _ in range(3):
        fn()
    n = max(10, int(min_run_time / blocks / max(block(10), 1e-7)))
    return statistics.median(block(n) for _ in range(blocks))


def cpu_times(fn: Callable[[], object], repeats: int) -> dict:
    """Wall and process-CPU milliseconds of ``repeats`` calls after one warm-up: median, min and IQR (on a shared
    machine the CPU time is the steadier figure)."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(1e3 * (time.perf_counter() - w))
        cpu.append(1e3 * (time.process_time() - c))
    q = statistics.quantiles(wall, n=4) if len(wall) > 1 else [wall[0]] * 3
    return {
        "median_ms": statistics.median(wall),
        "min_ms": min(wall),
        "iqr_ms": q[2] - q[0],
        "median_cpu_ms": statistics.median(cpu),
        "ms": wall,
    }


def quartiles(xs: list[float]) -> dict:
    """Median, quartiles, min and max of ``xs``."""
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "min": min(xs), "max": max(xs)}


def _block(fn: Callable[[], object], n: int) -> tuple[float, float, float, float]:
    """``n`` back-to-back calls: wall and process-CPU microseconds per call over the block, the median of the
    calls' own wall times (a call during which the process was descheduled is an outlier there, not a shift of
    the whole block) and the minor page faults per call (fresh memory an allocation had to fault in)."""
    clock = time.perf_counter
    each = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    w, c = clock(), time.process_time()
    for _ in range(n):
        t = clock()
        fn()
        each.append(clock() - t)
    wall, cpu = 1e6 * (clock() - w) / n, 1e6 * (time.process_time() - c) / n
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / n
    return wall, cpu, 1e6 * statistics.median(each), faults


#: calls per block from which the per-call median is the steadier figure
MIN_CALLS_FOR_MEDIAN = 5


def interleaved(methods: dict[str, Callable[[], object]], rounds: int, block_ms: float, min_calls: int = 1) -> dict:
    """Times ``methods`` side by side: after a warm-up each gets a block of back-to-back calls sized to about
    ``block_ms`` (at least ``min_calls`` calls), one block per method per round, the order reversed every other
    round, so that load on a shared machine falls on all of them alike. Per method: us per call (median and
    quartiles of the rounds' block means, wall; median process CPU); per other method the per-round ratio
    other / first of wall time, process-CPU time and, where every method made at least MIN_CALLS_FOR_MEDIAN
    calls a block, of the blocks' median call times ("call"): a ratio above 1, the first is faster."""
    calls = {}
    for name, fn in methods.items():
        fn()
        per_call = min(_block(fn, 1)[0] for _ in range(3))  # the fastest: a preempted call would shrink the block
        calls[name] = max(min_calls, int(1e3 * block_ms / max(per_call, 1.0)))
    keys = ("wall", "cpu", "call", "faults")
    times: dict[str, dict[str, list[float]]] = {name: {key: [] for key in keys} for name in methods}
    order = list(methods)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            for key, value in zip(keys, _block(methods[name], calls[name]), strict=True):
                times[name][key].append(value)
    out: dict = {
        name: {
            "calls_per_block": calls[name],
            "wall_us": quartiles(times[name]["wall"]),
            "median_cpu_us": statistics.median(times[name]["cpu"]),
            "median_call_us": statistics.median(times[name]["call"]),
            "page_faults_per_call": statistics.mean(times[name]["faults"]),
        }
        for name in methods
    }
    kinds = ("wall", "cpu") + (("call",) if min(calls.values()) >= MIN_CALLS_FOR_MEDIAN else ())
    first, *others = methods
    for name in others:
        out[f"ratio {name} / {first}"] = {
            kind: quartiles([o / f for o, f in zip(times[name][kind], times[first][kind], strict=True)])
            for kind in kinds
        }
    return out


def write_json(doc: dict, device: str, out: str | None, default_name: str) -> str:
    """Writes ``doc`` with the shared fields (date, command, device, machine, versions) to ``out`` or to
    benchmarks/results/<default_name>; returns the path."""
    path = out or os.path.join(RESULTS, default_name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    shared = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "device": device,
        "machine": machine(device),
        "versions": versions(),
    }
    with open(path, "w") as f:
        json.dump(shared | doc, f, indent=1)
    return path
