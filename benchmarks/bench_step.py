"""pytest-benchmark suite of the fused step, the same cases as run_step_bench.py (which writes the JSON):

pytest benchmarks/bench_step.py --benchmark-group-by=param:shape,param:eta
"""

import pytest
import torch
from run_step_bench import SHAPES, make_cases

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NAMES = ["op", "dg.ddim_step", "diffusers", "reference", "compiled_ref", "copy"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("name", NAMES)
def test_step(benchmark, device, shape, eta, name):
    cases = make_cases(device, shape, eta)
    if name not in cases:
        pytest.skip(f"{name} is not available (diffusers missing)")
    fn = cases[name]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()  # warm-up and compilation outside the timing

    def run():
        fn()
        sync()

    benchmark(run)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", ["ortho-vub", "ortho", "ortho-lr"])
def test_gmm_variant_step(benchmark, device, shape, variant):
    """One DDIM-GMM step at eta 1, K = 8, per GMM variant: the cost of ORTHO-LR's low-rank projection (one
    extra pass over the generated noise on CPU, a projection kernel on CUDA) next to the diagonal variants.

    pytest benchmarks/bench_step.py -k gmm_variant --benchmark-group-by=param:shape"""
    import ddim_gmm_ext as dg
    from ddim_gmm_ext import reference as R
    from ddim_gmm_ext._checks import StepOptions
    from ddim_gmm_ext.ops.step import step as step_op

    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device)
    m = torch.randn(shape, generator=g).to(device)
    gmm = dg.GMM.create(x[0].numel(), n_components=8, n_steps=4, variant=variant, device=device)
    a_t, b_t, a_s, b_s, c = R.ddim_coefficients(0.3, 0.45, 1.0)
    row = torch.tensor(R.coefficient_row(a_t, b_t, a_s, b_s, c), dtype=torch.float32, device=device)
    options = StepOptions(return_pred_original=False)
    tables = gmm.step_tables(x)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    step_op(m, x, row, options, step_index=1, tables=tables)

    def run():
        step_op(m, x, row, options, step_index=1, tables=tables)
        sync()

    benchmark(run)
