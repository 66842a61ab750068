"""The GPU code compiled for real GPU targets on a machine without a GPU.

Triton: every kernel variant the launcher can produce (its constexprs and the Triton types of the arguments it
really passes, both taken from ``launch_plan``, the function the launcher itself runs) is compiled ahead of
time by Triton's own compiler for sm_90 and sm_80. A variant fails on a compile error, on register spills
(ptxas -v of its PTX) and on approximate instructions in its PTX: the kernels promise correctly rounded
division, square root and libdevice-accurate log / sin / cos. Registers per thread are printed (``-s``) and
recorded as test properties. Skipped where Triton's NVIDIA backend or its ptxas is absent.

CUDA: each ``csrc/cuda/*.cu`` is compiled with nvcc for sm_90 against torch's headers with ``-Xptxas -v``;
it fails on a compile error, on spills and on local memory (a stack frame: arrays the Jacobi loop should keep
in registers). The CPU torch wheel ships no CUDA libraries, so nothing is linked. The flags are those setup.py
passes, plus C10_CUDA_NO_CMAKE_CONFIGURE_FILE: the CPU wheel ships c10/cuda and ATen/cuda headers but not the
build-generated c10/cuda/impl/cuda_cmake_macros.h, which only defines C10_CUDA_BUILD_SHARED_LIBS (DLL exports
on Windows). Skipped where nvcc is not found (set CUDA_HOME or put nvcc on PATH).

The compiles run in parallel with each other and with nvcc (fork workers), so the file takes about as long as
its slowest nvcc call.
"""

from __future__ import annotations

import concurrent.futures
import glob
import multiprocessing
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
import threading

import pytest
import torch

from ddim_gmm_ext._checks import compute_dtype
from ddim_gmm_ext.ops.step import StepArgs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
CAPABILITIES = (90, 80)
# Approximate PTX instructions (div.full is the fast "full range" approximate division). rcp.approx.ftz.f64 is
# not among them: it exists only as the seed of a Newton iteration (libdevice's float64 log / sin / cos); a
# float64 division or reciprocal written in a kernel compiles to div.rn.f64.
APPROX = re.compile(
    r"\b(?:sin|cos|lg2|ex2|sqrt|rsqrt|tanh|div)\.approx[.\w]*|\brcp\.approx(?!\.ftz\.f64)[.\w]*|\bdiv\.full[.\w]*"
)
PTXAS_STATS = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\s*\n.*?Used (\d+) registers"
)


# ---------------------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------------------


