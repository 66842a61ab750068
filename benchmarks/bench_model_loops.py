"""pytest-benchmark: whole DDIM sampling loops with the package's shipped networks (the digits MLP, the
Fashion-MNIST U-Net), ours (DDIMGMMScheduler) against diffusers' DDIMScheduler on the same network, schedule and
x_T, so a user sees what the fused step is worth next to a real model:

pytest benchmarks/bench_model_loops.py --benchmark-group-by=param:model,param:steps

``model_loop_results.py`` runs the same cases interleaved and writes each loop's time with the model's share of
it (benchmarks/results/model_loops_cpu.json); the regression gate (gate.py) runs two of them.
"""

from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("diffusers")

#: model -> (batch, per-sample shape): the digits MLP on flat 8x8 images, the U-Net on 1x28x28 images
MODELS = {"digits": (256, (64,)), "fashion": (16, (1, 28, 28))}
STEPS = (5, 20, 50)
#: ours: GMM off at eta 0 (the step diffusers takes), and ORTHO-VUB K = 8 at eta 1 (no diffusers counterpart)
VARIANTS = {"ours": (None, 0.0), "diffusers": (None, 0.0), "ours ORTHO-VUB eta 1": ("ortho-vub", 1.0)}


def load_model(model: str) -> torch.nn.Module:
    """The shipped eps network (sha256-checked), float32, eval mode, no parameter gradients."""
    if model == "digits":
        from ddim_gmm_ext.quality import digits

        return digits.load("eps")
    from ddim_gmm_ext.quality import fashion

    return fashion.load("eps")


def _scheduler(variant: str):
    from diffusers import DDIMScheduler

    from ddim_gmm_ext.diffusers import DDIMGMMScheduler
    from ddim_gmm_ext.quality.sampling import BETAS

    gmm, _ = VARIANTS[variant]
    config = dict(**BETAS, clip_sample=False)
    if variant == "diffusers":
        return DDIMScheduler(**config)
    return DDIMGMMScheduler(**config, gmm_variant=gmm, gmm_n_components=8, seed=0)


def lone_step(model: str, variant: str, steps: int):
    """A zero-argument call of the loop's middle scheduler step alone, on the model's sample shape (the same
    arguments every call), to set against its share of the loop."""
    batch, shape = MODELS[model]
    s = _scheduler(variant)
    s.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn((batch, *shape), generator=g), torch.randn((batch, *shape), generator=g)
    t = s.timesteps[steps // 2]
    eta = VARIANTS[variant][1]

    def step():
        with torch.no_grad():
            return s.step(eps, t, x, eta=eta)

    return step


def model_loop(model: str, variant: str, steps: int, net: torch.nn.Module | None = None, timer: dict | None = None):
    """A zero-argument call running one whole sampling loop under no_grad: set_timesteps, then ``steps`` x (the
    network at the step's timestep, the scheduler step), from a fixed x_T on the network's training schedule.

    ``timer``, if given, accumulates the CPU seconds of this thread spent in the network (``timer["model"]``) and
    in the whole loop (``timer["loop"]``): the rest of the loop is the sampler's (set_timesteps, the step, the loop
    itself). Thread CPU time, so that time spent descheduled on a shared machine is no one's share; with one torch
    thread all of the loop's work is on this thread."""
    net = load_model(model) if net is None else net
    batch, shape = MODELS[model]
    eta = VARIANTS[variant][1]
    s = _scheduler(variant)
    x_T = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(0))
    t_batch = torch.empty(batch, dtype=torch.int64)
    clock = time.thread_time

    def loop():
        start = clock()
        in_model = 0.0
        with torch.no_grad():
            s.set_timesteps(steps)
            x = x_T
            for t in s.timesteps:
                m0 = clock()
                eps = net(x, t_batch.fill_(t))
                in_model += clock() - m0
                x = s.step(eps, t, x, eta=eta).prev_sample
        if timer is not None:
            timer["model"] = timer.get("model", 0.0) + in_model
            timer["loop"] = timer.get("loop", 0.0) + clock() - start
        return x

    return loop


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("model", list(MODELS))
def test_model_loop(benchmark, model, variant, steps):
    loop = model_loop(model, variant, steps)
    loop()
    benchmark.pedantic(loop, rounds=5, warmup_rounds=1)
