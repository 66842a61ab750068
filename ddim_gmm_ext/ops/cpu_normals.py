"""The CPU step kernel's paths for its float32 normals (csrc/cpu/normals.h: AVX-512, AVX2 or the portable loop,
the same bits on each), reached through ctypes for tests and benchmarks: which path runs, switching it, and the
normals or the bare Philox loop of one path.

The environment variable DDIMGMM_CPU_NORMALS (portable, avx2, avx512) picks the path before the first noisy step;
:func:`use_path` switches it in a running process."""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator

import torch

PATHS = ("portable", "avx2", "avx512")


@functools.cache
def _lib() -> ctypes.CDLL:
    from .. import _C

    lib = ctypes.CDLL(_C.__file__)
    lib.ddimgmm_cpu_normals.restype = ctypes.c_int64
    lib.ddimgmm_cpu_normals.argtypes = [ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p, ctypes.c_uint32]
    lib.ddimgmm_cpu_normals.argtypes += [ctypes.c_int64] + [ctypes.c_uint32] * 5
    lib.ddimgmm_cpu_normals_path.restype = ctypes.c_int32
    lib.ddimgmm_cpu_normals_path.argtypes = [ctypes.c_int32]
    return lib


def path() -> str:
    """The path the step kernel's normals take in this process."""
    return PATHS[_lib().ddimgmm_cpu_normals_path(-1)]


def supported(name: str) -> bool:
    """Whether this CPU runs path ``name``."""
    return _lib().ddimgmm_cpu_normals(PATHS.index(name), 1, None, 0, 0, 0, 0, 0, 0, 0) >= 0


@contextlib.contextmanager
def use_path(name: str) -> Iterator[str]:
    """Within the block the step kernel draws its normals through path ``name`` (or, where the CPU lacks it, the
    widest below it: the name of the path taken is yielded); the previous path afterwards."""
    lib = _lib()
    before = lib.ddimgmm_cpu_normals_path(-1)
    try:
        yield PATHS[lib.ddimgmm_cpu_normals_path(PATHS.index(name))]
    finally:
        lib.ddimgmm_cpu_normals_path(before)


def _key(seed: int) -> tuple[int, int]:
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF


def normals(name: str, g0: int, groups: int, c1: int, c2: int, c3: int, seed: int, out: torch.Tensor | None = None):
    """float32 [4 groups]: lane l of the normals of philox(g0 + g, c1, c2, c3) under ``seed`` at 4 g + l, through
    path ``name`` (a ValueError where this CPU lacks it); into ``out`` (contiguous float32) when given."""
    z = torch.empty(4 * groups) if out is None else out
    if z.dtype != torch.float32 or not z.is_contiguous() or z.numel() < 4 * groups:
        raise ValueError(f"out must be a contiguous float32 tensor of at least {4 * groups} elements")
    if _lib().ddimgmm_cpu_normals(PATHS.index(name), 0, z.data_ptr(), g0, groups, c1, c2, c3, *_key(seed)) < 0:
        raise ValueError(f"this CPU has no {name} path")
    return z


def philox_bound(name: str, groups: int, seed: int) -> int:
    """The bare Philox loop of path ``name`` over counters 0 .. groups - 1 (no Box-Muller, no store): the xor of
    its words, the bound of :func:`normals`' speed."""
    value = _lib().ddimgmm_cpu_normals(PATHS.index(name), 1, None, 0, groups, 0, 0, 0, *_key(seed))
    if value < 0:
        raise ValueError(f"this CPU has no {name} path")
    return int(value)