def _triton_step_module():
    """triton_kernels/step.py, or None where triton or its NVIDIA backend is missing or the interpreter is on
    (interpreted kernels cannot be compiled)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401

        from ddim_gmm_ext._triton import triton_kernels
    except ImportError:
        return None
    import importlib

    triton_kernels()
    return importlib.import_module("ddim_gmm_ext.triton_kernels.step")


STEP = _triton_step_module()


def _ptxas(capability: int) -> str | None:
    """The ptxas Triton runs for ``capability`` (its bundled one; the API moved between triton versions)."""
    from triton.backends.nvidia import compiler as nv

    try:
        try:
            tool = nv.get_ptxas(capability)
        except TypeError:
            tool = nv.get_ptxas()
        path = getattr(tool, "path", None) or (tool[0] if isinstance(tool, tuple) else tool)
    except Exception:  # noqa: BLE001 (any failure: fall back to the bundled binary's usual place)
        path = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
    return path if path and os.path.exists(path) else None


def _arch(capability: int) -> str:
    from triton.backends.nvidia import compiler as nv

    fn = getattr(nv, "sm_arch_from_capability", None)
    return fn(capability) if fn else f"sm_{capability}" + ("a" if capability >= 90 else "")


def _meta(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def triton_variants() -> dict[str, tuple]:
    """{id: (kernel, signature, constexprs, options)} of every launch the launcher can produce: each sample
    dtype with each model_output dtype it accepts, no GMM / per-coordinate / low-rank GMM, and a per-sample
    size for each block size; for float16 / bfloat16 samples also a multistep history in the compute dtype (a
    history in the sample's dtype, or none, passes the sample's pointer type: the same kernel). Everything else
    (step index as int or tensor, seeds, guidance, clipping, explicit noise / components, prediction type, the
    number of histories, 6 or 8 columns) is a runtime argument: ``test_scalars_keep_the_kernel``
    checks that it never changes a signature."""
    variants = {}
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        cdt = compute_dtype(dtype)
        for m_dtype in dict.fromkeys((dtype, cdt)):
            for h_dtype in dict.fromkeys((dtype, cdt)):
                for gmm in ("none", "diag", "basis"):
                    for block in STEP.BLOCK_SIZES:
                        D = block if block > min(STEP.BLOCK_SIZES) else 1
                        assert STEP.block_config(D)[0] == block
                        history = {}
                        if h_dtype != dtype:
                            history = dict(history0=_meta((2, D), h_dtype), history1=_meta((2, D), h_dtype))
                        for launch in _plan(dtype, m_dtype, gmm, D, **history):
                            sig = STEP.signature(launch)
                            name = launch.kernel.__name__.strip("_")
                            types = ""
                            if "x_ptr" in sig:
                                types = f"x_{sig['x_ptr'][1:]}-m_{sig['m_ptr'][1:]}-h_{sig['hist0_ptr'][1:]}"
                            key = "-".join(filter(None, (name, gmm, types or sig["partial_ptr"][1:], f"B{block}")))
                            variants[key] = (launch.kernel, sig, launch.constexprs, launch.options)
    return variants


def _plan(dtype, m_dtype, gmm, D, **overrides):
    cdt = compute_dtype(dtype)
    B, K, r, S = 2, 3, 2, 4
    tables = dict.fromkeys(("priors", "offsets", "var_offsets", "basis"))
    if gmm != "none":
        tables["priors"] = _meta((S, K), cdt)
        tables["offsets"] = _meta((S, K, D), cdt)
        tables["var_offsets"] = _meta((S, K, r if gmm == "basis" else D), cdt)
        tables["basis"] = _meta((S, r, D), cdt) if gmm == "basis" else None
    args = dict(
        model_output=_meta((B, D), m_dtype),
        sample=_meta((B, D), dtype),
        coeffs=_meta((S, 8) if overrides.get("history0") is not None else (S, 6), cdt),
        step_tensor=None,
        **tables,
        noise=None,
        components=None,
        prediction_type=0,
        guidance_scale=None,
        clip_sample_range=None,
        use_clipped_model_output=False,
        seed=0,
        sample_offset=0,
        step_index=0,
        return_pred_original=True,
    )
    args.update(overrides)
    if args["guidance_scale"] is not None:
        args["model_output"] = _meta((2 * B, D), m_dtype)
    return STEP.launch_plan(StepArgs(**args))[0]


VARIANTS = triton_variants() if STEP is not None else {}
_RESULTS = {}
_RESULTS_LOCK = threading.Lock()


def _compile(job: tuple[str, int]) -> dict:
    """Compile one variant for one capability (in a forked worker); PTX facts and ptxas -v statistics."""
    import triton
    from triton.backends.compiler import GPUTarget

    key, capability = job
    kernel, sig, constexprs, options = VARIANTS[key]
    names = list(sig)
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in names if sig[k].startswith("*")}
    try:
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    except Exception as e:  # noqa: BLE001 (reported by the test)
        return {"error": f"{type(e).__name__}: {e}"}
    ptx = compiled.asm["ptx"]
    result = {"approx": sorted(set(APPROX.findall(ptx)))}
    ptxas = _ptxas(capability)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        fmad = [] if options.get("enable_fp_fusion", True) else ["--fmad=false"]
        cmd = [ptxas, "-v", *fmad, f"--gpu-name={_arch(capability)}", path, "-o", os.path.join(tmp, "k.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True)
    stats = PTXAS_STATS.search(log.stdout + log.stderr)
    if log.returncode or not stats:
        result["error"] = f"ptxas failed: {' '.join(cmd)}\n{log.stdout}{log.stderr}"
    else:
        stack, spill_st, spill_ld, regs = map(int, stats.groups())
        result |= {"registers": regs, "stack": stack, "spill_stores": spill_st, "spill_loads": spill_ld}
    return result


def _compile_all() -> None:
    """Compile every variant for every capability once per session, in parallel."""
    with _RESULTS_LOCK:
        if _RESULTS:
            return
        _nvcc_jobs()  # started first: nvcc's host pass overlaps the Triton compiles
        jobs = [(key, cap) for cap in CAPABILITIES for key in VARIANTS]
        workers = max(1, min(4, (os.cpu_count() or 1)))
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            for job, result in zip(jobs, pool.map(_compile, jobs, chunksize=4), strict=True):
                _RESULTS[job] = result


needs_triton = pytest.mark.skipif(
    STEP is None or _ptxas(90) is None,
    reason="triton with its NVIDIA backend and bundled ptxas is needed (and TRITON_INTERPRET unset)",
)


@needs_triton
@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("key", sorted(VARIANTS))
def test_triton_kernel_compiles(key, capability, record_property):
    # Checked to fail: with the module-global Philox constant restored in the kernel (NameError), with
    # tl.sqrt_rn replaced by tl.sqrt (sqrt.approx.f32) and with tl.div_rn by "/" (div.full.f32).
    _compile_all()
    result = _RESULTS[(key, capability)]
    assert "error" not in result, result["error"]
    record_property(f"registers_sm{capability}_{key}", result["registers"])
    print(f"sm_{capability} {key}: {result['registers']} registers, {result['stack']} B stack")
    assert result["spill_stores"] == 0 and result["spill_loads"] == 0, result
    assert not result["approx"], f"approximate instructions in a correctly rounded kernel: {result['approx']}"


@needs_triton
def test_scalars_keep_the_kernel():
    """Runtime arguments never change the compiled kernel: across extreme seeds, counters, guidance and clip
    values, step as int or tensor, explicit noise / components, the (kernel, signature, constexprs) stay those
    of the default call, and every scalar is one Triton's own binder types as a 32-bit int (no value is
    specialised either: all are in do_not_specialize)."""
    # Checked to fail with the seed words passed unsigned (seed 2**64 - 1 -> i64) and with "K" removed from
    # do_not_specialize.
    import triton

    mangle = getattr(triton.runtime.jit, "mangle_type", None)
    step_tensor = torch.empty((), dtype=torch.int64, device="meta")
    for gmm in ("none", "diag", "basis"):
        base = [(lz.kernel, STEP.signature(lz), lz.constexprs) for lz in _plan(torch.float32, torch.float32, gmm, 700)]
        for overrides in (
            dict(seed=2**64 - 1 - 2**64, sample_offset=2**32 - 3, step_index=2**32 - 1),
            dict(seed=2**63 + 12345 - 2**64, step_tensor=step_tensor),
            dict(seed=2**31, guidance_scale=1.1, clip_sample_range=0.8, use_clipped_model_output=True),
            dict(guidance_scale=-4.2, prediction_type=2, return_pred_original=False, seed=1),
            dict(noise=_meta((2, 700), torch.float32), prediction_type=3, step_index=1, sample_offset=1),
            dict(history0=_meta((2, 700), torch.float32), history1=_meta((2, 700), torch.float32)),
            dict(history0=_meta((2, 700), torch.float32), step_tensor=step_tensor),
        ):
            if gmm != "none":
                overrides = overrides | dict(components=_meta((2,), torch.int64))
            launches = _plan(torch.float32, torch.float32, gmm, 700, **overrides)
            assert [(lz.kernel, STEP.signature(lz), lz.constexprs) for lz in launches] == base, overrides
            for launch in launches:
                unspecialised = {p.name: p.do_not_specialize for p in launch.kernel.params}
                for name, value in launch.args.items():
                    if not isinstance(value, torch.Tensor):
                        assert unspecialised[name], name
                        if mangle is not None:
                            assert mangle(value) == "i32", (name, value)


# ---------------------------------------------------------------------------------------------------------
# nvcc
# ---------------------------------------------------------------------------------------------------------


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _torch_cxx_std() -> str:
    """The C++ standard torch's BuildExtension adds when setup.py passes none (c++17 before torch 2.12)."""
    import inspect

    import torch.utils.cpp_extension as cpp_extension

    found = re.findall(r"c\+\+(\d\d)", inspect.getsource(cpp_extension))
    return f"c++{max(found, default='17')}"


