"""CUDA kernel (the Triton launcher) and fake implementation of ``ddimgmm::step``; the CPU kernel is C++
(csrc/cpu/step.cpp). Arguments are documented with the schema in ops/schema.py; autograd is registered here
for every backend."""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple, get_args, get_type_hints

import torch

from .._checks import MAX_INDEX as _MAX_INDEX
from .._checks import StepOptions, op_seed, prediction_type_code
from .._checks import compute_dtype as _compute_dtype


class StepArgs(NamedTuple):
    """The arguments of ``ddimgmm::step`` in the schema's order (ops/schema.py; tests/ops/test_step.py holds the
    two equal, names, types and defaults). The wrapper :func:`step` builds one by name; the checks, the CUDA and
    fake kernels, autograd and the Triton launch plan read it by name. Documented with the schema."""

    model_output: torch.Tensor
    sample: torch.Tensor
    coeffs: torch.Tensor
    step_tensor: torch.Tensor | None
    priors: torch.Tensor | None
    offsets: torch.Tensor | None
    var_offsets: torch.Tensor | None
    basis: torch.Tensor | None
    noise: torch.Tensor | None
    components: torch.Tensor | None
    prediction_type: int
    guidance_scale: float | None
    clip_sample_range: float | None
    use_clipped_model_output: bool
    seed: int
    sample_offset: int
    step_index: int
    return_pred_original: bool
    history0: torch.Tensor | None = None
    history1: torch.Tensor | None = None


#: The op's argument names in schema order.
ARGUMENTS = StepArgs._fields
_TENSOR_ARGUMENTS = tuple(n for n, kind in get_type_hints(StepArgs).items() if torch.Tensor in (kind, *get_args(kind)))

# torch's Python spelling for the dtypes a user passes, c10's (Bool, ComplexFloat, ...) for any other: the
# spelling of the C++ kernel's messages (csrc/cpu/step.cpp dtype_name), so both say the same.
_PYTHON_SPELLED = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64)


def _name(dtype: torch.dtype) -> str:
    if dtype in _PYTHON_SPELLED:
        return str(dtype).removeprefix("torch.")
    try:
        with warnings.catch_warnings():  # complex32 and the quantized dtypes warn that they are experimental
            warnings.simplefilter("ignore")
            legacy = torch.empty(0, dtype=dtype).type()  # "torch.ComplexFloatTensor": c10's name inside
    except (RuntimeError, TypeError):
        return str(dtype).removeprefix("torch.")
    return legacy.removeprefix("torch.").removeprefix("quantized.").removesuffix("Tensor")


def _shape(shape) -> str:
    return "[" + ", ".join(str(int(v)) for v in shape) + "]"


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(f"ddimgmm::step: {msg}")


