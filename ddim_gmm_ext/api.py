"""Public sampler functions. Semantics are those of :mod:`ddim_gmm_ext.reference`."""

from __future__ import annotations

import torch
from typing_extensions import Unpack

from . import _checks, _rows, _schedules
from .ops import offset_directions as _offset_directions_op
from .ops import step as _step_op
from .ops import thin_svd as _thin_svd_op
from .reference import StepOutput

_new_output = tuple.__new__  # StepOutput(...) without its Python __new__: this runs on every step

__all__ = ["step", "step_from_table", "ddim_step", "rfim_step", "thin_svd", "offset_directions", "StepOutput"]


def step(
    model_output: torch.Tensor, sample: torch.Tensor, a_t, b_t, a_s, b_s, noise_std, *, gmm=None, step_index: int = 0,
    **options: Unpack[_checks.StepKwargs],
) -> StepOutput:  # fmt: skip
    """One step x_t -> x_s of the Gaussian path x_t = a_t x0 + b_t eps with noise std ``noise_std``; with
    ``gmm``, the Gaussian-mixture kernel of parameter set ``step_index``. See :func:`reference.step`.

    Runs the fused ``torch.ops.ddimgmm.step`` (one pass over memory, no host sync) on the row
    :func:`coefficient_row`. A model output in another dtype than the sample is converted to the
    compute dtype first (one extra copy). The op has no gradient for the coefficients: a tensor coefficient
    that requires grad is refused (use :func:`reference.step`). ``options``: the step's keywords, named, typed
    and defaulted by :class:`ddim_gmm_ext._checks.StepOptions` (prediction_type="epsilon", guidance_scale,
    clip_sample_range, use_clipped_model_output, seed=0, sample_offset=0, noise, components,
    return_pred_original=True)."""
    row, settled = _rows.prepare_step(
        model_output, sample, a_t, b_t, a_s, b_s, noise_std, _checks.step_options("step", options), gmm=gmm,
        step_index=step_index,
    )  # fmt: skip
    return fused_step(model_output, sample, row, int(step_index), gmm, settled)


def step_from_table(
    model_output: torch.Tensor, sample: torch.Tensor, coeffs: torch.Tensor, step_index, *, gmm=None,
    history: tuple[torch.Tensor, ...] = (), **options: Unpack[_checks.StepKwargs],
) -> StepOutput:  # fmt: skip
    """One step from row ``step_index`` of a coefficient table, in one fused op call. See
    :func:`reference.step_from_table` for the math.

    Args:
        coeffs: [S, 6] rows (or one row [6]) of (a_t, b_t, A, B, c, g) on the sample's device in the compute
            dtype (float64 for float64 samples, float32 otherwise); build rows with
            :func:`ddim_gmm_ext.coefficient_row`. A linear multistep solver's rows have 8 columns
            (a_t, b_t, A, B, c, g, H1, H2): mean = A x0 + B eps + H1 h1 + H2 h2.
        step_index: an int, or a 0-d int64 tensor on the sample's device. A tensor is never read on the host,
            so a compiled or CUDA-graph-captured loop bakes in no step number; outside the table (or outside a
            per-step GMM's sets, even a GMM of one step) it gives NaN samples and components -1.
        gmm: a :class:`GMM` (its parameter set ``step_index``, or its shared set) or None.
        history: () or (h1,) or (h1, h2), the previous steps' data predictions (h1 the latest; each the
            ``pred_original_sample`` of an earlier call), of the sample's shape and device, in the sample's dtype
            or the compute dtype. Needs 8-column ``coeffs``; a row with H_j != 0 needs h_j (an error on a host
            ``step_index``, NaN samples on a tensor one, read on the device). The history is not clipped.
        Other arguments as :func:`step`.
    """
    if not isinstance(coeffs, torch.Tensor):
        raise TypeError(f"coeffs must be a torch.Tensor of rows (a_t, b_t, A, B, c, g), got {type(coeffs).__name__}")
    history = _checks.check_history(history)
    if isinstance(step_index, torch.Tensor):
        if step_index.dim() != 0 or step_index.dtype != torch.int64 or step_index.device != sample.device:
            raise ValueError(
                f"step_index must be an int or a 0-d int64 tensor on the sample's device {sample.device}, got a "
                f"{step_index.dtype} tensor of shape {tuple(step_index.shape)} on {step_index.device}"
            )
        host_index = 0
    else:
        host_index = step_index
        if gmm is not None:
            gmm.set_index(step_index)
    settled = _checks.check_step_inputs(
        model_output, sample, _checks.step_options("step_from_table", options), b_s=None, noise_std=None, gmm=gmm,
        step_index=host_index,
    )  # fmt: skip
    index = step_index if isinstance(step_index, torch.Tensor) else int(step_index)
    return fused_step(model_output, sample, coeffs, index, gmm, settled, history=history)


