"""Argument checks shared by the reference and the fused ops.

Every check names the argument and what was expected. Checks that would need a device-to-host copy (values
of CUDA tensors) are skipped: they belong where the values are made (``GMM`` validates its tables once).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Integral, Real
from typing import NamedTuple, TypedDict

import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow")
NOISE_SCHEDULES = ("ddim", "rfim", "gddim")
#: Philox counters hold the global sample index and the step index in 32-bit words: both are < MAX_INDEX
#: (the op's checks, the reference and the kernels' device-side range check of a step tensor).
MAX_INDEX = 2**32
#: Seeds are 64-bit Philox keys: every public entry point takes an int in [0, 2**64).
SEED_RANGE = 2**64
_SEED_SIGN = SEED_RANGE // 2  # seeds from here on reach the op as their two's-complement int64
#: What the last sampling step does: "gaussian" (no mixture; the paper's model is Gaussian at the last step,
#: where offsets would land on the output uncompensated) or "gmm" (the mixture at every step).
FINAL_STEPS = ("gaussian", "gmm")
#: The GMM variants the tables are built for (docs/design.md 1.3).
VARIANTS = ("rand", "ortho", "ortho-vub", "ortho-lr")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a step computes in for samples of ``dtype``: float64 for float64, float32 for every other
    floating dtype (docs/design.md section 3). GMM tables and coefficient rows are kept in it."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_int(value) -> bool:
    """The one rule for integer arguments: Python ints and NumPy / other ``numbers.Integral`` integers; bool is
    refused (True is not a count, a seed or an index)."""
    # a plain int first: the ABC check costs more than a small step's other checks together
    return type(value) is int or (isinstance(value, Integral) and not isinstance(value, bool))


_PREDICTION_CODES = {name: code for code, name in enumerate(PREDICTION_TYPES)}


def prediction_type_code(prediction_type: str) -> int:
    """The op's ``prediction_type`` argument: the name's position in :data:`PREDICTION_TYPES` (a dict lookup:
    this runs on every step)."""
    code = _PREDICTION_CODES.get(prediction_type) if isinstance(prediction_type, str) else None
    if code is None:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return code


def check_floating(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {t.dtype}")


def check_history(history) -> tuple[torch.Tensor, ...]:
    """A multistep step's ``history``: () or (h1,) or (h1, h2) (a list too) of floating tensors, as a tuple; their
    shapes, dtypes and devices against the sample are the op's checks. None is refused, not read as ()."""
    if not isinstance(history, (tuple, list)):
        raise TypeError(
            "history must be a tuple of at most 2 tensors: () for none, (h1,) or (h1, h2) (the previous steps' "
            f"data predictions, h1 the latest), got {type(history).__name__}"
        )
    if len(history) > 2:
        raise ValueError(f"history takes at most 2 tensors (h1, h2), got {len(history)}")
    for j, h in enumerate(history):
        check_floating(f"history[{j}]", h)
    return tuple(history)


def check_same_device(**tensors: torch.Tensor | None) -> None:
    items = [(n, t) for n, t in tensors.items() if isinstance(t, torch.Tensor)]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; move them to one device")


def host_value(x) -> float | None:
    """The value of a Python number or a one-element CPU tensor; None where reading it would sync a device."""
    if type(x) is float:  # the common case, before the ABC check
        return x
    if isinstance(x, Real):
        return float(x)
    if isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.numel() == 1:
        if torch.compiler.is_compiling():
            return None
        return float(x.detach())  # a value, not part of a graph (no warning for a tensor requiring grad)
    return None


def check_nonnegative(name: str, x) -> None:
    v = host_value(x)
    if v is not None and not v >= 0:
        raise ValueError(f"{name} must be >= 0, got {v}")


def check_noise_std(noise_std, b_s) -> None:
    c, b = host_value(noise_std), host_value(b_s)
    if c is not None and not c >= 0:
        raise ValueError(f"noise_std must be >= 0, got {c}")
    if c is not None and b is not None and c > b * (1 + 1e-6) + 1e-12:
        raise ValueError(f"noise_std ({c}) must not exceed b_s ({b}), the total noise level at the target time")