def check(a: StepArgs) -> None:
    """The argument checks of ``ddimgmm::step`` for the CUDA and fake kernels: shapes, dtypes, devices and host
    scalars only (reading a tensor's values would sync). The C++ kernel (csrc/cpu/step.cpp) makes the same
    checks in the same order with the same messages and exception types (TypeError for the sample's dtype,
    ValueError otherwise); it also checks explicit components' values, which it can read."""

    if a.sample.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(
            f"ddimgmm::step: sample must be float16, bfloat16, float32 or float64, got {_name(a.sample.dtype)}"
        )
    _need(a.sample.dim() >= 1, "sample must have a batch dimension, got a 0-d tensor")
    cdt = _compute_dtype(a.sample.dtype)
    B = a.sample.shape[0]
    D = math.prod(a.sample.shape[1:])
    guided = a.guidance_scale is not None
    expected = ((2 * B,) if guided else (B,)) + tuple(a.sample.shape[1:])
    hint = " ([2B, ...], unconditional half first)" if guided else " (the sample's)"
    _need(
        tuple(a.model_output.shape) == expected,
        f"model_output must have shape {_shape(expected)}{hint}, got {_shape(a.model_output.shape)}",
    )
    _need(
        a.model_output.dtype in (a.sample.dtype, cdt),
        f"model_output must have the sample's dtype ({_name(a.sample.dtype)}) or the compute dtype ({_name(cdt)}), "
        f"got {_name(a.model_output.dtype)}",
    )
    n_cols = a.coeffs.shape[-1] if a.coeffs.dim() >= 1 else 0
    _need(
        n_cols in (6, 8) and (a.coeffs.dim() == 1 or (a.coeffs.dim() == 2 and a.coeffs.shape[0] >= 1)),
        "coeffs must be one row [6] or [8], or a table [S, 6] or [S, 8], of (a_t, b_t, A, B, c, g[, H1, H2]), "
        f"got shape {_shape(a.coeffs.shape)}",
    )
    _need(
        a.coeffs.dtype == cdt,
        f"coeffs must be {_name(cdt)} (the compute dtype of a {_name(a.sample.dtype)} sample), "
        f"got {_name(a.coeffs.dtype)}",
    )
    if a.step_tensor is not None:
        _need(
            a.step_tensor.dim() == 0 and a.step_tensor.dtype == torch.int64,
            f"step_tensor must be a 0-d int64 tensor, got {_name(a.step_tensor.dtype)} of shape "
            f"{_shape(a.step_tensor.shape)}",
        )
        _need(
            a.step_index == 0,
            f"pass the step index as step_tensor or as step_index, not both (step_index = {a.step_index})",
        )
    _need(
        0 <= a.prediction_type <= 3,
        f"prediction_type must be 0 (epsilon), 1 (sample), 2 (v_prediction) or 3 (flow), got {a.prediction_type}",
    )
    if a.clip_sample_range is not None:
        _need(a.clip_sample_range > 0, f"clip_sample_range must be > 0, got {a.clip_sample_range:g}")
    _need(0 <= a.step_index < _MAX_INDEX, f"step_index must be in [0, 2**32), got {a.step_index}")
    _need(
        0 <= a.sample_offset <= _MAX_INDEX - B,
        f"sample_offset must be >= 0 with sample_offset + batch size <= 2**32, got {a.sample_offset} + {B}",
    )
    _need(D <= 4 * _MAX_INDEX, f"per-sample numel must be <= 2**34 (32-bit Philox counter), got {D}")
    tables = (a.priors, a.offsets, a.var_offsets)
    n_tables = sum(t is not None for t in tables)
    _need(n_tables in (0, 3), "pass all of priors, offsets, var_offsets or none")
    _need(a.basis is None or n_tables == 3, "basis given without GMM tables (priors, offsets, var_offsets)")
    gmm = n_tables == 3
    for name in _TENSOR_ARGUMENTS:
        t = getattr(a, name)
        if t is not None:
            _need(
                t.device == a.sample.device,
                f"every tensor must be on the sample's device {a.sample.device}; {name} is on {t.device}",
            )
    n_sets = _check_gmm_tables(a, cdt, D) if gmm else 0
    if a.noise is not None:
        _need(
            a.noise.is_floating_point() and a.noise.shape == a.sample.shape,
            f"noise must be a floating tensor of the sample's shape {_shape(a.sample.shape)}, got "
            f"{_name(a.noise.dtype)} {_shape(a.noise.shape)}",
        )
    if a.components is not None:
        _need(gmm, "components given without GMM tables")
        _need(
            a.components.dtype in (torch.int32, torch.int64) and tuple(a.components.shape) == (B,),
            f"components must be an int32/int64 tensor of shape [{B}], got {_name(a.components.dtype)} "
            f"{_shape(a.components.shape)}",
        )
    _check_history(a, cdt, n_cols)
    n_rows = a.coeffs.shape[0] if a.coeffs.dim() == 2 else 0
    if a.step_tensor is None:
        _need(
            n_rows == 0 or a.step_index < n_rows,
            f"step_index {a.step_index} is outside the coefficient table [{n_rows}, {n_cols}]",
        )
        _need(
            n_sets == 0 or a.step_index < n_sets,
            f"step_index {a.step_index} is outside the GMM tables ({n_sets} parameter sets)",
        )


def _check_gmm_tables(a: StepArgs, cdt: torch.dtype, D: int) -> int:
    """The GMM tables of :func:`check` (all three given): dtypes, then shapes; returns the number of stacked
    parameter sets (0: one shared set)."""
    for name in ("priors", "offsets", "var_offsets", "basis"):
        t = getattr(a, name)
        if t is not None:
            _need(
                t.dtype == cdt,
                f"{name} must be {_name(cdt)} (the compute dtype of a {_name(a.sample.dtype)} sample), "
                f"got {_name(t.dtype)}",
            )
    priors, offsets, var_offsets, basis = a.priors, a.offsets, a.var_offsets, a.basis
    assert priors is not None and offsets is not None and var_offsets is not None  # gmm: all three given
    stacked = priors.dim() == 2
    _need(
        priors.dim() in (1, 2) and priors.shape[-1] >= 1 and (not stacked or priors.shape[0] >= 1),
        f"priors must have shape [K] or [S, K] with K >= 1, got {_shape(priors.shape)}",
    )
    K = priors.shape[-1]
    n_sets = priors.shape[0] if stacked else 0
    head = (n_sets,) if stacked else ()
    want = head + (K, D)
    _need(
        tuple(offsets.shape) == want,
        f"offsets must have shape {_shape(want)} (priors {_shape(priors.shape)}, D = per-sample numel), "
        f"got {_shape(offsets.shape)}",
    )
    Dv = var_offsets.shape[-1] if var_offsets.dim() == 2 + stacked else -1
    _need(
        var_offsets.dim() == 2 + stacked and tuple(var_offsets.shape) == head + (K, Dv) and Dv <= D,
        f"var_offsets must have shape [{'S, ' if stacked else ''}K, Dv] with K = {K} and Dv <= {D}, "
        f"got {_shape(var_offsets.shape)}",
    )
    if basis is not None:
        want = head + (Dv, D)
        _need(
            tuple(basis.shape) == want,
            f"basis must have shape {_shape(want)} (one row per variance offset), got {_shape(basis.shape)}",
        )
    return n_sets


