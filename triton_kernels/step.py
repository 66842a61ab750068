"""Triton kernels of ``ddimgmm::step`` and their launcher.

Semantics are those of the ``ddimgmm::step`` schema (ops/schema.py); the CPU twin is ``csrc/cpu/step.cpp`` and
both draw the same random stream (Philox4x32-10 counters as in ``reference.py``), so a seed gives the same
samples on every device to float32 rounding.

Numerics: every division is correctly rounded (``div.rn``), every square root too (``sqrt.rn``), normals use
libdevice's log / sin / cos (cospi / sinpi in float64; no ``*.approx`` instruction), products are never
contracted into fma (``enable_fp_fusion=False``: c^2 - g^2 v = 0 must stay 0, not the rounding error of one of
its products) and max(., 0) propagates NaN as torch.clamp does.

No recompilation between calls: every scalar that changes from call to call (seed words, counters, the step
index, the bit words of guidance and clip, sizes) is unspecialised and passed as a 32-bit word (values
>= 2^31 as their two's-complement bit pattern), so its Triton type is always ``i32``. Only the dtypes, the GMM
mode and the block size select a kernel: :func:`launch_plan` lists them and ``tests/test_gpu_compile.py``
compiles every one ahead of time from the same plan.
"""

from __future__ import annotations

import math
import os
import struct
from typing import TYPE_CHECKING, NamedTuple

import torch
import triton
import triton.language as tl

from .._checks import compute_dtype

if TYPE_CHECKING:
    from ..ops.step import StepArgs

try:  # dispatching module (triton >= 3.0); older layouts kept the CUDA one only
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - depends on the installed triton
    from triton.language.extra.cuda import libdevice

# Read at import, as triton reads it when decorating: the interpreter runs the kernel in numpy on the CPU.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INT32_MAX = 2**31 - 1
# GMM modes (the MODE constexpr): none, per-coordinate variance offsets, low-rank basis ("ortho-lr").
MODE_NONE, MODE_DIAG, MODE_BASIS = 0, 1, 2
# Partial projections of one sample are summed in chunks of this many blocks (a fixed, deterministic order).
_PARTIAL_CHUNK = 32


