"""k-diffusion's own sampling module (the installed package's k_diffusion/sampling.py), loaded without
importing the package: ``import k_diffusion`` pulls in torchvision and its training utilities, which do not
install beside every torch. The module needs only ``utils.append_dims`` from its package; a stand-in package
provides that, and everything else is k-diffusion's code as installed."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types

import pytest


def load_sampling():
    """k_diffusion.sampling, or skip the test when k-diffusion (or a dependency of sampling.py) is absent."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion torchdiffeq torchsde)")
    for dependency in ("scipy", "torchdiffeq", "torchsde", "tqdm"):
        pytest.importorskip(dependency)
    name = "_kdiffusion_upstream"
    if f"{name}.sampling" in sys.modules:
        return sys.modules[f"{name}.sampling"]
    package = types.ModuleType(name)
    package.__path__ = []
    utils = types.ModuleType(f"{name}.utils")

    def append_dims(x, target_dims):
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims
    package.utils = utils
    sys.modules[name], sys.modules[f"{name}.utils"] = package, utils
    path = os.path.join(spec.submodule_search_locations[0], "sampling.py")
    loader = importlib.machinery.SourceFileLoader(f"{name}.sampling", path)
    module_spec = importlib.util.spec_from_loader(f"{name}.sampling", loader)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[f"{name}.sampling"] = module
    loader.exec_module(module)
    return module


def load_external():
    """k_diffusion.external (its model wrappers: DiscreteEpsDDPMDenoiser, DiscreteVDDPMDenoiser, ...) beside
    :func:`load_sampling`'s module, as installed."""
    sampling = load_sampling()
    name = sampling.__name__.rpartition(".")[0]
    if f"{name}.external" not in sys.modules:
        path = os.path.join(os.path.dirname(sampling.__file__), "external.py")
        loader = importlib.machinery.SourceFileLoader(f"{name}.external", path)
        module = importlib.util.module_from_spec(importlib.util.spec_from_loader(f"{name}.external", loader))
        sys.modules[module.__name__] = module
        loader.exec_module(module)
    return sys.modules[f"{name}.external"]