def check_seed(seed, name: str = "seed", *, allow_none: bool = False) -> int | None:
    """A seed as an int in [0, 2**64) (bool refused); None where ``allow_none``."""
    if seed is None and allow_none:
        return None
    if not is_int(seed) or not 0 <= int(seed) < SEED_RANGE:
        expected = "None or an int" if allow_none else "an int"
        raise ValueError(f"{name} must be {expected} in [0, 2**64), got {seed!r}")
    return int(seed)


def op_seed(seed: int) -> int:
    """The op's ``int seed`` argument (a signed 64-bit int) carrying the bits of an unsigned 64-bit seed
    (a NumPy integer too: np.uint64 - 2**64 would overflow)."""
    if type(seed) is not int:  # a plain int as it is (this runs on every step)
        seed = int(seed)
    return seed - SEED_RANGE if seed >= _SEED_SIGN else seed


def check_final_step(final_step) -> str:
    if final_step not in FINAL_STEPS:
        raise ValueError(f"final_step must be one of {FINAL_STEPS}, got {final_step!r}")
    return final_step


def final_step_allows(final_step: str, step_index: int, n_steps: int) -> bool:
    """The final-step rule: the mixture may act at step ``step_index`` of ``n_steps`` unless it is the last one
    and ``final_step`` is "gaussian" (there c is 0 or tiny, so offsets would land on the output uncompensated)."""
    return not (final_step == "gaussian" and step_index == n_steps - 1)


def gmm_for_step(gmm, step_index: int, n_steps: int, final_step: str):
    """The GMM a sampler passes for step ``step_index`` of ``n_steps`` (:func:`final_step_allows`)."""
    return gmm if final_step_allows(final_step, step_index, n_steps) else None


def check_number(
    name: str, x, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False, scalar: bool = False
) -> None:
    """A finite number in [low, high] ((low, high] with ``low_open``), checked where it can be read without a
    sync (Python numbers, one-element CPU tensors); a non-number is a TypeError naming the argument. With
    ``scalar`` a tensor must hold one element (a step's coefficient); otherwise per-step tensors pass."""
    v: float | None
    if type(x) is float:  # the common case, before the ABC checks
        v = x
    else:
        if isinstance(x, bool) or not isinstance(x, (Real, torch.Tensor)):
            raise TypeError(f"{name} must be a number, got {type(x).__name__} {x!r}")
        if scalar and isinstance(x, torch.Tensor) and x.numel() != 1:
            raise ValueError(
                f"{name} must be a number or a one-element tensor (one step for the whole batch), got a tensor of "
                f"shape {tuple(x.shape)}"
            )
        v = host_value(x)
        if v is None:
            return
    inside = (v > low if low_open else v >= low) and v <= high
    if not (math.isfinite(v) and inside):
        if math.isinf(high):
            bounds = "" if math.isinf(low) else f" {'>' if low_open else '>='} {low:g}"
        else:
            bounds = f" in {'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} must be a finite number{bounds}, got {v}")


def check_coefficients(a_t, b_t, a_s, b_s, noise_std, prediction_type: str, rederive_eps: bool) -> None:
    """The path coefficients of one step: finite, and a_t > 0 where x0 is divided by it (epsilon prediction),
    b_t > 0 where eps is (sample prediction, or eps re-derived from a clipped x0). Without this a bad value
    gives NaN / Inf samples silently."""
    for name, v in (("a_t", a_t), ("b_t", b_t), ("a_s", a_s), ("b_s", b_s), ("noise_std", noise_std)):
        check_number(name, v, 0.0, scalar=True)
    divides_a, divides_b = divided_by(prediction_type, 1.0 if rederive_eps else None, rederive_eps)
    if divides_a:
        check_number("a_t", a_t, 0.0, low_open=True)
    if divides_b:
        check_number("b_t", b_t, 0.0, low_open=True)


