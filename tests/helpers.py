"""Shared test helpers: devices to run on and one tolerance table per dtype (vs a float64 CPU reference)."""

import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# (atol, rtol) for results computed in `dtype` against the float64 reference. fp16 / bf16 inputs are
# computed in float32; the tolerance covers the final rounding to the storage dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0):
    """Compare with the tolerance of ``dtype`` (default: actual.dtype), widened by ``scale``."""
    atol, rtol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(
        actual.to("cpu", torch.float64), expected.to("cpu", torch.float64), atol=atol * scale, rtol=rtol * scale
    )
