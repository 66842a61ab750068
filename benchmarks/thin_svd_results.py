"""Writes benchmarks/results/thin_svd_<device>.json: ddimgmm.thin_svd vs torch.linalg.svd (default driver,
and gesvda on CUDA) for the issue-4 shapes, and GMM.create (ORTHO, [50, 16384, 8]) split into its stages.

    python benchmarks/thin_svd_results.py [--device cuda] [--repeats 5]

Times are the median of `repeats` runs after one warm-up, wall clock, synchronised on CUDA. On CPU the
process CPU time is recorded too: on a shared machine it is the steadier figure.
"""

import argparse
import json
import os
import platform
import statistics
import time

import torch

import ddim_gmm_ext as dg
from ddim_gmm_ext import reference

SHAPES = [(50, 16384, 8), (50, 196608, 16), (1, 16384, 1024)]


def measure(fn, device, repeats):
    def once():
        if device == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu

    once()
    runs = [once() for _ in range(repeats)]
    return {
        "median_ms": 1e3 * statistics.median(w for w, _ in runs),
        "min_ms": 1e3 * min(w for w, _ in runs),
        "median_cpu_ms": 1e3 * statistics.median(c for _, c in runs),
    }


def machine(device):
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ddim_gmm_ext": dg.__version__,
    }
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return info


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/thin_svd_<device>.json")
    args = parser.parse_args()
    device, repeats = args.device, args.repeats

    methods = {"ddimgmm.thin_svd": dg.thin_svd, "torch.linalg.svd": lambda A: torch.linalg.svd(A, full_matrices=False)}
    if device == "cuda":
        methods["torch.linalg.svd(gesvda)"] = lambda A: torch.linalg.svd(A, full_matrices=False, driver="gesvda")
    results = []
    for shape in SHAPES:
        A = torch.randn(shape, device=device)
        row = {"shape": list(shape), "dtype": "float32"}
        for name, fn in methods.items():
            row[name] = measure(lambda fn=fn, A=A: fn(A), device, repeats)
            print(shape, name, f"{row[name]['median_ms']:.2f} ms")
        row["speedup_vs_linalg_svd"] = row["torch.linalg.svd"]["median_ms"] / row["ddimgmm.thin_svd"]["median_ms"]
        results.append(row)

    S, D, K = SHAPES[0]
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

    default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"thin_svd_{device}.json")
    out = args.out or default
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"machine": machine(device), "repeats": repeats, "thin_svd": results, "gmm_init": gmm}, f, indent=2)
    print("wrote", out)


if __name__ == "__main__":
    main()
