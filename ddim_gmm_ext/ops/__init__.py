"""Registration of the ``torch.ops.ddimgmm`` operators: loads the C++ library (schemas and CPU kernels) and
registers the CUDA kernels and fake implementations."""

from __future__ import annotations

import torch

try:
    from .. import _C  # noqa: F401  (runs TORCH_LIBRARY(ddimgmm) and the CPU kernel registrations)
except ImportError as e:
    import importlib.util

    _built = importlib.util.find_spec("ddim_gmm_ext._C") is not None
    raise ImportError(
        (
            "ddim_gmm_ext's compiled extension ddim_gmm_ext._C failed to load: " + str(e)
            if _built
            else "ddim_gmm_ext's compiled extension ddim_gmm_ext._C is not built."
        )
        + " Build it against the torch installed here: `pip install --no-build-isolation -e .` in a source checkout"
        " (or `python setup.py build_ext --inplace`), and rebuild after changing torch."
    ) from None
from . import offset_directions, step, thin_svd  # noqa: F401  (CUDA kernels and fake implementations)

ddimgmm = torch.ops.ddimgmm