def _nvcc_command(source: str, out: str) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [_nvcc(), "-c", source, "-o", out, "-O3", f"-std={_torch_cxx_std()}", "--expt-relaxed-constexpr"]
    cmd += ["-arch=sm_90", "-Xptxas", "-v", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_EXTENSION_NAME=_C"]
    cmd += ["-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-Xcompiler", "-fPIC", "-I", sysconfig.get_paths()["include"]]
    for path in include_paths():
        cmd += ["-I", path]
    return cmd


_NVCC: dict[str, subprocess.Popen] = {}


def _nvcc_jobs() -> dict[str, subprocess.Popen]:
    """nvcc of every .cu file, started once per session in the background (nothing where nvcc is absent)."""
    if not _NVCC and _nvcc() is not None:
        out = tempfile.mkdtemp(prefix="nvcc_")
        for source in CU_FILES:
            cmd = _nvcc_command(source, os.path.join(out, os.path.basename(source) + ".o"))
            _NVCC[source] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return _NVCC


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
@pytest.mark.parametrize("source", CU_FILES, ids=os.path.basename)
def test_cu_compiles_for_sm90_without_spills(source, record_property):
    # Checked to fail with a 64-entry per-thread array indexed by a runtime value added to a kernel (stack frame).
    proc = _nvcc_jobs()[source]
    log = proc.communicate()[0]
    assert proc.returncode == 0, log
    # Checked to fail with setup.py's former -std=c++17 (torch 2.13's headers warn under C++17).
    warnings = [line for line in log.splitlines() if re.search(r"\bwarning\b", line, re.IGNORECASE)]
    assert not warnings, "\n".join(warnings)
    kernels = re.findall(r"Compiling entry function '(\w+)' for 'sm_90'", log)
    stats = PTXAS_STATS.findall(log)
    assert kernels and len(stats) == len(kernels), log
    for kernel, (stack, spill_st, spill_ld, regs) in zip(kernels, stats, strict=True):
        record_property(f"registers_{kernel}", int(regs))
        print(f"{os.path.basename(source)} {kernel}: {regs} registers")
        assert (int(stack), int(spill_st), int(spill_ld)) == (0, 0, 0), f"{kernel}: local memory or spills\n{log}"
