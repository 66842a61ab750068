"""Runtime helpers of the step functions: the checks and the coefficient row every ``step`` starts with, shared by
:func:`ddim_gmm_ext.api.step` and :func:`ddim_gmm_ext.reference.step` (the math of the row is the spec's
:func:`reference.coefficient_row`), and the path arguments of ``ddim_step`` / ``rfim_step``."""

from __future__ import annotations

import torch

from . import _checks, reference

_COEFFICIENT_NAMES = ("a_t", "b_t", "a_s", "b_s", "noise_std")


def step_row(a_t, b_t, a_s, b_s, c, g, dtype: torch.dtype, device) -> torch.Tensor:
    """:func:`reference.coefficient_row` as a [6] tensor in ``dtype`` on ``device``. Host numbers (and CPU
    tensors) are combined in float64 on the host and moved in one copy; device tensors, and tensors that require
    grad (the reference differentiates through them), stay tensors: no sync, no dropped gradient."""
    raw = (a_t, b_t, a_s, b_s, c, g)
    values = [
        v if isinstance(v, torch.Tensor) and v.requires_grad else reference._scalar(v)  # noqa: SLF001
        for v in raw
    ]
    if all(isinstance(v, float) for v in values):
        return torch.tensor(reference.coefficient_row(*values), dtype=dtype).to(device, non_blocking=True)
    values = [torch.as_tensor(v, dtype=torch.float64).reshape(()).to(device) for v in values]
    return torch.stack(reference.coefficient_row(*values)).to(dtype)


def prepare_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    a_t,
    b_t,
    a_s,
    b_s,
    noise_std,
    *,
    gmm,
    step_index: int,
    prediction_type: str,
    guidance_scale,
    clip_sample_range,
    use_clipped_model_output: bool,
    seed: int,
    sample_offset: int,
    noise: torch.Tensor | None,
    components: torch.Tensor | None,
    differentiable: bool,
) -> torch.Tensor:
    """The prologue of ``step(model_output, sample, a_t, b_t, a_s, b_s, noise_std, ...)``: every check, before any
    work, then the coefficient row [6] (g = 1) on the sample's device in the compute dtype.

    ``differentiable``: whether the caller differentiates through tensor coefficients (the reference does; the
    fused op has no gradient for them, so there a coefficient that requires grad is refused, by its name)."""
    if gmm is not None:
        gmm.set_index(step_index)  # checks the index against the GMM's steps
    rederive = clip_sample_range is not None and use_clipped_model_output
    _checks.check_coefficients(a_t, b_t, a_s, b_s, noise_std, prediction_type, rederive)
    if not differentiable and torch.is_grad_enabled():
        for name, v in zip(_COEFFICIENT_NAMES, (a_t, b_t, a_s, b_s, noise_std), strict=True):
            if isinstance(v, torch.Tensor) and v.requires_grad:
                raise NotImplementedError(
                    f"no gradient with respect to {name} (a schedule constant) through the fused step; detach it, "
                    "or differentiate through dg.reference.step"
                )
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
    return step_row(a_t, b_t, a_s, b_s, noise_std, 1.0, _checks.compute_dtype(sample.dtype), sample.device)


def ddim_path(alpha_prod_t, alpha_prod_prev, eta, options: dict) -> tuple:
    """(a_t, b_t, a_s, b_s, c) of ``ddim_step`` (:func:`reference.ddim_coefficients`), with the step's divisions
    checked on the caller's argument: a_t = sqrt(alpha_prod_t), b_t = sqrt(1 - alpha_prod_t)."""
    _checks.check_path_divisors(options, ("alpha_prod_t", alpha_prod_t, 0.0), ("alpha_prod_t", alpha_prod_t, 1.0))
    return reference.ddim_coefficients(alpha_prod_t, alpha_prod_prev, eta)


def rfim_path(t, s, eta, options: dict) -> tuple:
    """(a_t, b_t, a_s, b_s, c) of ``rfim_step`` (:func:`reference.rfim_coefficients`), with the step's divisions
    checked on the caller's argument: a_t = 1 - t, b_t = t. ``options`` hold the step's prediction_type."""
    _checks.check_path_divisors(options, ("t", t, 1.0), ("t", t, 0.0))
    return reference.rfim_coefficients(t, s, eta)
