"""The CPU kernel's float32 normals take the widest path the CPU has (AVX-512, AVX2, the portable loop;
csrc/cpu/normals.h): every path gives the same bits, so a sample does not depend on the machine's vector width.

Checked to fail with a mutation of the vector paths only (normals_body.h, log_unit: -0.5f z as -0.50000006f z, one
ulp): the three path comparisons fail, the reference comparisons (float32 rounding) pass."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ddim_gmm_ext as dg
from ddim_gmm_ext import reference as R
from ddim_gmm_ext.ops import cpu_normals
from tests.helpers import assert_close

VECTOR_PATHS = [p for p in cpu_normals.PATHS[1:] if cpu_normals.supported(p)]
needs_vector = pytest.mark.skipif(not VECTOR_PATHS, reason="this CPU has no AVX2 / AVX-512 path")

# (g0, groups, c1, c2, c3, seed): full vector blocks and every tail length, counters that wrap at 2^32, extreme
# words and keys
CASES = [(0, 4099, 0, 0, 0, 0), (2**32 - 37, 211, 2**32 - 1, 2**31, 1, 2**64 - 1), (5, 1, 7, 3, 2, 2**40 + 3)]
CASES += [(1000 * n, n, n, 2, 0, 11) for n in range(1, 34)]


def _bits(z: torch.Tensor) -> torch.Tensor:
    return z.view(torch.int32)


@needs_vector
@pytest.mark.parametrize("path", VECTOR_PATHS)
def test_vector_paths_give_the_portable_bits(path):
    for case in CASES:
        portable, vector = cpu_normals.normals("portable", *case), cpu_normals.normals(path, *case)
        assert torch.equal(_bits(vector), _bits(portable)), (path, case)


@pytest.mark.parametrize("path", [p for p in cpu_normals.PATHS if cpu_normals.supported(p)])
def test_each_path_draws_the_reference_stream(path):
    """The words are the reference's bit for bit (the bare loop's xor) and the normals its Box-Muller to float32
    rounding (the kernel's log / sin / cos polynomials against torch's)."""
    for g0, groups, c1, c2, c3, seed in CASES[:3]:
        words = R.philox4x32((torch.arange(groups) + g0) & 0xFFFFFFFF, c1, c2, c3, seed)
        assert_close(cpu_normals.normals(path, g0, groups, c1, c2, c3, seed), R.normals(words).flatten())
    groups = 1000
    words = R.philox4x32(torch.arange(groups), 0, 0, 0, 2**33 + 5)
    folded = int(np.bitwise_xor.reduce(torch.stack(words).flatten().numpy()))
    assert cpu_normals.philox_bound(path, groups, 2**33 + 5) == folded


@needs_vector
def test_step_is_the_same_on_every_path_and_thread_count():
    """The whole step with in-kernel noise and components (a GMM at eta 1), per path and at 1 and 2 threads,
    and a part of the batch with its offset: one result, bit for bit."""
    shape = (5, 3, 33, 47)  # 4653 per sample: several chunks, a tail not a multiple of 4 or of a vector
    g = torch.Generator().manual_seed(0)
    x, m = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    gmm = dg.GMM.create(shape[1] * shape[2] * shape[3], n_components=4, n_steps=2, variant="ortho-vub", seed=3)
    kw = dict(eta=1.0, gmm=gmm, step_index=1, seed=2**40 + 9)
    threads = torch.get_num_threads()
    results = []
    try:
        for path in cpu_normals.PATHS:
            with cpu_normals.use_path(path):
                for n in (1, 2):
                    torch.set_num_threads(n)
                    results.append(dg.ddim_step(m, x, 0.5, 0.8, **kw).prev_sample)
                part = dg.ddim_step(m[2:4], x[2:4], 0.5, 0.8, sample_offset=2, **kw).prev_sample
                assert torch.equal(_bits(part), _bits(results[-1][2:4])), path
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert torch.equal(_bits(r), _bits(results[0]))


def test_environment_variable_picks_the_path():
    code = "from ddim_gmm_ext.ops import cpu_normals; print(cpu_normals.path())"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "DDIMGMM_CPU_NORMALS": "portable", "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "portable"
    widest = [p for p in cpu_normals.PATHS if cpu_normals.supported(p)][-1]
    env.pop("DDIMGMM_CPU_NORMALS")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == widest