def divided_by(prediction_type: str, clip_sample_range, use_clipped_model_output: bool) -> tuple[bool, bool]:
    """(a_t divides, b_t divides): x0 = (x - b_t m) / a_t for epsilon prediction; eps = (x - a_t m) / b_t for
    sample prediction, or eps = (x - a_t x0) / b_t re-derived from a clipped x0."""
    rederive = clip_sample_range is not None and bool(use_clipped_model_output)
    return prediction_type == "epsilon", prediction_type == "sample" or rederive


def check_path_divisors(options: dict, a_t_zero: tuple[str, object, float], b_t_zero: tuple[str, object, float]):
    """For ddim_step / rfim_step, whose callers pass path arguments, not a_t and b_t: a division by a zero a_t or
    b_t (see :func:`check_coefficients`) named by the caller's argument. ``a_t_zero`` / ``b_t_zero``: (argument,
    its value, the value at which a_t / b_t is 0); ``options``: the step's keyword options."""
    prediction_type = options.get("prediction_type", "epsilon")
    clipped = options.get("clip_sample_range"), options.get("use_clipped_model_output", False)
    divides = divided_by(prediction_type, *clipped)
    for (name, value, zero), divided, what in zip(
        (a_t_zero, b_t_zero), divides, ("x0 by a_t", "eps by b_t"), strict=True
    ):
        if divided and host_value(value) == zero:
            raise ValueError(
                f"{name} must not be {zero:g} with prediction_type {prediction_type!r} (clip_sample_range "
                f"{clipped[0]!r}, use_clipped_model_output {clipped[1]!r}): the step divides {what}, which is 0 there"
            )


