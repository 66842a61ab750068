"""Writes benchmarks/results/thin_svd_<device>.json: dg.thin_svd against torch.linalg.svd (default driver, and
gesvda on CUDA), as a ratio measured in the same run, and GMM.create (ORTHO, [50, 16384, 8]) split into its
stages.

    python benchmarks/thin_svd_results.py [--device cuda] [--repeats 9] [--threads N] [--note "what ran"]

Per (shape, dtype) the methods run interleaved, one call each per round, so that load on a shared machine
falls on all of them alike; each round gives a ratio (LAPACK time / ours, above 1 when ours is faster), and the
JSON keeps its median and quartiles next to each method's median wall and process-CPU time. The ratio is the
figure to compare across runs: a CPU regression (dg.thin_svd 0.35-0.54x of LAPACK at
[50, 16384, 8] float64, 2.3-4.1x before) shows there. The load average before and after is recorded.
"""

import argparse
import os
import statistics
import time

import torch
from common import cpu_times, write_json

import ddim_gmm_ext as dg
from ddim_gmm_ext import reference

# (shape, dtype): the GMM shape and a smaller one in both dtypes, the large GPU-target shapes in float32.
CASES = [
    ((50, 16384, 8), torch.float64),
    ((50, 16384, 8), torch.float32),
    ((8, 4096, 8), torch.float64),
    ((8, 4096, 8), torch.float32),
    ((50, 196608, 16), torch.float32),
    ((1, 16384, 1024), torch.float32),
]


def _timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    w, c = time.perf_counter(), time.process_time()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - w), 1e3 * (time.process_time() - c)


def _quartiles(xs):
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "min": min(xs), "max": max(xs)}


def interleaved(methods, device, repeats):
    """Per method: median / quartiles of wall ms and median CPU ms over ``repeats`` rounds (one warm-up); per
    other method: the per-round ratio other / first (wall and CPU)."""
    for fn in methods.values():
        fn()
    wall = {name: [] for name in methods}
    cpu = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            w, c = _timed(fn, device)
            wall[name].append(w)
            cpu[name].append(c)
    out = {name: {"wall_ms": _quartiles(wall[name]), "median_cpu_ms": statistics.median(cpu[name])} for name in methods}
    first, *others = methods
    for name in others:
        out[f"ratio {name} / {first}"] = {
            "wall": _quartiles([o / f for o, f in zip(wall[name], wall[first], strict=True)]),
            "cpu": _quartiles([o / f for o, f in zip(cpu[name], cpu[first], strict=True)]),
        }
    return out


def measure(fn, device, repeats):
    """Median / min wall ms (and CPU ms) over ``repeats`` runs of one function (the GMM stages)."""
    if device != "cuda":
        times = cpu_times(fn, repeats)
        return {k: times[k] for k in ("median_ms", "min_ms", "iqr_ms", "median_cpu_ms")}

    def synced():
        fn()
        torch.cuda.synchronize()

    torch.cuda.synchronize()
    times = cpu_times(synced, repeats)
    return {k: times[k] for k in ("median_ms", "min_ms", "iqr_ms")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--note", default="", help="what else ran on the machine (recorded in the JSON)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/thin_svd_<device>.json")
    args = parser.parse_args()
    device, repeats = args.device, args.repeats
    if args.threads:  # one thread is the steadier ratio on a loaded machine (no waiting on a descheduled peer)
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    results = []
    for shape, dtype in CASES:
        A = torch.randn(shape, device=device, dtype=dtype)
        methods = {
            "ddimgmm.thin_svd": lambda A=A: dg.thin_svd(A),
            "torch.linalg.svd": lambda A=A: torch.linalg.svd(A, full_matrices=False),
        }
        if device == "cuda":
            methods["torch.linalg.svd(gesvda)"] = lambda A=A: torch.linalg.svd(A, full_matrices=False, driver="gesvda")
        rounds = repeats if shape[1] * shape[2] <= 16384 * 8 else max(3, repeats // 3)
        row = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "rounds": rounds}
        row.update(interleaved(methods, device, rounds))
        ratio = row["ratio torch.linalg.svd / ddimgmm.thin_svd"]
        row["speedup_vs_linalg_svd"] = ratio["wall"]["median"]
        results.append(row)
        print(
            shape,
            row["dtype"],
            f"ours {row['ddimgmm.thin_svd']['wall_ms']['median']:.2f} ms,",
            f"LAPACK {row['torch.linalg.svd']['wall_ms']['median']:.2f} ms,",
            f"LAPACK / ours {ratio['wall']['median']:.2f} [{ratio['wall']['q1']:.2f}, {ratio['wall']['q3']:.2f}]",
            f"(CPU time {ratio['cpu']['median']:.2f})",
        )

    S, D, K = 50, 16384, 8
    O64 = reference.offset_directions(S, D, K, seed=0, device=device)
    gmm = {
        "shape": [S, D, K],
        "variant": "ortho",
        "GMM.create": measure(lambda: dg.GMM.create(D, K, S, variant="ortho", device=device), device, repeats),
        "offset_directions (Philox draw of O, float64)": measure(
            lambda: reference.offset_directions(S, D, K, seed=0, device=device), device, repeats
        ),
        "thin_svd of O (float64, ddimgmm)": measure(lambda: dg.thin_svd(O64), device, repeats),
        "thin_svd of O (float64, LAPACK reference)": measure(lambda: reference.thin_svd(O64), device, repeats),
        "GMM init with reference.thin_svd": measure(
            lambda: reference.gmm_parameters(D, K, S, variant="ortho", device=device), device, repeats
        ),
    }
    for name, value in gmm.items():
        if isinstance(value, dict):
            print(name, f"{value['median_ms']:.2f} ms")

    load = {"loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg(), "note": args.note}
    # Which build ran: a script's folder, not the working directory, starts sys.path, so an installed copy of
    # the package wins over the checkout unless PYTHONPATH names it.
    doc = {"package": os.path.dirname(dg.__file__), "repeats": repeats, "load": load, "thin_svd": results}
    doc["gmm_init"] = gmm
    print("wrote", write_json(doc, device, args.out, f"thin_svd_{device}.json"))


if __name__ == "__main__":
    main()
