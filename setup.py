"""Builds ddim_gmm_ext._C: the C++ CPU ops always, the CUDA sources only when a CUDA torch and nvcc are
present, or when DDIMGMM_FORCE_CUDA=1 (a CUDA torch whose toolkit was not auto-detected, e.g. in a container
build without a GPU; there the architectures default to sm_80, sm_90 and PTX, or TORCH_CUDA_ARCH_LIST).
CI has a CPU torch, which cannot link CUDA code: it compiles the .cu files with nvcc alone
(tests/test_gpu_compile.py).

The C++ uses only the LibTorch stable ABI (csrc/stable.h sets its target, torch 2.10) and Python's limited API
(3.10), so one built wheel loads in every torch >= 2.10 and every CPython >= 3.10 of its platform:
`python -m build --wheel --no-isolation` (or `pip wheel --no-build-isolation --no-deps .`) builds it against the
installed torch, any torch >= 2.10.

No -std flag is passed: torch's BuildExtension adds the standard its headers need (C++20 from torch 2.12 on,
where C++17 draws warnings and, from 2.14, errors), and nvcc refuses a second -std."""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _want_cuda():
    if os.environ.get("DDIMGMM_FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _default_arch_list():
    # Without a visible GPU torch has no architecture to build for (and fails with an IndexError): build for
    # the targets CI compiles (sm_80, sm_90) and PTX for newer devices, unless the user chose.
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        print("ddim_gmm_ext: no CUDA device visible; building for TORCH_CUDA_ARCH_LIST=8.0;9.0+PTX")


def _extension():
    # -fno-math-errno: sqrt without an errno branch, so that loops calling it vectorise (csrc/cpu/step.cpp);
    # -ffp-contract=off: no FMA contraction, so the ISA clones of a kernel round identically (csrc/cpu/isa.h);
    # -fopenmp-simd: the `omp simd` loops only. Threads come from torch's own pool (torch::stable::parallel_for,
    # torch.get_num_threads() of them), so the library links no OpenMP runtime a user's machine may lack.
    cxx = ["-O3", "-fopenmp-simd" if os.name != "nt" else "/openmp:experimental"] + (
        ["-fno-math-errno", "-ffp-contract=off"] if os.name != "nt" else []
    )
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    if _want_cuda():
        _default_arch_list()
        nvcc = ["-O3", "--expt-relaxed-constexpr"]
        return CUDAExtension(
            "ddim_gmm_ext._C",
            sources + _sources("csrc/cuda/*.cu"),
            extra_compile_args={"cxx": cxx + ["-DDDIMGMM_WITH_CUDA"], "nvcc": nvcc},
            py_limited_api=True,
        )
    # py_limited_api: torch's build adds -DPy_LIMITED_API (CPython 3.10's) and links no torch Python bindings
    return CppExtension("ddim_gmm_ext._C", sources, extra_compile_args={"cxx": cxx}, py_limited_api=True)


setup(
    packages=find_packages(include=["ddim_gmm_ext", "ddim_gmm_ext.*"]) + ["ddim_gmm_ext.triton_kernels"],
    # triton ships a top-level package named `triton_kernels`; ours lives inside ddim_gmm_ext.
    package_dir={"ddim_gmm_ext.triton_kernels": "triton_kernels"},
    package_data={"ddim_gmm_ext": ["py.typed"], "ddim_gmm_ext.quality": ["data/*"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