def _check_history(a: StepArgs, cdt: torch.dtype, n_cols: int) -> None:
    """The multistep history of :func:`check`: history1 needs history0; each has the sample's shape and dtype
    (or the compute dtype) and needs 8-column rows."""
    _need(
        a.history1 is None or a.history0 is not None,
        "history1 given without history0 (history0 is the latest prediction, history1 the one before)",
    )
    for name in ("history0", "history1"):
        h = getattr(a, name)
        if h is None:
            continue
        _need(
            h.shape == a.sample.shape,
            f"{name} must have the sample's shape {_shape(a.sample.shape)} (a previous step's prediction of each "
            f"sample), got {_shape(h.shape)}",
        )
        _need(
            h.dtype in (a.sample.dtype, cdt),
            f"{name} must have the sample's dtype ({_name(a.sample.dtype)}) or the compute dtype ({_name(cdt)}), "
            f"got {_name(h.dtype)}",
        )
        _need(
            n_cols == 8,
            f"{name} given with {n_cols}-column coeffs (no H1, H2): pass rows of 8 columns "
            "(a_t, b_t, A, B, c, g, H1, H2)",
        )
    if a.history1 is not None:
        assert a.history0 is not None  # checked above
        _need(
            a.history1.dtype == a.history0.dtype,
            f"history1 must have history0's dtype ({_name(a.history0.dtype)}), got {_name(a.history1.dtype)}",
        )


@torch.library.register_kernel("ddimgmm::step", "cuda")
def _step_cuda(*args):
    a = StepArgs(*args)
    check(a)
    from .._triton import load_step_launcher  # triton is needed only once a CUDA tensor arrives

    step = load_step_launcher()
    with torch.cuda.device(a.sample.device):  # the sample's device, whatever the current one
        return step(a)


@torch.library.register_fake("ddimgmm::step")
def _step_fake(*args):
    a = StepArgs(*args)
    check(a)
    sample = a.sample
    prev = sample.new_empty(sample.shape)
    x0 = sample.new_empty(sample.shape if a.return_pred_original else (0,))
    comps = sample.new_empty((sample.shape[0] if a.priors is not None else 0,), dtype=torch.int64)
    return prev, x0, comps


# ---- autograd ----------------------------------------------------------------------------------------------
# For fixed noise and components the step is affine in (model_output, sample, history) up to the clamp of x0:
#   m = m_u + w (m_c - m_u);  x0' = p_x x + p_m m;  x0 = clamp(x0', -r, r);  eps = q_x x + q_m m
#   (or eps = (x - a_t x0) / b_t with use_clipped_model_output);
#   x_s = A x0 + B eps + H1 h1 + H2 h2 + (terms free of x, m, h).
# The backward applies the transposed coefficients; the clamp passes gradient only where it did not clip. The
# history gets H_j grad_prev (diffusers' multistep schedulers are differentiable through their stored outputs).
# Coefficients, GMM tables and noise get no gradient (they are schedule constants and draws); asking for one
# is an error rather than a silent zero.

_NO_GRAD_INPUTS = ("coeffs", "priors", "offsets", "var_offsets", "basis", "noise")


def _linear_coefficients(a_t, b_t, prediction_type: int):
    """(p_x, p_m, q_x, q_m): x0 = p_x x + p_m m and eps = q_x x + q_m m for each prediction type (0-d tensors)."""
    one, zero = torch.ones_like(a_t), torch.zeros_like(a_t)
    if prediction_type == 0:
        return 1 / a_t, -b_t / a_t, zero, one
    if prediction_type == 1:
        return zero, one, 1 / b_t, -a_t / b_t
    if prediction_type == 2:
        n2 = a_t * a_t + b_t * b_t
        n = n2.sqrt()
        return a_t / n2, -b_t / n, b_t / n2, a_t / n
    return one, -b_t, one, a_t


