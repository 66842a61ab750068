"""Import of the Triton kernels as ``ddim_gmm_ext.triton_kernels``.

The kernels live in the top-level ``triton_kernels/`` folder (a top-level package of that name would clash
with triton's own ``triton_kernels``). An install maps the folder into the package (setup.py); in a source
checkout (editable installs included) the checkout's folder is loaded under the same name, so a work tree
always runs its own kernels."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

_NAME = "ddim_gmm_ext.triton_kernels"
_SOURCE = Path(__file__).resolve().parent.parent / "triton_kernels"


def triton_kernels():
    """The ``ddim_gmm_ext.triton_kernels`` package (importing it needs triton)."""
    if _NAME in sys.modules:
        return sys.modules[_NAME]
    if not (_SOURCE / "__init__.py").is_file():
        return importlib.import_module(_NAME)  # installed: mapped into the package by setup.py
    spec = importlib.util.spec_from_file_location(
        _NAME, _SOURCE / "__init__.py", submodule_search_locations=[str(_SOURCE)]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {_NAME} from {_SOURCE}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    spec.loader.exec_module(module)
    return module


def load_step_launcher():
    """The launcher of the Triton step kernel (``triton_kernels/step.py``)."""
    triton_kernels()
    return importlib.import_module(f"{_NAME}.step").step
