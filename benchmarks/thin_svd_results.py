"""Writes benchmarks/results/thin_svd_<device>.json: ddimgmm.thin_svd vs torch.linalg.svd (default driver,
and gesvda on CUDA) for the issue-4 shapes, and GMM.create (ORTHO, [50, 16384, 8]) split into its stages.

    python benchmarks/thin_svd_results.py [--device cuda] [--repeats 5]

Times are the median of `repeats` runs after one warm-up, wall clock, synchronised on CUDA. On CPU the
process CPU time is recorded too: on a shared machine it is the steadier figure.
"""

import argparse

import torch
from common import cpu_times, write_json

import ddim_gmm_ext as dg
from ddim_gmm_ext import reference

SHAPES = [(50, 16384, 8), (50, 196608, 16), (1, 16384, 1024)]


def measure(fn, device, repeats):
    """Median / min wall ms (and CPU ms) over ``repeats`` runs; on CUDA each run is synchronised (these are
    whole multi-kernel calls of milliseconds, not per-launch timings)."""
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

    doc = {"repeats": repeats, "thin_svd": results, "gmm_init": gmm}
    print("wrote", write_json(doc, device, args.out, f"thin_svd_{device}.json"))


if __name__ == "__main__":
    main()