def _refuse_gradient(a: StepArgs) -> None:
    """NotImplementedError, before any work, for an input without a derivative that requires grad."""
    for name in _NO_GRAD_INPUTS:
        t = getattr(a, name)
        if t is not None and t.requires_grad:
            raise NotImplementedError(
                f"ddimgmm::step: no gradient with respect to {name} (schedule constants and draws); detach it, or "
                "differentiate through dg.reference.step_from_table"
            )


def _setup_context(ctx, inputs, output):
    a = StepArgs(*inputs)
    _refuse_gradient(a)
    ctx.save_for_backward(a.model_output, a.sample, a.coeffs, a.step_tensor)
    ctx.history_dtypes = tuple(None if h is None else h.dtype for h in (a.history0, a.history1))
    ctx.options = (a.prediction_type, a.guidance_scale, a.clip_sample_range, a.use_clipped_model_output)
    ctx.step_index = a.step_index
    ctx.n_sets = a.priors.shape[0] if a.priors is not None and a.priors.dim() == 2 else 0  # 0: one shared set


def _backward(ctx, grad_prev, grad_x0, grad_components):
    model_output, sample, coeffs, step_tensor = ctx.saved_tensors
    prediction_type, w, clip, use_clipped = ctx.options
    cdt = _compute_dtype(sample.dtype)
    row = coeffs
    n_rows = coeffs.shape[0] if coeffs.dim() == 2 else 0
    if n_rows:
        i = step_tensor if step_tensor is not None else torch.tensor(ctx.step_index, device=coeffs.device)
        row = coeffs.index_select(0, i.clamp(0, n_rows - 1).reshape(1))[0]
    a_t, b_t, A, B = row.to(cdt).unbind()[:4]
    H = row.to(cdt).unbind()[6:]
    p_x, p_m, q_x, q_m = _linear_coefficients(a_t, b_t, prediction_type)
    x = sample.to(cdt)
    m = model_output.to(cdt)
    if w is not None:
        m_u, m_c = m.chunk(2)
        m = m_u + w * (m_c - m_u)
    g_prev = grad_prev.to(cdt) if grad_prev is not None else torch.zeros_like(x)
    g_x0 = A * g_prev
    if grad_x0 is not None and grad_x0.numel():
        g_x0 = g_x0 + grad_x0.to(cdt)
    g_x, g_m = torch.zeros_like(x), torch.zeros_like(x)
    if clip is not None and use_clipped:  # eps = (x - a_t x0) / b_t
        g_x = g_x + (B / b_t) * g_prev
        g_x0 = g_x0 - (a_t * B / b_t) * g_prev
    else:
        g_x, g_m = g_x + q_x * B * g_prev, g_m + q_m * B * g_prev
    if clip is not None:
        x0 = p_x * x + p_m * m
        g_x0 = torch.where((x0 >= -clip) & (x0 <= clip), g_x0, torch.zeros_like(g_x0))
    g_x, g_m = g_x + p_x * g_x0, g_m + p_m * g_x0
    if w is not None:
        g_m = torch.cat([(1 - w) * g_m, w * g_m])
    if step_tensor is not None:
        # The forward of an out-of-range step tensor is all NaN (the device convention); so is its gradient,
        # decided on the device as the forward did (a host index out of range never got this far).
        i = step_tensor
        ok = (i >= 0) & (i < _MAX_INDEX)
        for n in (n_rows, ctx.n_sets):  # 0: a single row / one shared set, used at every index
            ok = ok & (i < n) if n else ok
        g_x = torch.where(ok, g_x, torch.full_like(g_x, math.nan))
        g_m = torch.where(ok, g_m, torch.full_like(g_m, math.nan))
        g_prev = torch.where(ok, g_prev, torch.full_like(g_prev, math.nan))  # the history's gradient below
    grads = dict.fromkeys(ARGUMENTS)
    grads["model_output"] = g_m.to(model_output.dtype)
    grads["sample"] = g_x.to(sample.dtype)
    for j, h_dtype in enumerate(ctx.history_dtypes):
        if h_dtype is not None:
            grads[f"history{j}"] = (H[j] * g_prev).to(h_dtype)
    return tuple(grads.values())


torch.library.register_autograd("ddimgmm::step", _backward, setup_context=_setup_context)