def fused_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    coeffs: torch.Tensor,
    step_index: int | torch.Tensor,
    gmm,
    options: _checks.StepOptions,
    *,
    history: tuple[torch.Tensor, ...] = (),
) -> StepOutput:
    """The fused step of arguments a caller has settled (:func:`step`, :func:`step_from_table`, the diffusers
    schedulers): the model output in a dtype the op takes, ``gmm``'s tables as the op takes them, one op call
    (:func:`ddim_gmm_ext.ops.step.step`, which checks shapes, dtypes and devices), the :class:`StepOutput`.

    Args:
        coeffs: the [S, 6] / [S, 8] table (or one row) in the compute dtype, on the sample's device.
        step_index: a host int, or a 0-d int64 tensor on the sample's device.
        gmm: a :class:`GMM` or None; its tables go to the op as :meth:`GMM.step_tables` gives them.
        options: the step's options (a :class:`_checks.StepOptions`), settled by the caller.
        history: () or (h1,) or (h1, h2), a multistep solver's previous data predictions (h1 the latest), for
            8-column ``coeffs``: mean = A x0 + B eps + H1 h1 + H2 h2. Histories in neither the sample's nor the
            compute dtype, or in two dtypes, are converted to the compute dtype (as the model output is)."""
    dtype = sample.dtype
    if model_output.dtype != dtype or history:
        cdt = _checks.compute_dtype(dtype)
        if model_output.dtype not in (dtype, cdt):
            model_output = model_output.to(cdt)
        if history and (history[0].dtype not in (dtype, cdt) or history[-1].dtype != history[0].dtype):
            history = tuple(h.to(cdt) for h in history)
    tables = None if gmm is None else gmm.step_tables(sample)
    prev, x0, k = _step_op.step(
        model_output, sample, coeffs, options, step_index=step_index, tables=tables, history=history
    )
    return _new_output(StepOutput, (prev, x0 if options.return_pred_original else None, None if gmm is None else k))


def ddim_step(model_output, sample, alpha_prod_t, alpha_prod_prev, *, eta: float = 0.0, **options) -> StepOutput:
    """DDIM(-GMM) step from abar_t to abar_prev with c = eta * DDIM sigma; ``options`` as :func:`step`."""
    return step(model_output, sample, *_schedules.ddim_path(alpha_prod_t, alpha_prod_prev, eta, options), **options)


def rfim_step(model_output, sample, t, s, *, eta: float = 0.0, prediction_type: str = "flow", **options) -> StepOutput:
    """RFIM(-GMM) step of a rectified flow from time t to s < t with c = eta * s; ``options`` as :func:`step`."""
    options["prediction_type"] = prediction_type
    return step(model_output, sample, *_schedules.rfim_path(t, s, eta, options), **options)


def thin_svd(O: torch.Tensor) -> torch.Tensor:  # noqa: E741 (the paper's name; a public keyword)
    """U [S, D, K] with orthonormal columns spanning O [S, D, K], ordered by singular value, signs as
    :func:`reference.thin_svd`.

    U comes from the Gram matrix O^T O in float64 (csrc/cpu/thin_svd.cpp, csrc/cuda/thin_svd.cu), each O[s]
    scaled first where its Gram would over- or underflow (U does not depend on the scale). The Gram route
    loses accuracy like eps * cond(O)^2: on CPU the op reads each set's condition number from the Gram's
    eigenvalues and hands sets with cond > 1e3 (float64; 1e4 for float32) to LAPACK, so U agrees with
    :func:`reference.thin_svd` to about 1e-11 (float64) at any condition, and a non-finite or rank-deficient
    O[s] (sigma_min / sigma_max <= max(D, K) eps) raises ValueError. On CUDA, where those decisions would need
    a host sync, the Gram route's accuracy holds (orthogonality ~ eps cond^2: 1e-13 at cond 1e4, 3e-11 at 1e6,
    float64) and an O[s] with sigma_min / sigma_max <= 1e-6 or non-finite values gives U[s] all nan."""
    _checks.check_thin_svd_input(O)
    if O.numel() == 0:
        return _thin_svd_op.thin_svd(O)
    if O.device.type != "cpu":
        peak = O.abs().amax(dim=(1, 2), keepdim=True)
        return _thin_svd_op.thin_svd(O / torch.where(peak > 0, peak, torch.ones_like(peak)))
    # The CPU op scales and routes to LAPACK itself: no pass over O here unless it refuses a set (each of
    # the scaling, the finiteness check and the condition check of U^T O cost a pass; together they doubled
    # the time at [50, 16384, 8] float64).
    try:
        return _thin_svd_op.thin_svd(O)
    except RuntimeError:  # non-finite, or cond > 1e6: beyond the Gram route, but LAPACK resolves a full-rank matrix
        finite = torch.isfinite(O).flatten(1).all(1)
        if not finite.all():
            raise ValueError(f"O must be finite; O[{int((~finite).nonzero()[0])}] holds nan or inf") from None
        peak = O.abs().amax(dim=(1, 2), keepdim=True)
        sv = torch.linalg.svdvals((O / torch.where(peak > 0, peak, torch.ones_like(peak))).double())
        tiny = sv[:, -1] <= sv[:, 0] * max(O.shape[1:]) * torch.finfo(O.dtype).eps
        if tiny.any():
            s = int(tiny.nonzero()[0])
            ratio = float(sv[s, -1] / sv[s, 0])
            raise ValueError(f"O[{s}] is rank-deficient: sigma_min / sigma_max = {ratio:.3g}") from None
        U = torch.linalg.svd(O, full_matrices=False).U
        # Signs as the Gram route fixes them: each column's entry of largest magnitude positive.
        sign = torch.sign(torch.gather(U, 1, U.abs().argmax(dim=1, keepdim=True)))
        return U * torch.where(sign == 0, torch.ones_like(sign), sign)


def offset_directions(n_sets: int, dim: int, n_components: int, seed: int, device="cpu") -> torch.Tensor:
    """The GMM direction matrices O [n_sets, dim, n_components] float64 of :func:`reference.offset_directions`,
    drawn by ``torch.ops.ddimgmm.offset_directions`` (C++, parallel) and moved to ``device``."""
    key = _checks.check_seed(seed)
    assert key is not None  # check_seed refuses None here
    return _offset_directions_op.offset_directions(n_sets, dim, n_components, seed=key).to(device)
