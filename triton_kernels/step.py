"""Triton kernel of ``ddimgmm::step`` (DESIGN.md 2.1-2.3, 3) and its launcher.

Semantics are those of :func:`ddim_gmm_ext.reference.step`; the CPU twin is ``csrc/cpu/step.cpp`` and both
draw the same random stream (Philox4x32-10 counters as in ``reference.py``), so a seed gives the same samples
on every device to float32 rounding.
"""

from __future__ import annotations

import math
import os
import struct

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

NOISE, COMPONENT = 0, 1  # Philox c3 of reference.NOISE / reference.COMPONENT
_INT32_LIMIT = 2**31
# Read at import, as triton reads it when decorating: the interpreter runs the kernel in numpy on the CPU.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of uint32 counters under the key (k0, k1); reference.philox4x32."""
    M0: tl.constexpr = 0xD2511F53
    M1: tl.constexpr = 0xCD9E8D57
    W0: tl.constexpr = 0x9E3779B9
    W1: tl.constexpr = 0xBB67AE85
    for _ in tl.static_range(10):
        _c0, _c2 = c0, c2
        c0 = tl.umulhi(M1, _c2) ^ c1 ^ k0
        c2 = tl.umulhi(M0, _c0) ^ c3 ^ k1
        c1 = M1 * _c2
        c3 = M0 * _c0
        k0 = k0 + W0
        k1 = k1 + W1
    return c0, c1, c2, c3


@triton.jit
def _sqrt(x, F64: tl.constexpr):
    """Correctly rounded sqrt (tl.sqrt may lower to an approximation for float32; float64 sqrt is exact)."""
    if F64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _box_muller(wa, wb, F64: tl.constexpr, LIBDEVICE: tl.constexpr):
    """Two normals from two uint32 words, exactly the reference's formula in the compute dtype:
    u1 = ((wa >> 8) + 1) 2^-24, u2 = (wb >> 8) 2^-24, r = sqrt(-2 log u1), th = 2 pi (u2 - 1/2),
    (r cos th, r sin th). On the GPU libdevice and sqrt_rn keep it within ~1 ulp, as on the CPU (tl.log /
    tl.cos may lower to approximate instructions); the interpreter has no libdevice and uses numpy's."""
    dt = tl.float64 if F64 else tl.float32
    u1 = ((wa >> 8) + 1).to(dt) * 5.9604644775390625e-08  # 2^-24
    u2 = (wb >> 8).to(dt) * 5.9604644775390625e-08
    th = 6.283185307179586 * (u2 - 0.5)
    if LIBDEVICE:
        r = _sqrt(-2.0 * libdevice.log(u1), F64)
        return r * libdevice.cos(th), r * libdevice.sin(th)
    else:
        r = _sqrt(-2.0 * tl.log(u1), F64)
        return r * tl.cos(th), r * tl.sin(th)


@triton.jit
def _f64(lo, hi):
    """The float64 whose bit pattern has the 32-bit words (lo, hi): Triton passes Python floats as float32."""
    return ((hi.to(tl.uint64) << 32) | lo.to(tl.uint64)).to(tl.float64, bitcast=True)


