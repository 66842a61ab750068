"""A whole sampling loop on CUDA: one kernel launch per scheduler step, no host sync, CUDA-graph capture.

These need a GPU and skip without one; they run in the GPU verification command. What can be checked on a CPU
(one compile for a whole loop, the step index taken from the device) is in test_diffusers_scheduler.py.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, UNet2DModel  # noqa: E402

from ddim_gmm_ext.diffusers import DDIMGMMScheduler  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

STEPS = 7  # does not divide 1000


def _unet() -> UNet2DModel:
    torch.manual_seed(0)
    return (
        UNet2DModel(
            sample_size=8,
            in_channels=3,
            out_channels=3,
            block_out_channels=(8, 16),
            norm_num_groups=4,
            layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
        )
        .cuda()
        .eval()
    )


def _scheduler(gmm_variant, cls=DDIMGMMScheduler):
    kwargs = dict(gmm_variant=gmm_variant, gmm_n_components=4, seed=3) if cls is DDIMGMMScheduler else {}
    s = cls(clip_sample=False, **kwargs)
    s.set_timesteps(STEPS, device="cuda")
    return s


def _loop(unet, scheduler, x, eta):
    for t in scheduler.timesteps:
        with torch.no_grad():
            x = scheduler.step(unet(x, t).sample, t, x, eta=eta).prev_sample
    return x


@pytest.mark.parametrize("gmm_variant", [None, "ortho-vub"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_one_kernel_launch_per_step(gmm_variant, eta):
    # Counts CUDA kernels (not memcpys) launched by scheduler.step alone. Fails if the step gathers its row,
    # its index or its GMM set with separate torch ops (checked by reverting to the host-row path).
    s = _scheduler(gmm_variant)
    x = torch.randn(2, 3, 8, 8, device="cuda")
    m = torch.randn_like(x)
    t = s.timesteps[3]
    s.step(m, t, x, eta=eta)  # warm up: GMM tables built, Triton kernel compiled
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        s.step(m, t, x, eta=eta)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "Memcpy" not in e.name]
    assert len(kernels) == 1, [e.name for e in kernels]


@pytest.mark.parametrize("gmm_variant", [None, "ortho"])
def test_sampling_never_syncs(gmm_variant):
    # set_sync_debug_mode("error") raises on any device-to-host synchronisation inside the loop.
    unet, x = _unet(), torch.randn(2, 3, 8, 8, device="cuda")
    s = _scheduler(gmm_variant)
    _loop(unet, s, x, 1.0)  # first run builds tables and compiles kernels (allowed to sync)
    s.set_timesteps(STEPS, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        _loop(unet, s, x, 1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("gmm_variant", [None, "ortho-vub"])
def test_cuda_graph_replay_equals_eager(gmm_variant):
    # The whole N-step loop (UNet + scheduler) captured once and replayed gives the eager samples: nothing about
    # the step number is read on the host during capture. Fails if the step index were a host counter (every
    # replayed step would use the captured step's row).
    unet = _unet()
    x0 = torch.randn(2, 3, 8, 8, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    eager = _loop(unet, _scheduler(gmm_variant), x0.clone(), 1.0)

    s = _scheduler(gmm_variant)
    static_x = x0.clone()
    _loop(unet, s, static_x.clone(), 1.0)  # warm up on a side stream as CUDA graphs require
    s.set_timesteps(STEPS, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _loop(unet, s, static_x.clone(), 1.0)
    torch.cuda.current_stream().wait_stream(side)
    s.set_timesteps(STEPS, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _loop(unet, s, static_x, 1.0)
    graph.replay()
    assert_close(static_out, eager, kind="f32")
    static_x.copy_(x0)
    graph.replay()  # replays are repeatable: the same seed gives the same samples
    assert_close(static_out, eager, kind="f32")


def test_diffusers_reference_loop_matches_with_gmm_off():
    # GMM off, eta 0: our loop equals diffusers' DDIMScheduler loop on the device (the parity the CPU tests
    # check, here through the Triton kernel).
    unet = _unet()
    x = torch.randn(2, 3, 8, 8, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    ours = _loop(unet, _scheduler(None), x.clone(), 0.0)
    stock = _loop(unet, _scheduler(None, DDIMScheduler), x.clone(), 0.0)
    assert_close(ours, stock, kind="f32")