_NO_TABLES = (None, None, None, None)
_DEFAULT_OPTIONS = StepOptions()
# The eager call below the Autograd key (a call that Dynamo traces or that records a gradient goes through
# torch.ops.ddimgmm.step): the dispatcher's boxed call of the op's handle, which picks the kernel as torch.ops'
# own callable does (dispatch modes, autocast and functorch keys, the profiler's record of the op) about 1 us
# sooner on CPU. What that callable does before the dispatcher, hand the call to a tensor subclass's or a mode's
# __torch_function__, is checked here, and such a call goes through the callable (_dispatch).
_dispatch = torch.ops.ddimgmm.step.default._op
_handle = torch.ops.ddimgmm.step.default._handle
_call_boxed = torch._C._dispatch_call_boxed
_has_torch_function = torch._C._has_torch_function
_below_autograd = torch._C._AutoDispatchBelowAutograd
_grad_enabled, _is_compiling = torch.is_grad_enabled, torch.compiler.is_compiling  # looked up once, not per step


def _any_requires_grad(*tensors: torch.Tensor | None) -> bool:
    for t in tensors:  # noqa: SIM110 (a loop, not any(<generator>): this runs on every step)
        if t is not None and t.requires_grad:
            return True
    return False


def step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    coeffs: torch.Tensor,
    options: StepOptions = _DEFAULT_OPTIONS,
    *,
    step_index: int | torch.Tensor = 0,
    tables: tuple | None = None,
    history: tuple[torch.Tensor, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The package's one call of ``torch.ops.ddimgmm.step``, by keyword (the op's arguments by name in a
    :class:`StepArgs`; a new schema argument becomes a new keyword with a default, and no caller changes).

    ``step_index``: a host int, or a 0-d int64 tensor on the sample's device (the op's ``step_tensor``, never
    read on the host). ``tables``: (priors, offsets, var_offsets, basis or None) as :meth:`GMM.step_tables` gives
    them, or None. ``options``: the step's options (prediction type by name, seed an unsigned 64-bit int, NumPy
    integers too; noise and components, the op's overrides of the draws).
    ``history``: a multistep solver's previous data predictions, () or (h1,) or (h1, h2), latest first, each of
    the sample's shape and dtype or the compute dtype (the op's history0, history1); they need 8-column coeffs
    (a_t, b_t, A, B, c, g, H1, H2), and a row with H_j != 0 needs h_j.
    Returns the op's (prev_sample, pred_original_sample or empty, components or empty); arguments are checked
    by the op itself (shapes, dtypes, devices), not here.

    When there is no gradient to record (grad mode off, or none of model_output, sample and the history
    requiring grad) and nothing is being traced, the call goes below the Autograd dispatch key: the Python
    autograd wrapper costs about half a small step's time on CPU. An input without a derivative
    that requires grad is refused first, as the autograd path does, rather than detached silently."""
    n_history = len(history)
    if n_history > 2:
        raise ValueError(f"ddimgmm::step: history takes at most 2 tensors (h1, h2), got {n_history}")
    from_tensor = isinstance(step_index, torch.Tensor)
    priors, offsets, var_offsets, basis = _NO_TABLES if tables is None else tables
    prediction_type, guidance_scale, clip_sample_range, use_clipped, seed, sample_offset, noise, components, x0 = (
        options
    )
    # The arguments positionally, in StepArgs' order (a record is built only to name an argument in an error);
    # tests/ops/test_step.py checks every field of this call by name.
    args = (
        model_output,
        sample,
        coeffs,
        step_index if from_tensor else None,
        priors,
        offsets,
        var_offsets,
        basis,
        noise,
        components,
        prediction_type_code(prediction_type),
        None if guidance_scale is None else float(guidance_scale),
        None if clip_sample_range is None else float(clip_sample_range),
        use_clipped,
        op_seed(seed),
        sample_offset,
        0 if from_tensor else step_index,
        x0,
        history[0] if n_history else None,
        history[1] if n_history > 1 else None,
    )
    if _grad_enabled():
        if (
            coeffs.requires_grad
            or (noise is not None and noise.requires_grad)
            or (tables is not None and _any_requires_grad(*tables))
        ):
            _refuse_gradient(StepArgs._make(args))
        if model_output.requires_grad or sample.requires_grad or (n_history and _any_requires_grad(*history)):
            return torch.ops.ddimgmm.step(*args)
    if _is_compiling():
        return torch.ops.ddimgmm.step(*args)
    with _below_autograd():
        if _has_torch_function(args):
            return _dispatch(*args)
        return _call_boxed(_handle, *args)