def check_index(name: str, value: int, upper: int) -> int:
    """An integer (:func:`is_int`) in [0, upper), returned as a Python int."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value < upper:
        raise ValueError(f"{name} must be in [0, {upper}), got {value}")
    return int(value)


class StepOptions(NamedTuple):
    """A step's options, the one definition of their names, types and defaults: the keywords of
    :func:`ddim_gmm_ext.step` and :func:`ddim_gmm_ext.step_from_table` (and the spec's), carried as one value
    from there (checked once, by :func:`check_step_inputs`) through ``api.fused_step`` to the op's wrapper
    ``ops.step.step``.

    * ``prediction_type``: what the model predicts, one of :data:`PREDICTION_TYPES`;
    * ``guidance_scale``: classifier-free guidance w on a stacked [2B, ...] output (unconditional half first);
    * ``clip_sample_range``: clip x0_hat to [-r, r]; ``use_clipped_model_output``: re-derive eps_hat from it;
    * ``seed``, ``sample_offset``: the Philox stream's key and the global index of the batch's first sample;
    * ``noise``, ``components``: the draws, given instead of the stream's;
    * ``return_pred_original``: False leaves ``pred_original_sample`` None (a fused step writes less)."""

    prediction_type: str = "epsilon"
    guidance_scale: float | None = None
    clip_sample_range: float | None = None
    use_clipped_model_output: bool = False
    seed: int = 0
    sample_offset: int = 0
    noise: torch.Tensor | None = None
    components: torch.Tensor | None = None
    return_pred_original: bool = True


class StepKwargs(TypedDict, total=False):
    """:class:`StepOptions` as the keywords of a step function (``**options: Unpack[StepKwargs]``): the same
    names and types (a test holds them equal); the defaults are StepOptions'."""

    prediction_type: str
    guidance_scale: float | None
    clip_sample_range: float | None
    use_clipped_model_output: bool
    seed: int
    sample_offset: int
    noise: torch.Tensor | None
    components: torch.Tensor | None
    return_pred_original: bool


def step_options(caller: str, options: Mapping) -> StepOptions:
    """A step function's option keywords as one :class:`StepOptions`; an unknown keyword is the TypeError Python
    gives for a function's (naming ``caller``)."""
    try:
        return StepOptions(**options)
    except TypeError:
        unknown = next(k for k in options if k not in StepOptions._fields)
        raise TypeError(f"{caller}() got an unexpected keyword argument {unknown!r}") from None


def check_step(
    model_output, sample, a_t, b_t, a_s, b_s, noise_std, options: StepOptions, *, gmm, step_index: int
) -> StepOptions:
    """Every check of ``step(model_output, sample, a_t, b_t, a_s, b_s, noise_std, ...)``, before any work: the step
    index against the GMM's steps, the path coefficients, then :func:`check_step_inputs` (whose ``options`` it
    returns)."""
    if gmm is not None:
        gmm.set_index(step_index)  # checks the index against the GMM's steps
    rederive = options.clip_sample_range is not None and options.use_clipped_model_output
    check_coefficients(a_t, b_t, a_s, b_s, noise_std, options.prediction_type, rederive)
    return check_step_inputs(
        model_output, sample, options, b_s=b_s, noise_std=noise_std, gmm=gmm, step_index=step_index
    )


def check_step_inputs(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    options: StepOptions,
    *,
    b_s,
    noise_std,
    gmm,
    step_index: int,
) -> StepOptions:
    """Shapes, dtypes, devices and ranges of one step's inputs (gmm: a GMM or None); returns ``options`` with
    the sample offset as a Python int (NumPy integers pass the check)."""
    prediction_type, guidance_scale, clip_sample_range, _, seed, sample_offset, noise, components, _ = options
    if noise_std is not None:  # None: a table's step, whose c is in its row
        check_noise_std(noise_std, b_s)
    gmm_dim = None if gmm is None else gmm.dim
    n_components = None if gmm is None else gmm.n_components
    check_floating("model_output", model_output)
    check_floating("sample", sample)
    prediction_type_code(prediction_type)
    if sample.dim() < 1:
        raise ValueError("sample must have a batch dimension, got a 0-d tensor")
    batch = sample.shape[0]
    if guidance_scale is not None:
        expected = (2 * batch,) + tuple(sample.shape[1:])
        if tuple(model_output.shape) != expected:
            raise ValueError(
                f"with guidance_scale, model_output must have shape {expected} (unconditional half first), "
                f"got {tuple(model_output.shape)}"
            )
    elif model_output.shape != sample.shape:
        expected = tuple(sample.shape)
        hint = " (pass guidance_scale for a stacked [2B, ...] output)" if model_output.shape[0] == 2 * batch else ""
        raise ValueError(f"model_output shape {tuple(model_output.shape)} does not match sample shape {expected}{hint}")
    if guidance_scale is not None:
        check_number("guidance_scale", guidance_scale)
    if clip_sample_range is not None:
        v = host_value(clip_sample_range)
        if v is None or not v > 0:
            raise ValueError(f"clip_sample_range must be a positive number or None, got {clip_sample_range!r}")
    check_index("seed", seed, SEED_RANGE)
    check_index("step_index", step_index, MAX_INDEX)
    check_index("sample_offset", sample_offset, MAX_INDEX)
    if sample_offset + batch > MAX_INDEX:
        raise ValueError(f"sample_offset + batch size must be <= 2**32, got {sample_offset} + {batch}")
    if noise is not None:
        check_floating("noise", noise)
        if noise.shape != sample.shape:
            raise ValueError(f"noise must have the sample's shape {tuple(sample.shape)}, got {tuple(noise.shape)}")
    if noise is not None or components is not None or model_output.device != sample.device:  # else nothing to find
        check_same_device(sample=sample, model_output=model_output, noise=noise, components=components)
    if gmm_dim is not None:
        per_sample = math.prod(sample.shape[1:])
        if gmm_dim != per_sample:
            raise ValueError(
                f"gmm dim ({gmm_dim}) must equal the per-sample numel of sample ({per_sample} for shape "
                f"{tuple(sample.shape)})"
            )
    if components is not None:
        if n_components is None:
            raise ValueError("components given but gmm is None: pass the GMM the components index into")
        if components.dtype not in (torch.int32, torch.int64) or tuple(components.shape) != (batch,):
            raise ValueError(
                f"components must be an int32/int64 tensor of shape ({batch},), got {components.dtype} "
                f"{tuple(components.shape)}"
            )
        if components.numel() and components.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = int(components.min()), int(components.max())
            if lo < 0 or hi >= n_components:
                raise ValueError(f"components must be in [0, {n_components}), got values in [{lo}, {hi}]")
    return options if type(sample_offset) is int else options._replace(sample_offset=int(sample_offset))


def check_priors(priors: torch.Tensor) -> None:
    """priors [S, K]: non-negative rows summing to one (checked on the host once, when a GMM is built)."""
    p = priors.detach().to("cpu", torch.float64)
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError("priors must be finite and non-negative")
    sums = p.sum(-1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-5):
        raise ValueError(f"priors must sum to 1 over components, got sums {sums.tolist()[:4]}")


def check_gmm_config(dim: int, n_components: int, n_steps: int, scale: float, variant: str) -> None:
    """The arguments of one GMM's tables (:func:`reference.gmm_parameters`, ``GMM._build``): the variant is one of
    :data:`VARIANTS` ("ortho-vub*" is ``GMM.create``'s alias, resolved before this check)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if not is_int(n_components) or n_components < 1:
        raise ValueError(f"n_components must be an int >= 1, got {n_components!r}")
    if not is_int(dim) or dim < 2:
        raise ValueError(f"dim must be an int >= 2 (elements per sample), got {dim!r}")
    if n_components >= dim:
        raise ValueError(f"n_components ({n_components}) must be < dim ({dim}) (paper eq. 9 needs K < D)")
    if not is_int(n_steps) or n_steps < 1:
        raise ValueError(f"n_steps must be an int >= 1, got {n_steps!r}")
    if not (isinstance(scale, Real) and not isinstance(scale, bool) and math.isfinite(scale) and scale >= 0):
        raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")


def gmm_overflow_error(scale: float, dtype: torch.dtype) -> ValueError:
    """The one message for a scale whose GMM tables do not fit ``dtype``."""
    return ValueError(f"scale {scale} is too large: the GMM tables overflow {dtype}")


def check_gmm_scale(scale: float, variant: str, priors: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuses, before any table is drawn, a scale whose ORTHO-VUB or ORTHO-LR variance offsets overflow ``dtype``.

    Those variances follow from the scale and the priors alone (docs/design.md 1.3): ORTHO-VUB's largest is
    s^2 max(pi) / (K min(pi)), ORTHO-LR's s^2 lam_max / (K min(pi)) with lam_max the largest eigenvalue of
    diag(pi) - pi pi^T (the offsets s (U_k - U pi) have M = s^2 U (diag(pi) - pi pi^T) U^T). Beyond float64 the
    ORTHO-LR eigen-decomposition would meet inf. RAND's and ORTHO's diagonal variances depend on the directions:
    their tables are checked once built (:func:`gmm_overflow_error`). ``priors`` [S, K]; zero priors are never
    drawn and get no variance."""
    K = priors.shape[-1]
    if variant not in ("ortho-vub", "ortho-lr") or K == 1 or scale == 0:
        return
    p = priors.detach().to("cpu", torch.float64)
    if variant == "ortho-vub":
        top = p.amax(-1)
    else:
        top = torch.linalg.eigvalsh(torch.diag_embed(p) - p[:, :, None] * p[:, None, :])[:, -1]
    low = torch.where(p > 0, p, torch.ones_like(p)).amin(-1)
    peak = float(scale) * (float(scale) * float((top / (K * low)).amax()))
    if not peak <= torch.finfo(dtype).max:
        raise gmm_overflow_error(scale, dtype)


def check_thin_svd_input(O) -> None:  # noqa: E741
    check_floating("O", O)
    if O.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"O must be float32 or float64, got {O.dtype}")
    if O.dim() != 3 or O.shape[2] > O.shape[1]:
        raise ValueError(f"O must have shape [S, D, K] with K <= D, got {tuple(O.shape)}")
