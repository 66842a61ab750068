"""Registration of the ``torch.ops.ddimgmm`` operators: loads the C++ library (CPU kernels and the CUDA thin
SVD, built on the LibTorch stable ABI), defines the schemas and registers the CUDA step kernel and the fake
implementations."""

from __future__ import annotations

import torch

#: The oldest torch whose stable ABI the compiled library targets (TORCH_TARGET_VERSION in csrc/stable.h).
MIN_TORCH = (2, 10)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


_NEEDED = f"torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]}"
if _torch_version() < MIN_TORCH:
    raise ImportError(
        f"ddim_gmm_ext needs {_NEEDED} (its compiled kernels use the LibTorch stable ABI of {_NEEDED}); "
        f"found torch {torch.__version__}. Upgrade torch: pip install 'torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}'"
    )
try:
    from .. import _C  # noqa: F401  (runs the kernels' STABLE_TORCH_LIBRARY_IMPL registrations)
except ImportError as e:
    import importlib.util

    _built = importlib.util.find_spec("ddim_gmm_ext._C") is not None
    raise ImportError(
        (
            f"ddim_gmm_ext's compiled extension ddim_gmm_ext._C failed to load with torch {torch.__version__} "
            f"(it needs {_NEEDED}): {e}. Reinstall the wheel for this platform and Python"
            if _built
            else "ddim_gmm_ext's compiled extension ddim_gmm_ext._C is not built. Install the wheel"
        )
        + ", or build from source: `pip install --no-build-isolation -e .` in a source checkout"
        " (or `python setup.py build_ext --inplace`)."
    ) from None
from . import schema  # noqa: E402, F401, I001  (the schemas, before the kernels that register against them)
from . import offset_directions, step, thin_svd  # noqa: E402, F401  (CUDA kernels and fake implementations)

ddimgmm = torch.ops.ddimgmm
