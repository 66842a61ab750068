"""Compile-only check of the CUDA sources (csrc/cuda/*.cu) with nvcc against torch's headers.

The CPU torch wheel ships no CUDA libraries, so the CUDA extension cannot be linked on a machine without a
CUDA torch; compiling each .cu to an object file (`nvcc -c`) still catches syntax, type and template errors.
Skipped when nvcc is not found (set CUDA_HOME or put nvcc on PATH). The flags are those setup.py passes,
plus C10_CUDA_NO_CMAKE_CONFIGURE_FILE: the CPU wheel ships c10/cuda and ATen/cuda headers but not the
build-generated c10/cuda/impl/cuda_cmake_macros.h, which only defines C10_CUDA_BUILD_SHARED_LIBS (DLL
exports on Windows). The .cu files include no ATen/cuda header: those pull in cuBLAS / cuSPARSE headers
that a bare CUDA toolkit lacks.
"""

import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch
from torch.utils.cpp_extension import include_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
@pytest.mark.parametrize("source", CU_FILES, ids=os.path.basename)
def test_cu_compiles(source, tmp_path):
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [
        _nvcc(),
        "-c",
        source,
        "-o",
        str(tmp_path / "out.o"),
        "-O3",
        "-std=c++17",
        "--expt-relaxed-constexpr",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "-DTORCH_EXTENSION_NAME=_C",
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        "-Xcompiler",
        "-fPIC",
        "-I",
        sysconfig.get_paths()["include"],
    ]
    for path in include_paths():
        cmd += ["-I", path]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
