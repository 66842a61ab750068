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