# Counters and bit patterns change every call: specialising on their values would recompile the kernel.
@triton.jit(
    do_not_specialize=["seed_lo", "seed_hi", "sample_offset", "step_index", "w_lo", "w_hi", "clip_lo", "clip_hi"]
)
def _step_kernel(
    x_ptr,
    m_ptr,
    coeffs_ptr,
    priors_ptr,
    offsets_ptr,
    var_ptr,
    noise_ptr,
    comps_in_ptr,
    out_ptr,
    x0_ptr,
    comps_out_ptr,
    B,
    D,
    K,
    Dv,
    n_blocks,
    seed_lo,
    seed_hi,
    sample_offset,
    step_index,
    w_lo,
    w_hi,
    clip_lo,
    clip_hi,
    PRED: tl.constexpr,
    GUIDANCE: tl.constexpr,
    CLIP: tl.constexpr,
    REDERIVE_EPS: tl.constexpr,
    GMM: tl.constexpr,
    NOISE_GIVEN: tl.constexpr,
    COMPONENTS_GIVEN: tl.constexpr,
    WRITE_X0: tl.constexpr,
    F64: tl.constexpr,
    INDEX64: tl.constexpr,
    LIBDEVICE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program = BLOCK elements of one sample b (program id = b * n_blocks + block).

    x [B, D], m [B, D] or [2B, D] (uncond rows first), out / x0 [B, D] in the storage dtype; coeffs [5]
    (a_t, b_t, a_s, b_s, c), priors [K], offsets [K, D], var_offsets [K, Dv], noise [B, D] in the compute
    dtype; components [B] int64.

        m    = m_u + w (m_c - m_u)                  (GUIDANCE)
        x0   = p_x x + p_m m, eps = q_x x + q_m m   (linear in (x, m) for every prediction type PRED)
        x0   = clamp(x0, -r, r); eps = (x - a_t x0) / b_t if REDERIVE_EPS
        x_s  = a_s x0 + sqrt(b_s^2 - c^2) eps + delta_k + sqrt(max(c^2 - v_k, 0)) z

    z[n, j] = lane j % 4 of Philox(j // 4, n, step_index, NOISE), n = sample_offset + b; k[n] is the inverse
    CDF of the priors at u = (word 0 of Philox(0, n, step_index, COMPONENT) >> 8) 2^-24, cdf accumulated in
    float64 and rounded to the compute dtype (as torch.cumsum on CPU). An explicit component outside
    [0, K) gives NaN for its sample (checking it on the host would need a sync) and reads nothing out of bounds.
    """
    cdt = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0)
    b = pid // n_blocks
    blk = pid % n_blocks
    if INDEX64:
        b = b.to(tl.int64)
        blk = blk.to(tl.int64)
    j = blk * BLOCK + tl.arange(0, BLOCK)
    inside = j < D
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    n = (sample_offset + b).to(tl.uint32)
    step = step_index.to(tl.uint32)

    a_t = tl.load(coeffs_ptr + 0)
    b_t = tl.load(coeffs_ptr + 1)
    a_s = tl.load(coeffs_ptr + 2)
    b_s = tl.load(coeffs_ptr + 3)
    c = tl.load(coeffs_ptr + 4)
    if PRED == 0:  # epsilon: x0 = (x - b_t m) / a_t, eps = m
        p_x = 1.0 / a_t
        p_m = -b_t / a_t
        q_x = 0.0
        q_m = 1.0
    elif PRED == 1:  # sample: x0 = m, eps = (x - a_t m) / b_t
        p_x = 0.0
        p_m = 1.0
        q_x = 1.0 / b_t
        q_m = -a_t / b_t
    elif PRED == 2:  # v_prediction: x0 = a_t x - b_t m, eps = a_t m + b_t x
        p_x = a_t
        p_m = -b_t
        q_x = b_t
        q_m = a_t
    else:  # flow (v = eps - x0, a_t = 1 - t, b_t = t): x0 = x - b_t m, eps = x + a_t m
        p_x = 1.0
        p_m = -b_t
        q_x = 1.0
        q_m = a_t
    c2 = c * c
    eps_coef = _sqrt(tl.maximum(b_s * b_s - c2, 0.0), F64)

    x = tl.load(x_ptr + b * D + j, mask=inside, other=0.0).to(cdt)
    m = tl.load(m_ptr + (B + b if GUIDANCE else b) * D + j, mask=inside, other=0.0).to(cdt)
    if GUIDANCE:
        w = _f64(w_lo, w_hi).to(cdt)
        m_u = tl.load(m_ptr + b * D + j, mask=inside, other=0.0).to(cdt)
        m = m_u + w * (m - m_u)
    x0 = p_x * x + p_m * m
    if CLIP:
        r = _f64(clip_lo, clip_hi).to(cdt)
        x0 = tl.where(x0 < -r, -r, x0)  # NaN passes through, as in torch.clamp
        x0 = tl.where(x0 > r, r, x0)
    if REDERIVE_EPS:  # noqa: SIM108 (a constexpr branch: the untaken side is not compiled)
        eps = (x - a_t * x0) * (1.0 / b_t)
    else:
        eps = q_x * x + q_m * m
    out = a_s * x0 + eps_coef * eps

    sd = tl.zeros([BLOCK], dtype=cdt) + _sqrt(c2, F64)
    if GMM:
        if COMPONENTS_GIVEN:
            k = tl.load(comps_in_ptr + b)
        else:
            w0, _, _, _ = _philox4x32_10(n * 0, n, step, (n * 0 + COMPONENT), k0, k1)
            u = (w0 >> 8).to(cdt) * 5.9604644775390625e-08
            cum = tl.zeros([], dtype=tl.float64)
            k = tl.zeros([], dtype=tl.int64)
            for i in range(K - 1):
                cum += tl.load(priors_ptr + i).to(tl.float64)
                k += (u >= cum.to(cdt)).to(tl.int64)
        tl.store(comps_out_ptr + b, k, mask=blk == 0)
        valid = (k >= 0) & (k < K)
        k_safe = tl.where(valid, k, 0).to(tl.int64)
        delta = tl.load(offsets_ptr + k_safe * D + j, mask=inside, other=0.0)
        v = tl.load(var_ptr + k_safe * Dv + j, mask=inside & (j < Dv), other=0.0)
        out = out + delta
        sd = _sqrt(tl.maximum(c2 - v, 0.0), F64)
    if NOISE_GIVEN:
        out = out + sd * tl.load(noise_ptr + b * D + j, mask=inside, other=0.0)
    elif tl.max(sd, axis=0) > 0:  # the normals cost more than the rest: draw them only when used
        g = (blk * (BLOCK // 4) + tl.arange(0, BLOCK // 4)).to(tl.uint32)
        zero = g * 0
        w0, w1, w2, w3 = _philox4x32_10(g, zero + n, zero + step, zero + NOISE, k0, k1)
        z0, z1 = _box_muller(w0, w1, F64, LIBDEVICE)
        z2, z3 = _box_muller(w2, w3, F64, LIBDEVICE)
        # interleave the lanes: z[4 g + l] = z_l[g]
        z = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [BLOCK])
        out = out + sd * z
    if GMM:
        out = tl.where(valid, out, float("nan"))
    tl.store(out_ptr + b * D + j, out.to(out_ptr.dtype.element_ty), mask=inside)
    if WRITE_X0:
        tl.store(x0_ptr + b * D + j, x0.to(x0_ptr.dtype.element_ty), mask=inside)


def _words(value: int) -> tuple[int, int]:
    """(low, high) 32-bit words of a 64-bit pattern, as Python ints for the kernel's scalar arguments."""
    return value & 0xFFFFFFFF, (value >> 32) & 0xFFFFFFFF


def _f64_words(value: float | None) -> tuple[int, int]:
    return _words(struct.unpack("<Q", struct.pack("<d", 0.0 if value is None else float(value)))[0])


def _block_config(D: int) -> tuple[int, int]:
    """(BLOCK, num_warps): a power of two between 256 and 2048 elements covering one sample where it can,
    8 elements per thread."""
    block = min(2048, max(256, triton.next_power_of_2(D)))
    return block, max(1, min(8, block // 256))


def step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    coeffs: torch.Tensor,
    priors: torch.Tensor | None,
    offsets: torch.Tensor | None,
    var_offsets: torch.Tensor | None,
    noise: torch.Tensor | None,
    components: torch.Tensor | None,
    prediction_type: int,
    guidance_scale: float | None,
    clip_sample_range: float | None,
    use_clipped_model_output: bool,
    seed: int,
    sample_offset: int,
    step_index: int,
    return_pred_original: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch :func:`_step_kernel`; arguments and results as the ``ddimgmm::step`` schema (csrc/ops.cpp),
    already validated by the caller. Returns (prev_sample, pred_original_sample or empty, components [B] int64
    or empty). Inputs are read as they are if contiguous (otherwise copied once); nothing is synced."""
    B = sample.shape[0]
    D = math.prod(sample.shape[1:])
    cdt = torch.float64 if sample.dtype == torch.float64 else torch.float32
    gmm = priors is not None
    x = sample.contiguous()
    m = model_output.contiguous()
    prev = torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)
    x0 = torch.empty(sample.shape if return_pred_original else (0,), dtype=sample.dtype, device=sample.device)
    comps = torch.empty((B if gmm else 0,), dtype=torch.int64, device=sample.device)
    if B == 0:
        return prev, x0, comps
    z = noise.to(cdt).contiguous() if noise is not None else x
    k_in = components.to(torch.int64).contiguous() if components is not None else comps
    tables = (priors.contiguous(), offsets.contiguous(), var_offsets.contiguous()) if gmm else (coeffs,) * 3
    K = priors.shape[0] if gmm else 1
    Dv = var_offsets.shape[1] if gmm else 0
    block, num_warps = _block_config(D)
    n_blocks = max(1, triton.cdiv(D, block))  # >= 1: components are drawn even when D = 0
    index64 = m.numel() >= _INT32_LIMIT or K * D >= _INT32_LIMIT or B * n_blocks * block >= _INT32_LIMIT
    _step_kernel[(B * n_blocks,)](
        x,
        m,
        coeffs.contiguous(),
        *tables,
        z,
        k_in,
        prev,
        x0 if return_pred_original else prev,
        comps,
        B,
        D,
        K,
        Dv,
        n_blocks,
        *_words(seed),
        sample_offset,
        step_index,
        *_f64_words(guidance_scale),
        *_f64_words(clip_sample_range),
        PRED=prediction_type,
        GUIDANCE=guidance_scale is not None,
        CLIP=clip_sample_range is not None,
        REDERIVE_EPS=clip_sample_range is not None and use_clipped_model_output,
        GMM=gmm,
        NOISE_GIVEN=noise is not None,
        COMPONENTS_GIVEN=components is not None,
        WRITE_X0=return_pred_original,
        F64=cdt == torch.float64,
        INDEX64=index64,
        LIBDEVICE=not _INTERPRETED,
        BLOCK=block,
        num_warps=num_warps,
    )
    return prev, x0, comps
