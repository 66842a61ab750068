"""The Triton step kernel against the reference and the C++ kernel: bit-identical components, values to 1e-5.

On CPU the kernel runs under TRITON_INTERPRET=1 in a subprocess of its own (triton reads the flag when the
kernel is decorated, so it cannot be switched on in this process); on CUDA it runs compiled, in process.
"""

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import DEVICES, TOLERANCES

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (prediction_type, gmm variant, guidance_scale, clip, dtype, explicit noise and components)
CASES = [
    (0, None, None, None, torch.float32, False),
    (1, "rand", None, 0.8, torch.float32, False),
    (2, "ortho-vub", 3.0, None, torch.float32, False),
    (3, "ortho", None, None, torch.float64, False),
    (0, "rand", 2.0, 0.8, torch.float16, True),
    (2, None, None, None, torch.bfloat16, True),
]


def check_parity(device: str) -> None:
    """Launch the Triton kernel on ``device`` for every case and compare with the C++ op and the reference."""
    import ddim_gmm_ext as dg
    from ddim_gmm_ext import reference as R
    from ddim_gmm_ext._triton import load_step_launcher

    triton_step = load_step_launcher()

    shape = (3, 5, 11, 13)  # 715 per sample: a partial last block; several blocks per sample
    for pred, variant, w, clip, dtype, explicit in CASES:
        g = torch.Generator().manual_seed(pred)
        x = torch.randn(shape, generator=g).to(dtype)
        m = torch.randn(((2 if w else 1) * shape[0],) + shape[1:], generator=g).to(dtype)
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        coeffs = torch.tensor([0.6, 0.8, 0.8, 0.6, 0.45], dtype=cdt)
        gmm = variant and dg.GMM.create(715, n_components=5, n_steps=2, variant=variant, uniform_priors=False)
        tables = gmm.params(1, x) if gmm else (None, None, None)
        noise = torch.randn(shape, generator=g) if explicit else None
        comps = torch.tensor([4, 0, 2]) if explicit and gmm else None
        args = [m, x, coeffs, *tables, noise, comps, pred, w, clip, True, 2**33 + 5, 7, 1, True]
        cpu = torch.ops.ddimgmm.step(*args)
        moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
        tri = [t.cpu() for t in triton_step(*moved)]
        assert torch.equal(tri[2], cpu[2]), (pred, variant, tri[2], cpu[2])
        atol = max(1e-5, TOLERANCES[dtype][0]) if dtype in (torch.float16, torch.bfloat16) else 1e-5
        for a, b in zip(tri[:2], cpu[:2], strict=False):
            # fp16 / bf16 results may differ by one rounding of the storage dtype
            torch.testing.assert_close(
                a.double(), b.double(), atol=atol, rtol=TOLERANCES[dtype][1] if atol > 1e-5 else 0
            )
        ref = R.step(
            m.double(),
            x.double(),
            *coeffs.tolist(),
            gmm=gmm and gmm.to(dtype=torch.float64),
            step_index=1,
            prediction_type=R.PREDICTION_TYPES[pred],
            guidance_scale=w,
            clip_sample_range=clip,
            use_clipped_model_output=True,
            seed=2**33 + 5,
            sample_offset=7,
            noise=noise,
            components=comps,
        )
        if gmm:
            assert torch.equal(tri[2], ref.components)
        atol, rtol = TOLERANCES[dtype]
        torch.testing.assert_close(tri[0].double(), ref.prev_sample, atol=atol * 4, rtol=rtol * 4)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_matches_cpp_and_reference(device):
    if device == "cuda":
        check_parity("cuda")
        return
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = "from tests.ops.test_step_triton import check_parity; check_parity('cpu')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