# ---------------------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of uint32 counters under the key (k0, k1); reference.philox4x32."""
    for _ in tl.static_range(10):
        _c0, _c2 = c0, c2
        c0 = tl.umulhi(_c2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(_c0, 0xD2511F53) ^ c3 ^ k1
        c1 = _c2 * 0xCD9E8D57
        c3 = _c0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _sqrt(x, F64: tl.constexpr):
    """Correctly rounded sqrt (float32 tl.sqrt may lower to sqrt.approx; float64 sqrt is always rounded)."""
    if F64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _div(x, y, F64: tl.constexpr):
    """Correctly rounded x / y (float32 ``/`` lowers to the approximate div.full.f32)."""
    if F64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit
def _relu_nan(x):
    """max(x, 0) that keeps NaN (torch.clamp(min=0) semantics; a plain max.f32 returns 0 for NaN)."""
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _box_muller(wa, wb, F64: tl.constexpr, LIBDEVICE: tl.constexpr):
    """Two normals from two uint32 words, the reference's formula in the compute dtype:
    u1 = ((wa >> 8) + 1) 2^-24, u2 = (wb >> 8) 2^-24, r = sqrt(-2 log u1), th = 2 pi (u2 - 1/2),
    (r cos th, r sin th). libdevice keeps log / sin / cos within ~1 ulp over the whole range as on the CPU
    (tl.log / tl.cos lower to lg2.approx / cos.approx); the interpreter has no libdevice and uses numpy's.
    Compiled float64 takes cospi / sinpi of 2 (u2 - 1/2) (exact): the same angle, unrounded, within a few
    1e-16 of cos th / sin th. libdevice's float64 cos / sin call a Payne-Hanek slow path (never taken here),
    and ptxas spilled registers around those calls (triton 3.6, sm_80 and sm_90)."""
    dt = tl.float64 if F64 else tl.float32
    u1 = ((wa >> 8) + 1).to(dt) * 5.9604644775390625e-08  # 2^-24
    v = (wb >> 8).to(dt) * 5.9604644775390625e-08 - 0.5  # u2 - 1/2, exact
    th = 6.283185307179586 * v
    if LIBDEVICE:
        r = _sqrt(-2.0 * libdevice.log(u1), F64)
        if F64:
            return r * libdevice.cospi(2.0 * v), r * libdevice.sinpi(2.0 * v)
        return r * libdevice.cos(th), r * libdevice.sin(th)
    else:
        r = _sqrt(-2.0 * tl.log(u1), F64)
        return r * tl.cos(th), r * tl.sin(th)


@triton.jit
def _normals(blk, n, step, k0, k1, F64: tl.constexpr, LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr):
    """z[j] for the BLOCK elements j = blk * BLOCK + [0, BLOCK) of global sample n at Philox step ``step``:
    lane j % 4 of Philox(j // 4, n, step, NOISE = 0)."""
    grp = (blk * (BLOCK // 4) + tl.arange(0, BLOCK // 4)).to(tl.uint32)
    zero = grp * 0
    w0, w1, w2, w3 = _philox4x32_10(grp, zero + n, zero + step, zero, k0, k1)
    z0, z1 = _box_muller(w0, w1, F64, LIBDEVICE)
    z2, z3 = _box_muller(w2, w3, F64, LIBDEVICE)
    # interleave the lanes: z[4 g + l] = z_l[g]
    return tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [BLOCK])


@triton.jit
def _and(block_mask, flag):
    """block_mask & scalar flag. (``&`` of a block and a scalar gives the interpreter a broadcast view that its
    masked load rejects; a select is the same instruction when compiled.)"""
    return tl.where(flag, block_mask, False)


@triton.jit
def _u32(word):
    """An i32 argument holding a 32-bit pattern, as uint32."""
    return word.to(tl.uint32, bitcast=True)


@triton.jit
def _f64(lo, hi):
    """The float64 whose bit pattern has the 32-bit words (lo, hi) (i32 arguments: no float64 scalar type)."""
    return ((_u32(hi).to(tl.uint64) << 32) | _u32(lo).to(tl.uint64)).to(tl.float64, bitcast=True)


@triton.jit
def _step_index(step_ptr, step_word, from_tensor, n_rows, n_sets):
    """(i, ok): the step index (int64) from the 0-d device tensor when ``from_tensor`` else from the host word,
    and whether it is a valid Philox counter (0 <= i < 2^32), a row of the coefficient table (``n_rows`` > 0
    rows; 0: one row used as is) and a GMM parameter set of stacked tables (``n_sets`` >= 1 sets, always
    range-checked; 0: one shared set given unstacked)."""
    if from_tensor != 0:  # noqa: SIM108 (a ternary evaluates both sides: it would load a null pointer)
        i = tl.load(step_ptr).to(tl.int64)
    else:
        i = _u32(step_word).to(tl.int64)
    ok = (i >= 0) & (i < 4294967296)  # _checks.MAX_INDEX, as a literal in device code
    ok = ok & ((n_rows == 0) | (i < n_rows)) & ((n_sets == 0) | (i < n_sets))
    return i, ok


@triton.jit
def _component(comps_in_ptr, priors_ptr, b, n, step, k0, k1, K, comps_given, ok, F64: tl.constexpr):
    """k (int64 scalar) of sample b: ``components[b]`` when given, else the inverse CDF of the priors at
    u = (word 0 of Philox(0, n, step, COMPONENT = 1) >> 8) 2^-24, the cdf accumulated in float64 and rounded
    to the compute dtype (as torch.cumsum on the CPU). Nothing is read when the step is invalid."""
    cdt = tl.float64 if F64 else tl.float32
    k = tl.zeros([], dtype=tl.int64)
    if comps_given != 0:
        k = tl.load(comps_in_ptr + b, mask=ok, other=0)
    else:
        wc, _, _, _ = _philox4x32_10(n * 0, n, step, n * 0 + 1, k0, k1)
        u = (wc >> 8).to(cdt) * 5.9604644775390625e-08
        cum = tl.zeros([], dtype=tl.float64)
        for t in range(K - 1):
            cum += tl.load(priors_ptr + t, mask=ok, other=0.0).to(tl.float64)
            k += (u >= cum.to(cdt)).to(tl.int64)
    return k


# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------

# Every scalar may change between calls: specialising on its value (== 1, divisibility by 16) would compile a
# new kernel mid-run (and fail inside CUDA-graph capture).
_SCALARS = [
    "B",
    "D",
    "K",
    "Dv",
    "n_blocks",
    "n_rows",
    "n_cols",
    "n_sets",
    "n_hist",
    "pred",
    "guided",
    "rederive",
    "write_x0",
    "noise_given",
    "comps_given",
    "from_tensor",
    "step_word",
    "seed_lo",
    "seed_hi",
    "sample_offset",
    "w_lo",
    "w_hi",
    "clip_lo",
    "clip_hi",
]
_PROJECT_SCALARS = ["D", "Dv", "n_blocks", "n_rows", "n_sets", "noise_given", "from_tensor", "step_word"]
_PROJECT_SCALARS += ["seed_lo", "seed_hi", "sample_offset"]


@triton.jit(do_not_specialize=_PROJECT_SCALARS)
def _project_kernel(
    basis_ptr,
    noise_ptr,
    step_ptr,
    partial_ptr,
    D,
    Dv,
    n_blocks,
    n_rows,
    n_sets,
    noise_given,
    from_tensor,
    step_word,
    seed_lo,
    seed_hi,
    sample_offset,
    F64: tl.constexpr,
    LIBDEVICE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """First pass of the low-rank ("ortho-lr") GMM step: partial projections of the noise on the basis.

    One program = BLOCK elements of sample b (program id = b * n_blocks + blk):
        partial[b, i, blk] = sum_{j in block} w_i[j] z[b, j]      for i < Dv,
    W = basis[set] [Dv, D] (compute dtype), z the explicit noise [B, D] or the Philox normals of
    :func:`_normals`, partial [B, Dv, n_blocks] in the compute dtype. :func:`_step_kernel` sums the partials in
    a fixed order, so the projection p[b, i] = w_i . z is deterministic.
    """
    cdt = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0)
    b = (pid // n_blocks).to(tl.int64)
    blk = pid % n_blocks
    j = blk * BLOCK + tl.arange(0, BLOCK)
    inside = j < D
    i, ok = _step_index(step_ptr, step_word, from_tensor, n_rows, n_sets)
    s = tl.where(ok & (n_sets > 0), i, 0)
    if noise_given != 0:
        z = tl.load(noise_ptr + b * D + j, mask=inside, other=0.0).to(cdt)
    else:
        n = _u32(sample_offset) + b.to(tl.uint32)
        z = _normals(blk, n, i.to(tl.uint32), _u32(seed_lo), _u32(seed_hi), F64, LIBDEVICE, BLOCK)
        z = tl.where(inside, z, 0.0)
    w_set = basis_ptr + s * Dv * D
    out = partial_ptr + b * Dv * n_blocks + blk
    for r in range(Dv):
        w = tl.load(w_set + r * D + j, mask=_and(inside, ok), other=0.0)
        tl.store(out + r * n_blocks, tl.sum(w * z, axis=0))


@triton.jit(do_not_specialize=_SCALARS)
def _step_kernel(
    x_ptr,
    m_ptr,
    coeffs_ptr,
    step_ptr,
    priors_ptr,
    offsets_ptr,
    var_ptr,
    basis_ptr,
    partial_ptr,
    noise_ptr,
    comps_in_ptr,
    hist0_ptr,
    hist1_ptr,
    out_ptr,
    x0_ptr,
    comps_out_ptr,
    B,
    D,
    K,
    Dv,
    n_blocks,
    n_rows,
    n_cols,
    n_sets,
    n_hist,
    pred,
    guided,
    rederive,
    write_x0,
    noise_given,
    comps_given,
    from_tensor,
    step_word,
    seed_lo,
    seed_hi,
    sample_offset,
    w_lo,
    w_hi,
    clip_lo,
    clip_hi,
    MODE: tl.constexpr,
    F64: tl.constexpr,
    LIBDEVICE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program = BLOCK elements of one sample b (program id = b * n_blocks + blk).

    x [B, D], m [B, D] or [2B, D] (uncond rows first), out / x0 [B, D] in their storage dtypes; coeffs [n_cols]
    or [S, n_cols] rows (a_t, b_t, A, B, c, g[, H1, H2]), n_cols 6 or 8; the first ``n_hist`` of hist0 / hist1
    [B, D] (one storage dtype); priors [(S_g,) K], offsets [(S_g,) K, D], var_offsets [(S_g,) K, Dv],
    basis [(S_g,) Dv, D], noise [B, D] in the compute dtype; components [B] int64; step index i from the 0-d
    int64 ``step_ptr`` (``from_tensor``) or the host word ``step_word``.

        m    = m_u + w (m_c - m_u)                                  (guided)
        x0, eps from (x, m) by ``pred``:  0 epsilon (x - b_t m) / a_t, m;  1 sample m, (x - a_t m) / b_t;
             2 v_prediction, n^2 = a_t^2 + b_t^2: (a_t x - b_t n m) / n^2, (b_t x + a_t n m) / n^2;
             3 flow x - b_t m, x + a_t m
        x0   = clamp(x0, -r, r) (r = inf without clipping); eps = (x - a_t x0) / b_t  (rederive)
        mean = A x0 + B eps + H1 h1 + H2 h2          (h_j from hist{j-1} for j <= n_hist; H = 0 for 6 columns)
        MODE 0:  x_s = mean + c z
        MODE 1:  x_s = mean + g delta_k + sqrt(max(c^2 - g^2 v_k[d], 0)) z          (v_k[d] = 0 for d >= Dv)
        MODE 2:  x_s = mean + g delta_k + c z + sum_i (sqrt(max(c^2 - g^2 v_k[i], 0)) - c) p_i w_i,
                 p_i = w_i . z summed from the partials of :func:`_project_kernel`

    z[n, j] as in :func:`_normals` with n = sample_offset + b, k as in :func:`_component`. Invalid step index
    (see :func:`_step_index`): prev_sample and x0 NaN, components -1, nothing read from the tables. An
    explicit component outside [0, K): NaN for its sample, nothing read out of bounds. A row with H_j != 0 and
    j > n_hist (a history term the caller did not pass): prev_sample NaN (the row is read here, not on the host).
    """
    cdt = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0)
    b = (pid // n_blocks).to(tl.int64)
    blk = pid % n_blocks
    j = blk * BLOCK + tl.arange(0, BLOCK)
    inside = j < D
    i, ok = _step_index(step_ptr, step_word, from_tensor, n_rows, n_sets)
    s = tl.where(ok & (n_sets > 0), i, 0)
    step = i.to(tl.uint32)
    k0 = _u32(seed_lo)
    k1 = _u32(seed_hi)
    n = _u32(sample_offset) + b.to(tl.uint32)

    row = coeffs_ptr + tl.where(ok & (n_rows > 0), i, 0) * n_cols
    a_t = tl.load(row + 0, mask=ok, other=float("nan"))
    b_t = tl.load(row + 1, mask=ok, other=float("nan"))
    c_x0 = tl.load(row + 2, mask=ok, other=float("nan"))
    c_eps = tl.load(row + 3, mask=ok, other=float("nan"))
    c = tl.load(row + 4, mask=ok, other=float("nan"))
    g = tl.load(row + 5, mask=ok, other=float("nan"))

    x = tl.load(x_ptr + b * D + j, mask=inside, other=0.0).to(cdt)
    m = tl.load(m_ptr + (b + guided * B) * D + j, mask=inside, other=0.0).to(cdt)
    if guided != 0:
        m_u = tl.load(m_ptr + b * D + j, mask=inside, other=0.0).to(cdt)
        m = m_u + _f64(w_lo, w_hi).to(cdt) * (m - m_u)
    if pred == 0:
        x0 = _div(x - b_t * m, a_t, F64)
        eps = m
    elif pred == 1:
        x0 = m
        eps = _div(x - a_t * m, b_t, F64)
    elif pred == 2:
        n2 = a_t * a_t + b_t * b_t
        nrm = _sqrt(n2, F64)
        x0 = _div(a_t * x - (b_t * nrm) * m, n2, F64)
        eps = _div(b_t * x + (a_t * nrm) * m, n2, F64)
    else:
        x0 = x - b_t * m
        eps = x + a_t * m
    r = _f64(clip_lo, clip_hi).to(cdt)
    x0 = tl.where(x0 < -r, -r, x0)  # NaN passes through, as in torch.clamp
    x0 = tl.where(x0 > r, r, x0)
    if rederive != 0:
        eps = _div(x - a_t * x0, b_t, F64)
    out = c_x0 * x0 + c_eps * eps

    valid = ok
    if n_cols == 8:  # a multistep row: H1 h1 + H2 h2, each term needing its history
        h_1 = tl.load(row + 6, mask=ok, other=float("nan"))
        h_2 = tl.load(row + 7, mask=ok, other=float("nan"))
        if n_hist >= 1:
            out = out + h_1 * tl.load(hist0_ptr + b * D + j, mask=inside, other=0.0).to(cdt)
        else:
            valid = valid & (h_1 == 0)
        if n_hist >= 2:
            out = out + h_2 * tl.load(hist1_ptr + b * D + j, mask=inside, other=0.0).to(cdt)
        else:
            valid = valid & (h_2 == 0)
    if MODE == 0:
        if noise_given != 0:
            out = out + c * tl.load(noise_ptr + b * D + j, mask=inside, other=0.0)
        elif c != 0:  # the normals cost more than the rest: draw them only when used (NaN c draws)
            out = out + c * _normals(blk, n, step, k0, k1, F64, LIBDEVICE, BLOCK)
    else:
        k = _component(comps_in_ptr, priors_ptr + s * K, b, n, step, k0, k1, K, comps_given, ok, F64)
        tl.store(comps_out_ptr + b, tl.where(ok, k, -1), mask=blk == 0)
        valid = ok & (k >= 0) & (k < K)
        k_safe = tl.where(valid, k, 0)
        delta = tl.load(offsets_ptr + (s * K + k_safe) * D + j, mask=_and(inside, valid), other=0.0)
        out = out + g * delta
        var_row = var_ptr + (s * K + k_safe) * Dv
        if MODE == 1:
            v = tl.load(var_row + j, mask=_and(inside & (j < Dv), valid), other=0.0)
            sd = _sqrt(_relu_nan(c * c - (g * g) * v), F64)
            if noise_given != 0:
                out = out + sd * tl.load(noise_ptr + b * D + j, mask=inside, other=0.0)
            elif tl.max((sd != 0).to(tl.int32), axis=0) != 0:  # NaN != 0 draws, so NaN propagates
                out = out + sd * _normals(blk, n, step, k0, k1, F64, LIBDEVICE, BLOCK)
        else:
            if noise_given != 0:
                out = out + c * tl.load(noise_ptr + b * D + j, mask=inside, other=0.0)
            elif c != 0:
                out = out + c * _normals(blk, n, step, k0, k1, F64, LIBDEVICE, BLOCK)
            w_set = basis_ptr + s * Dv * D
            partials = partial_ptr + b * Dv * n_blocks
            lanes = tl.arange(0, 32)
            corr = tl.zeros([BLOCK], dtype=cdt)
            for t in range(Dv):
                v_t = tl.load(var_row + t, mask=valid, other=0.0)
                s_t = _sqrt(_relu_nan(c * c - (g * g) * v_t), F64)
                acc = tl.zeros([32], dtype=cdt)
                for q in range(0, n_blocks, 32):
                    acc += tl.load(partials + t * n_blocks + q + lanes, mask=q + lanes < n_blocks, other=0.0)
                p_t = tl.sum(acc, axis=0)
                w = tl.load(w_set + t * D + j, mask=_and(inside, valid), other=0.0)
                corr += ((s_t - c) * p_t) * w
            out = out + corr

    out = tl.where(valid, out, float("nan"))
    tl.store(out_ptr + b * D + j, out.to(out_ptr.dtype.element_ty), mask=inside)
    if write_x0 != 0:
        x0 = tl.where(ok, x0, float("nan"))
        tl.store(x0_ptr + b * D + j, x0.to(x0_ptr.dtype.element_ty), mask=inside)


# ---------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------

_TRITON_TYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
}


class Launch(NamedTuple):
    """One kernel launch: the kernel, its grid, arguments by name (tensors and Python ints), constexprs and
    compile options. :func:`signature` gives the Triton types of the arguments."""

    kernel: object
    grid: tuple[int]
    args: dict
    constexprs: dict
    options: dict


def signature(launch: Launch) -> dict[str, str]:
    """Triton signature of ``launch``: ``*<dtype>`` for tensors, ``i32`` for every scalar (the launcher keeps
    every scalar in [-2^31, 2^31), so its type never depends on its value), constexprs as ``constexpr``."""
    sig = {}
    for name, value in launch.args.items():
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + _TRITON_TYPES[value.dtype]
        else:
            assert -(2**31) <= value <= _INT32_MAX, (name, value)
            sig[name] = "i32"
    return sig | dict.fromkeys(launch.constexprs, "constexpr")


def _i32(value: int) -> int:
    """The 32-bit word of ``value`` (taken modulo 2^32) as a signed int, so triton types it i32."""
    value &= 0xFFFFFFFF
    return value - 2**32 if value > _INT32_MAX else value


def _f64_words(value: float) -> tuple[int, int]:
    bits = struct.unpack("<q", struct.pack("<d", float(value)))[0]
    return _i32(bits), _i32(bits >> 32)


def block_config(D: int) -> tuple[int, int]:
    """(BLOCK, num_warps): a power of two between 256 and 2048 elements covering one sample where it can,
    8 elements per thread."""
    block = min(2048, max(256, triton.next_power_of_2(D)))
    return block, block // 256


BLOCK_SIZES = (256, 512, 1024, 2048)


def _check_size(name: str, value: int) -> None:
    if value > _INT32_MAX - 4096:
        raise ValueError(f"ddimgmm::step (Triton): {name} = {value} exceeds the kernel's 32-bit index range")


def launch_plan(a: StepArgs) -> tuple[list[Launch], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The launches of one step (the projection pass first when ``basis`` is given) and the outputs they
    write (prev_sample, pred_original_sample or empty, components or empty). ``a``: the op's arguments by
    name, already validated by the caller; works on tensors of any device (nothing is launched or read)."""
    B = a.sample.shape[0]
    D = math.prod(a.sample.shape[1:])
    cdt = compute_dtype(a.sample.dtype)
    gmm = a.priors is not None
    mode = MODE_NONE if not gmm else MODE_BASIS if a.basis is not None else MODE_DIAG
    dev = a.sample.device
    prev = torch.empty(a.sample.shape, dtype=a.sample.dtype, device=dev)
    x0 = torch.empty(a.sample.shape if a.return_pred_original else (0,), dtype=a.sample.dtype, device=dev)
    comps = torch.empty((B if gmm else 0,), dtype=torch.int64, device=dev)
    outputs = (prev, x0, comps)
    if B == 0:
        return [], outputs
    block, num_warps = block_config(D)
    n_blocks = max(1, triton.cdiv(D, block))  # >= 1: components are drawn even when D = 0
    for name, size in (("batch size x blocks", B * n_blocks), ("per-sample numel", D)):
        _check_size(name, size)

    x = a.sample.contiguous()
    m = a.model_output.contiguous()
    z = a.noise.to(cdt).contiguous() if a.noise is not None else x.new_empty(0, dtype=cdt)
    k_in = a.components.to(torch.int64).contiguous() if a.components is not None else comps
    # Absent histories point at another tensor of a dtype already in the signature (never read): the sample
    # for the first, the first for the second, so a call without history keeps the kernel of a call with one
    # in the sample's dtype.
    h0 = a.history0.contiguous() if a.history0 is not None else x
    h1 = a.history1.contiguous() if a.history1 is not None else h0
    if gmm:
        stacked = a.priors.dim() == 2
        n_sets = a.priors.shape[0] if stacked else 0
        K = a.priors.shape[-1]
        Dv = a.var_offsets.shape[-1]
        tables = [t.contiguous() for t in (a.priors, a.offsets, a.var_offsets)]
        tables.append(a.basis.contiguous() if a.basis is not None else tables[2])
        for name, size in (("K x D", K * D), ("Dv x D", Dv * D), ("sets", max(n_sets, 1) * K * max(D, Dv))):
            _check_size(name, size)
    else:
        n_sets, K, Dv = 0, 1, 0
        tables = [a.coeffs] * 4
    step_ptr = a.step_tensor if a.step_tensor is not None else comps.new_empty(0)
    words = {
        "from_tensor": int(a.step_tensor is not None),
        "step_word": _i32(a.step_index),
        "seed_lo": _i32(a.seed),
        "seed_hi": _i32(a.seed >> 32),
        "sample_offset": _i32(a.sample_offset),
    }
    common = {"n_blocks": n_blocks, "n_rows": a.coeffs.shape[0] if a.coeffs.dim() == 2 else 0, "n_sets": n_sets}
    constexprs = {"F64": cdt == torch.float64, "LIBDEVICE": not _INTERPRETED, "BLOCK": block}
    options = {"num_warps": num_warps, "enable_fp_fusion": False}
    if cdt == torch.float64 or a.sample.dtype in (torch.float16, torch.bfloat16):
        # Unbounded, ptxas trades spills for occupancy (4-16 B per thread, varying with the triton version and
        # target): in float64, and, since the multistep history terms, for half-precision samples at B256 on
        # sm_80 under triton 3.6 (4 B; the GPU machine's version, found by the rehearsal). They get the
        # registers they need; float32 samples compile without spills as they are.
        options["maxnreg"] = 255
    grid = (B * n_blocks,)

    launches = []
    partial = z  # unused outside MODE_BASIS
    if mode == MODE_BASIS:
        partial = torch.empty((B, Dv, n_blocks), dtype=cdt, device=dev)
        args = {"basis_ptr": tables[3], "noise_ptr": z, "step_ptr": step_ptr, "partial_ptr": partial, "D": D}
        args |= {"Dv": Dv} | common | {"noise_given": int(a.noise is not None)}
        args |= {k: words[k] for k in ("from_tensor", "step_word", "seed_lo", "seed_hi", "sample_offset")}
        launches.append(Launch(_project_kernel, grid, args, constexprs, options))

    w_lo, w_hi = _f64_words(a.guidance_scale if a.guidance_scale is not None else 0.0)
    clip_lo, clip_hi = _f64_words(a.clip_sample_range if a.clip_sample_range is not None else math.inf)
    args = {
        "x_ptr": x,
        "m_ptr": m,
        "coeffs_ptr": a.coeffs,
        "step_ptr": step_ptr,
        "priors_ptr": tables[0],
        "offsets_ptr": tables[1],
        "var_ptr": tables[2],
        "basis_ptr": tables[3],
        "partial_ptr": partial,
        "noise_ptr": z,
        "comps_in_ptr": k_in,
        "hist0_ptr": h0,
        "hist1_ptr": h1,
        "out_ptr": prev,
        "x0_ptr": x0 if a.return_pred_original else prev,
        "comps_out_ptr": comps,
        "B": B,
        "D": D,
        "K": K,
        "Dv": Dv,
    }
    args |= {"n_blocks": n_blocks, "n_rows": common["n_rows"], "n_cols": a.coeffs.shape[-1], "n_sets": n_sets}
    args |= {"n_hist": int(a.history0 is not None) + int(a.history1 is not None)}
    args |= {
        "pred": a.prediction_type,
        "guided": int(a.guidance_scale is not None),
        "rederive": int(a.clip_sample_range is not None and a.use_clipped_model_output),
        "write_x0": int(a.return_pred_original),
        "noise_given": int(a.noise is not None),
        "comps_given": int(a.components is not None),
    }
    args |= words
    args |= {"w_lo": w_lo, "w_hi": w_hi, "clip_lo": clip_lo, "clip_hi": clip_hi}
    launches.append(Launch(_step_kernel, grid, args, {"MODE": mode} | constexprs, options))
    return launches, outputs


def step(a: StepArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``ddimgmm::step`` with the Triton kernels; ``a``: the op's arguments by name (as :func:`launch_plan`),
    results as the schema (ops/schema.py), already validated by the caller. Returns (prev_sample,
    pred_original_sample or empty, components [B] int64 or empty). Inputs are read as they are if contiguous
    (otherwise copied once); nothing is read on the host (the step index may be a device tensor), so the call
    can be captured in a CUDA graph."""
    launches, outputs = launch_plan(a)
    for launch in launches:
        launch.kernel[launch.grid](*launch.args.values(), **launch.constexprs, **launch.options)
    return outputs
