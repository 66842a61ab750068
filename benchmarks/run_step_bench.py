"""Benchmark of the fused sampler step, side by side in one run; writes benchmarks/results/step_<device>.json.

    python benchmarks/run_step_bench.py                  # CPU
    python benchmarks/run_step_bench.py --device cuda    # GPU (the whole comparison in one command)

Per shape ([1, 4, 64, 64], [8, 4, 128, 128], [16, 3, 256, 256], float32, DDIM-GMM ORTHO-VUB K = 8 where a GMM
is used) it times:
  op             torch.ops.ddimgmm.step, x_s only (what a sampler loop needs)
  dg.ddim_step   the public function (argument checks, coefficients, x_s and x0_hat)
  diffusers      DDIMScheduler.step, eager (eta 0; eta 1 draws its noise with torch.randn)
  reference      dg.reference.ddim_step, eager
  compiled_ref   torch.compile of the reference GMM step (z from torch.randn in the graph, fixed components)
each at eta 0 and eta 1. GB/s counts the bytes a step must move: read x_t and the model output, write x_s
(12 B per element); `copy` is a device copy of x_t for scale. Ratios are times of the others over `op`.
"""

from __future__ import annotations

import argparse

import torch
import torch.utils.benchmark as tbench
from common import cuda_time, write_json

import ddim_gmm_ext as dg
from ddim_gmm_ext import reference as R
from ddim_gmm_ext._checks import StepOptions
from ddim_gmm_ext.ops.step import step as step_op

SHAPES = [(1, 4, 64, 64), (8, 4, 128, 128), (16, 3, 256, 256)]
ALPHA_T, ALPHA_PREV, STEP = 0.3, 0.45, 1  # a mid-sampling DDIM step


def make_cases(device: str, shape, eta: float) -> dict:
    """name -> zero-argument callable running one step on ``device``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device)
    m = torch.randn(shape, generator=g).to(device)
    gmm = dg.GMM.create(x[0].numel(), n_components=8, n_steps=4, variant="ortho-vub", device=device)
    a_t, b_t, a_s, b_s, c = R.ddim_coefficients(ALPHA_T, ALPHA_PREV, eta)
    coeffs = torch.tensor(R.coefficient_row(a_t, b_t, a_s, b_s, c), dtype=torch.float32, device=device)
    tables = gmm.step_tables(x)

    def op():
        return step_op(m, x, coeffs, StepOptions(return_pred_original=False), step_index=STEP, tables=tables)

    def public():
        return dg.ddim_step(m, x, ALPHA_T, ALPHA_PREV, eta=eta, gmm=gmm, step_index=STEP)

    def reference():
        return R.ddim_step(m, x, ALPHA_T, ALPHA_PREV, eta=eta, gmm=gmm, step_index=STEP)

    # The reference's own Philox stream does not compile in useful time (inductor inlines its ten rounds of
    # 64-bit arithmetic into one very deep pointwise graph: no result after several minutes on the 2-core CI
    # box), so the compiled baseline draws z with torch.randn inside the graph and takes fixed components
    # (_checks reads the values of CPU components: one graph break, guarded on values that then do not change).
    k = torch.randint(0, gmm.n_components, (x.shape[0],), generator=g).to(device)

    def ref_step_randn(m, x):
        z = torch.randn_like(x)
        return R.ddim_step(m, x, ALPHA_T, ALPHA_PREV, eta=eta, gmm=gmm, step_index=STEP, noise=z, components=k)

    compiled = torch.compile(lambda m, x: ref_step_randn(m, x).prev_sample, dynamic=False)
    cases = {
        "op": op,
        "dg.ddim_step": public,
        "reference": reference,
        "compiled_ref": lambda: compiled(m, x),
        "copy": lambda: x.clone(),
    }
    try:
        from diffusers import DDIMScheduler
    except ImportError:
        return cases
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched.set_timesteps(50)
    t = sched.timesteps[10]
    gen = torch.Generator(device).manual_seed(0)
    cases["diffusers"] = lambda: sched.step(m, t, x, eta=eta, generator=gen)
    return cases


def time_case(fn, device: str, min_run_time: float) -> float:
    """Seconds per call: on CPU the median of torch.utils.benchmark's blocked autorange; on CUDA
    :func:`common.cuda_time` (CUDA events over back-to-back calls, no sync per call)."""
    if device == "cuda":
        return cuda_time(fn, min_run_time)
    for _ in range(3):  # warm-up (and compilation)
        fn()
    timer = tbench.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per case")
    p.add_argument("--out", default=None, help="default: benchmarks/results/step_<device>.json")
    args = p.parse_args(argv)
    rows = []
    for shape in SHAPES:
        numel = torch.Size(shape).numel()
        for eta in (0.0, 1.0):
            for name, fn in make_cases(args.device, shape, eta).items():
                sec = time_case(fn, args.device, args.min_run_time)
                moved = (2 if name == "copy" else 3) * 4 * numel
                rows.append(
                    {"shape": list(shape), "eta": eta, "name": name, "ms": sec * 1e3, "GB/s": moved / sec / 1e9}
                )
                print(f"{str(shape):>20} eta={eta:.0f} {name:>13}: {sec * 1e3:9.3f} ms  {moved / sec / 1e9:7.2f} GB/s")
    for row in rows:
        op = next(r for r in rows if r["shape"] == row["shape"] and r["eta"] == row["eta"] and r["name"] == "op")
        row["time_over_op"] = row["ms"] / op["ms"]
    result = {
        "dtype": "float32",
        "gmm": "ortho-vub, K=8",
        "compiled_ref": "torch.compile of reference.ddim_step, noise by torch.randn in the graph, fixed components",
        "bytes_per_element": "12 (read x_t and model output, write x_s)",
        "results": rows,
    }
    print("wrote", write_json(result, args.device, args.out, f"step_{args.device}.json"))


if __name__ == "__main__":
    main()
