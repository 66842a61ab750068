"""The runtime's coefficient rows: the row (a_t, b_t, A, B, c, g) the fused op reads, and the check-and-row
prologue of :func:`ddim_gmm_ext.api.step`. The specification builds its rows itself (:mod:`.reference`), so the
oracle tests compare the two."""

from __future__ import annotations

import array

import torch

from . import _checks
from ._schedules import _scalar, _sqrt_pos

_COEFFICIENT_NAMES = ("a_t", "b_t", "a_s", "b_s", "noise_std")
_ARRAY_CODES = {torch.float32: "f", torch.float64: "d"}  # the array module's C type of each compute dtype


def coefficient_row(a_t, b_t, a_s, b_s, c, g=1.0) -> tuple:
    """The op's coefficient row (a_t, b_t, A, B, c, g) of a step x_t -> x_s with noise std c and GMM scale g:
    mean = A x0 + B eps with A = a_s and B = sqrt(max(b_s^2 - c^2, 0)) (the DDIM / RFIM mean, docs/design.md
    1.2). Numbers give numbers (B in float64), tensors give tensors."""
    return a_t, b_t, a_s, _sqrt_pos(b_s * b_s - c * c), c, g


def step_row(a_t, b_t, a_s, b_s, c, g, dtype: torch.dtype, device) -> torch.Tensor:
    """:func:`coefficient_row` as a [6] tensor in ``dtype`` on ``device``. Host numbers (and CPU tensors) are
    combined in float64 on the host and moved in one copy; device tensors stay tensors: no sync."""
    values = [_scalar(v) for v in (a_t, b_t, a_s, b_s, c, g)]
    if all(isinstance(v, float) for v in values):
        row = coefficient_row(*values)
        code = _ARRAY_CODES.get(dtype)
        if code is None or torch.compiler.is_compiling():
            return torch.tensor(row, dtype=dtype).to(device, non_blocking=True)
        # A tensor over an array of the C values: a third of torch.tensor's cost on a list, the same rounding
        # (each float64 cast to the dtype in C, as torch.tensor stores it; tests/ops/test_step.py holds them equal).
        host = torch.frombuffer(array.array(code, row), dtype=dtype)
        return host if device.type == "cpu" else host.to(device, non_blocking=True)
    values = [torch.as_tensor(v, dtype=torch.float64).reshape(()).to(device) for v in values]
    return torch.stack(coefficient_row(*values)).to(dtype)


def prepare_step(
    model_output, sample, a_t, b_t, a_s, b_s, noise_std, options: _checks.StepOptions, *, gmm, step_index: int
) -> tuple[torch.Tensor, _checks.StepOptions]:
    """The prologue of ``step(model_output, sample, a_t, b_t, a_s, b_s, noise_std, ...)``: every check, before any
    work (:func:`_checks.check_step`; the fused op has no gradient for the coefficients, so a coefficient that
    requires grad is refused, by its name), then the coefficient row [6] (g = 1) on the sample's device in the
    compute dtype, and the checked ``options``."""
    options = _checks.check_step(
        model_output, sample, a_t, b_t, a_s, b_s, noise_std, options, gmm=gmm, step_index=step_index
    )
    if torch.is_grad_enabled():
        for name, v in zip(_COEFFICIENT_NAMES, (a_t, b_t, a_s, b_s, noise_std), strict=True):
            if isinstance(v, torch.Tensor) and v.requires_grad:
                raise NotImplementedError(
                    f"no gradient with respect to {name} (a schedule constant) through the fused step; detach it, "
                    "or differentiate through dg.reference.step"
                )
    row = step_row(a_t, b_t, a_s, b_s, noise_std, 1.0, _checks.compute_dtype(sample.dtype), sample.device)
    return row, options
