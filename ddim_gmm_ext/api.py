"""Public sampler functions (DESIGN.md section 4). Semantics are those of :mod:`ddim_gmm_ext.reference`."""

from __future__ import annotations

import torch

from . import reference
from .reference import StepOutput, ddim_coefficients, rfim_coefficients

__all__ = ["step", "ddim_step", "rfim_step", "thin_svd", "StepOutput"]


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
) -> StepOutput:
    """One step x_t -> x_s of the Gaussian path x_t = a_t x0 + b_t eps with noise std ``noise_std``; with
    ``gmm``, the Gaussian-mixture kernel of parameter set ``step_index``. See :func:`reference.step`."""
    return reference.step(
        model_output, sample, a_t, b_t, a_s, b_s, noise_std, gmm=gmm, step_index=step_index,
        prediction_type=prediction_type, guidance_scale=guidance_scale, clip_sample_range=clip_sample_range,
        use_clipped_model_output=use_clipped_model_output, seed=seed, sample_offset=sample_offset, noise=noise,
        components=components,
    )  # fmt: skip


def ddim_step(model_output, sample, alpha_prod_t, alpha_prod_prev, *, eta: float = 0.0, **options) -> StepOutput:
    """DDIM(-GMM) step from abar_t to abar_prev with c = eta * DDIM sigma; ``options`` as :func:`step`."""
    return step(model_output, sample, *ddim_coefficients(alpha_prod_t, alpha_prod_prev, eta), **options)


def rfim_step(model_output, sample, t, s, *, eta: float = 0.0, prediction_type: str = "flow", **options) -> StepOutput:
    """RFIM(-GMM) step of a rectified flow from time t to s < t with c = eta * s; ``options`` as :func:`step`."""
    return step(model_output, sample, *rfim_coefficients(t, s, eta), prediction_type=prediction_type, **options)


def thin_svd(O: torch.Tensor) -> torch.Tensor:
    """U [S, D, K] with orthonormal columns spanning O [S, D, K], ordered by singular value, signs as
    :func:`reference.thin_svd`. Computed from the Gram matrix O^T O in float64 (csrc/cpu/thin_svd.cpp,
    csrc/cuda/thin_svd.cu). A non-finite or numerically rank-deficient O[s] (sigma_min / sigma_max <= 1e-6,
    where :func:`reference.thin_svd` still answers) raises on CPU; on CUDA, where raising would need a host
    sync, U[s] is all nan."""
    reference._check_thin_svd_input(O)
    return torch.ops.ddimgmm.thin_svd(O)
