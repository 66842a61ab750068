"""CUDA kernel (the Triton launcher) and fake implementation of ``ddimgmm::step``; the CPU kernel is C++
(csrc/cpu/step.cpp). Arguments are documented with the schema in csrc/ops.cpp."""

from __future__ import annotations

import math

import torch

from ..reference import compute_dtype as _compute_dtype

_MAX_INDEX = 2**32


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check(
    model_output,
    sample,
    coeffs,
    priors,
    offsets,
    var_offsets,
    noise,
    components,
    prediction_type,
    guidance_scale,
    clip_sample_range,
    seed,
    sample_offset,
    step_index,
) -> None:
    """The C++ kernel's TORCH_CHECKs for the CUDA and fake kernels: shapes, dtypes and devices only (reading
    values would sync)."""

    def fail(msg):
        raise ValueError(f"ddimgmm::step: {msg}")

    if sample.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"ddimgmm::step: sample must be float16, bfloat16, float32 or float64, got {sample.dtype}")
    if sample.dim() < 1:
        fail("sample must have a batch dimension, got a 0-d tensor")
    cdt = _compute_dtype(sample.dtype)
    B = sample.shape[0]
    D = math.prod(sample.shape[1:])
    expected = ((2 * B,) if guidance_scale is not None else (B,)) + tuple(sample.shape[1:])
    if tuple(model_output.shape) != expected:
        fail(f"model_output must have shape {expected}, got {tuple(model_output.shape)}")
    if model_output.dtype not in (sample.dtype, cdt):
        fail(
            f"model_output must have the sample's dtype ({sample.dtype}) or the compute dtype ({cdt}), "
            f"got {model_output.dtype}"
        )
    if coeffs.dim() != 1 or coeffs.numel() != 5 or coeffs.dtype != cdt or coeffs.device != sample.device:
        fail(
            f"coeffs must be a 1-D {cdt} tensor of 5 values (a_t, b_t, a_s, b_s, noise_std) on {sample.device}, "
            f"got {coeffs.dtype} {tuple(coeffs.shape)} on {coeffs.device}"
        )
    if not 0 <= prediction_type <= 3:
        fail(f"prediction_type must be 0 (epsilon), 1 (sample), 2 (v_prediction) or 3 (flow), got {prediction_type}")
    if clip_sample_range is not None and not clip_sample_range > 0:
        fail(f"clip_sample_range must be > 0, got {clip_sample_range}")
    if seed < 0:
        fail(f"seed must be >= 0, got {seed}")
    if not 0 <= step_index < _MAX_INDEX:
        fail(f"step_index must be in [0, 2**32), got {step_index}")
    if sample_offset < 0 or sample_offset + B > _MAX_INDEX:
        fail(f"sample_offset must be >= 0 with sample_offset + batch size <= 2**32, got {sample_offset} + {B}")
    tables = {"priors": priors, "offsets": offsets, "var_offsets": var_offsets}
    given = [t is not None for t in tables.values()]
    if any(given) and not all(given):
        fail("pass all of priors, offsets, var_offsets or none")
    for t in (model_output, noise, components, *tables.values()):
        if t is not None and t.device != sample.device:
            fail(
                f"every tensor must be on the sample's device {sample.device}; got one on {t.device} "
                "(move the GMM tables to the sample's device)"
            )
    if all(given):
        for name, t in tables.items():
            if t.dtype != cdt:
                fail(
                    f"{name} must be {_name(cdt)} (the compute dtype of a {_name(sample.dtype)} sample), "
                    f"got {_name(t.dtype)}"
                )
        K = priors.shape[0] if priors.dim() == 1 else -1
        if K < 1:
            fail(f"priors must have shape [K], K >= 1, got {tuple(priors.shape)}")
        if tuple(offsets.shape) != (K, D):
            fail(f"offsets must have shape [K, D] = [{K}, {D}] (D = per-sample numel), got {tuple(offsets.shape)}")
        if var_offsets.dim() != 2 or var_offsets.shape[0] != K or var_offsets.shape[1] > D:
            fail(f"var_offsets must have shape [K, Dv] with K = {K} and Dv <= {D}, got {tuple(var_offsets.shape)}")
    if noise is not None and (not noise.is_floating_point() or noise.shape != sample.shape):
        fail(
            f"noise must be a floating tensor of the sample's shape {tuple(sample.shape)}, got {noise.dtype} "
            f"{tuple(noise.shape)}"
        )
    if components is not None:
        if not all(given):
            fail("components given without GMM tables")
        if components.dtype not in (torch.int32, torch.int64) or tuple(components.shape) != (B,):
            fail(
                f"components must be an int32/int64 tensor of shape [{B}], got {components.dtype} "
                f"{tuple(components.shape)}"
            )


@torch.library.register_kernel("ddimgmm::step", "cuda")
def _step_cuda(
    model_output,
    sample,
    coeffs,
    priors,
    offsets,
    var_offsets,
    noise,
    components,
    prediction_type,
    guidance_scale,
    clip_sample_range,
    use_clipped_model_output,
    seed,
    sample_offset,
    step_index,
    return_pred_original,
):
    _check(
        model_output,
        sample,
        coeffs,
        priors,
        offsets,
        var_offsets,
        noise,
        components,
        prediction_type,
        guidance_scale,
        clip_sample_range,
        seed,
        sample_offset,
        step_index,
    )
    from .._triton import load_step_launcher  # triton is needed only once a CUDA tensor arrives

    step = load_step_launcher()

    with torch.cuda.device(sample.device):
        return step(
            model_output,
            sample,
            coeffs,
            priors,
            offsets,
            var_offsets,
            noise,
            components,
            prediction_type,
            guidance_scale,
            clip_sample_range,
            use_clipped_model_output,
            seed,
            sample_offset,
            step_index,
            return_pred_original,
        )


@torch.library.register_fake("ddimgmm::step")
def _step_fake(
    model_output,
    sample,
    coeffs,
    priors,
    offsets,
    var_offsets,
    noise,
    components,
    prediction_type,
    guidance_scale,
    clip_sample_range,
    use_clipped_model_output,
    seed,
    sample_offset,
    step_index,
    return_pred_original,
):
    _check(
        model_output,
        sample,
        coeffs,
        priors,
        offsets,
        var_offsets,
        noise,
        components,
        prediction_type,
        guidance_scale,
        clip_sample_range,
        seed,
        sample_offset,
        step_index,
    )
    prev = sample.new_empty(sample.shape)
    x0 = sample.new_empty(sample.shape if return_pred_original else (0,))
    comps = sample.new_empty((sample.shape[0] if priors is not None else 0,), dtype=torch.int64)
    return prev, x0, comps
