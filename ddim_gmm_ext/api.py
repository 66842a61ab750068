"""Public sampler functions (DESIGN.md section 4). Semantics are those of :mod:`ddim_gmm_ext.reference`."""

from __future__ import annotations

import torch

from . import _checks, reference
from .reference import StepOutput, ddim_coefficients, rfim_coefficients

__all__ = ["step", "ddim_step", "rfim_step", "thin_svd", "offset_directions", "StepOutput"]


def step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    a_t,
    b_t,
    a_s,
    b_s,
    noise_std,
    *,
    gmm=None,
    step_index: int = 0,
    prediction_type: str = "epsilon",
    guidance_scale: float | None = None,
    clip_sample_range: float | None = None,
    use_clipped_model_output: bool = False,
    seed: int = 0,
    sample_offset: int = 0,
    noise: torch.Tensor | None = None,
    components: torch.Tensor | None = None,
    return_pred_original: bool = True,
) -> StepOutput:
    """One step x_t -> x_s of the Gaussian path x_t = a_t x0 + b_t eps with noise std ``noise_std``; with
    ``gmm``, the Gaussian-mixture kernel of parameter set ``step_index``. See :func:`reference.step`.

    Runs the fused ``torch.ops.ddimgmm.step`` (one pass over memory, no host sync). A model output in another
    dtype than the sample is converted to the compute dtype first (one extra copy)."""
    _checks.check_step_inputs(
        model_output,
        sample,
        b_s=b_s,
        noise_std=noise_std,
        gmm=gmm,
        guidance_scale=guidance_scale,
        prediction_type=prediction_type,
        clip_sample_range=clip_sample_range,
        seed=seed,
        sample_offset=sample_offset,
        step_index=step_index,
        noise=noise,
        components=components,
    )
    priors, offsets, var_offsets = gmm.params(step_index, sample) if gmm is not None else (None, None, None)
    cdt = reference.compute_dtype(sample.dtype)
    if model_output.dtype not in (sample.dtype, cdt):
        model_output = model_output.to(cdt)
    prev, x0, k = torch.ops.ddimgmm.step(
        model_output,
        sample,
        _coeffs((a_t, b_t, a_s, b_s, noise_std), cdt, sample.device),
        priors,
        offsets,
        var_offsets,
        noise,
        components,
        _checks.prediction_type_code(prediction_type),
        None if guidance_scale is None else float(guidance_scale),
        None if clip_sample_range is None else float(clip_sample_range),
        bool(use_clipped_model_output),
        seed,
        sample_offset,
        step_index,
        bool(return_pred_original),
    )
    return StepOutput(prev, x0 if return_pred_original else None, k if gmm is not None else None)


def _coeffs(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(a_t, b_t, a_s, b_s, c) as the op's 1-D coeffs tensor on ``device``, rounded to the compute dtype as
    the reference does. Python numbers and CPU tensors are gathered on the host and moved in one copy; device
    tensors stay on the device: no device-to-host sync either way."""
    if all(isinstance(v, float) for v in values):
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
    values = [torch.as_tensor(v, dtype=dtype).reshape(()) for v in values]
    if all(v.device.type == "cpu" for v in values):
        return torch.stack(values).to(device, non_blocking=True)
    return torch.stack([v.to(device) for v in values])


def ddim_step(model_output, sample, alpha_prod_t, alpha_prod_prev, *, eta: float = 0.0, **options) -> StepOutput:
    """DDIM(-GMM) step from abar_t to abar_prev with c = eta * DDIM sigma; ``options`` as :func:`step`."""
    return step(model_output, sample, *ddim_coefficients(alpha_prod_t, alpha_prod_prev, eta), **options)


def rfim_step(model_output, sample, t, s, *, eta: float = 0.0, prediction_type: str = "flow", **options) -> StepOutput:
    """RFIM(-GMM) step of a rectified flow from time t to s < t with c = eta * s; ``options`` as :func:`step`."""
    return step(model_output, sample, *rfim_coefficients(t, s, eta), prediction_type=prediction_type, **options)


def thin_svd(O: torch.Tensor) -> torch.Tensor:  # noqa: E741 (the paper's name; a public keyword)
    """U [S, D, K] with orthonormal columns spanning O [S, D, K], ordered by singular value, signs as
    :func:`reference.thin_svd`. Computed from the Gram matrix O^T O in float64 (csrc/cpu/thin_svd.cpp,
    csrc/cuda/thin_svd.cu). A non-finite or numerically rank-deficient O[s] (sigma_min / sigma_max <= 1e-6,
    where :func:`reference.thin_svd` still answers) raises on CPU; on CUDA, where raising would need a host
    sync, U[s] is all nan."""
    reference._check_thin_svd_input(O)
    return torch.ops.ddimgmm.thin_svd(O)


def offset_directions(n_sets: int, dim: int, n_components: int, seed: int, device="cpu") -> torch.Tensor:
    """The GMM direction matrices O [n_sets, dim, n_components] float64 of :func:`reference.offset_directions`,
    drawn by ``torch.ops.ddimgmm.offset_directions`` (C++, parallel) and moved to ``device``."""
    return torch.ops.ddimgmm.offset_directions(n_sets, dim, n_components, seed).to(device)
