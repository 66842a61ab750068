"""Registration of the ``torch.ops.ddimgmm`` operators: loads the C++ library (schemas and CPU kernels) and
registers the CUDA kernels and fake implementations."""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (runs TORCH_LIBRARY(ddimgmm) and the CPU kernel registrations)
from . import offset_directions, step, thin_svd  # noqa: F401  (CUDA kernels and fake implementations)

ddimgmm = torch.ops.ddimgmm
