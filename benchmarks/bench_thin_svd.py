"""Thin SVD and GMM initialisation timings (pytest-benchmark).

pytest benchmarks/bench_thin_svd.py --benchmark-only            # this machine's devices
python benchmarks/thin_svd_results.py                            # writes benchmarks/results/thin_svd_<device>.json

Each (shape, dtype) is one pytest-benchmark group holding dg.thin_svd and torch.linalg.svd, so the table shows
their ratio measured in the same run (the figure to compare across runs and machines; a CPU regression in
dg.thin_svd shows as that ratio falling). No timing is asserted.
"""

import pytest
import torch

import ddim_gmm_ext as dg

SHAPES = [(50, 16384, 8), (8, 4096, 8), (50, 196608, 16), (1, 16384, 1024)]
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
METHODS = {
    "ddimgmm": dg.thin_svd,
    "linalg_svd": lambda A: torch.linalg.svd(A, full_matrices=False).U,
    "linalg_svd_gesvda": lambda A: torch.linalg.svd(A, full_matrices=False, driver="gesvda").U,
}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_thin_svd(benchmark, shape, dtype, method, device):
    if method == "linalg_svd_gesvda" and device != "cuda":
        pytest.skip("gesvda is a cuSOLVER driver")
    if dtype == "float64" and shape[1] * shape[2] > 16384 * 8:
        pytest.skip("float64 only at the GMM shapes (LAPACK takes seconds at the large ones)")
    A = torch.randn(shape, device=device, dtype=DTYPES[dtype])
    fn = METHODS[method]
    benchmark.group = f"thin_svd {device} {'x'.join(map(str, shape))} {dtype}"

    def run():
        fn(A)
        _sync(device)

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("device", DEVICES)
def test_gmm_create(benchmark, device):
    def run():
        dg.GMM.create(16384, 8, 50, variant="ortho", device=device)
        _sync(device)

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
