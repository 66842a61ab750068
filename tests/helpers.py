"""Shared test helpers: devices to run on and the one tolerance table of the suite.

Every tolerance a test uses comes from here: ``TOLERANCES`` (a result in some dtype against a float64 CPU
reference), ``COMPARISONS`` (named kinds of comparison between two implementations) and the Monte Carlo
factors ``MC_SIGMAS`` / ``MC_SIGMAS_WIDE`` (a bound of that many standard errors). Test files hold no bare
atol / rtol numbers."""

import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# (atol, rtol) for results computed in `dtype` against the float64 reference. fp16 / bf16 inputs are
# computed in float32; the tolerance covers the final rounding to the storage dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 2e-2),
}

# (atol, rtol) by kind of comparison between two results (O(1) values unless said otherwise).
COMPARISONS = {
    # the same computation on the same inputs (a replay, a reload, a restart mid-schedule): bitwise equal
    "exact": (0.0, 0.0),
    # float64, the same formula: libm's and torch's log / cos / sin may differ in the last bit
    "f64_last_bit": (1e-14, 1e-14),
    # float64 vs float64 in another operation order (the op's autograd vs the reference's)
    "f64": (1e-12, 1e-12),
    # float64 vs float64 in another operation order, absolute only (op-built tables, steps vs the reference)
    "f64_abs": (1e-12, 0.0),
    # float64 closed-form moments vs their target: 1e-12 where the target is 0, torch.allclose's default rtol
    "f64_moments": (1e-12, 1e-5),
    # float64 thin SVD vs LAPACK's at condition numbers up to 1e9, absolute
    "f64_svd": (1e-11, 0.0),
    # float64 whole loop vs a float64 re-implementation of an upstream sampler (ComfyUI's ancestral RF)
    "f64_loop": (1e-10, 1e-10),
    # float64 whole loop vs an upstream scheduler made to compute in float64 (diffusers' UniPC with its float32 sigmas
    # cast to float64): the same arithmetic, coefficients tabled here, computed per step there
    "f64_loop_upstream": (1e-9, 1e-9),
    # float64 whole loop in k-diffusion's VE units (scaled by sigma) vs k-diffusion / the VP loop mapped to VE
    "f64_loop_ve": (1e-9, 1e-9),
    # one float32 expression vs the same formula in float64, absolute (latent-diffusion's stochastic_encode)
    "f32_formula": (1e-6, 0.0),
    # a float32 loop vs the same loop with its GMM tables built another way (same values up to rounding)
    "f32_tables": (1e-6, 1e-6),
    # a float32 single step vs another float32 implementation, absolute (the v1 step, Triton vs C++)
    "f32_step": (1e-5, 0.0),
    # float32 vs another float32 implementation of the same steps: a step or a short loop on the same
    # coefficients (diffusers with the GMM off, compiled / CUDA-graph vs eager, autograd of the step)
    "f32": (1e-5, 1e-5),
    # a float32 loop vs the same loop in another rounding: fused vs unfused Euler, decode vs latent-diffusion's
    # formulas in float64 at eta 0 (as TOLERANCES[torch.float32])
    "f32_loop": (2e-5, 2e-5),
    # a float32 whole sampling loop vs an upstream library's float32 loop (diffusers' schedulers and pipelines,
    # the reference GMM loop): coefficients rounded from float64 here, computed in float32 there, x0 = (x - b m)
    # / a amplifies that by up to 1 / a_t (~150 at t = 999)
    "f32_loop_upstream": (1e-4, 1e-4),
    # float32 loops vs diffusers' DDIMScheduler over the sweep of schedules, spacings and prediction types
    "f32_loop_sweep": (2e-4, 1e-4),
    # a float32 whole loop vs upstream's loop in float64 (latent-diffusion's formulas, up to 200 steps with
    # noise); the Euler ancestral VE step vs the VP DDIM step mapped back
    "f32_vs_f64_loop": (2e-4, 2e-4),
    # a float32 7-step DDPM loop vs diffusers' DDPMScheduler: few, large steps
    "f32_ddpm_few_steps": (5e-3, 1e-4),
    # a change that must show: `not is_close(a, b, "distinct")` (rtol is torch.allclose's default)
    "distinct": (1e-2, 1e-5),
}

# An ill-conditioned float32 loop (a rho solve on beta sigmas, x0 = (x - b m) / a at a ~ 1e-6) amplifies float32
# rounding by a factor that depends on the config and on the CPU's libm / BLAS; no fixed atol holds on every CPU.
# Such a loop is judged against upstream's arithmetic run in float64 (the oracle): ours may be off it by at most
# LOOP_ERROR_FACTOR times upstream's own float32 error there, plus COMPARISONS["f32"] (the rounding of a result
# whose upstream error happens to be tiny). Both float32 loops go through the same linear recurrence, so the
# oracle's conditioning amplifies both alike; they differ in the per-step rounding (ours: coefficients rounded once
# from float64; upstream: log / expm1 / solve in float32, whose vectorized kernels differ between CPUs). Over the
# UniPC and DPM-Solver++ grids on AMD EPYC, ours / upstream's error is at most 2 where upstream's is above the
# COMPARISONS["f32"] floor (up to 6 below it, where the floor holds both), so 4 leaves a margin for another CPU while
# a row coefficient off by 1e-4 relative already fails most of the grid.
LOOP_ERROR_FACTOR = 4.0
# upstream's float32 loop must be this close to the oracle (relative to its largest entry, at least 1): farther, the
# oracle computes something else, and the bound above would be vacuous
ORACLE_SANITY = 1e-3

# (sample dtype, model output dtype) of the mixed-precision step checks: an autocast half output of a float32 sample,
# float64 on either side, a half sample
MIXED_DTYPES = [
    (torch.float32, torch.float16),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float64),
    (torch.float64, torch.float32),
    (torch.float16, torch.float32),
    (torch.float16, torch.float16),
]

# Monte Carlo bounds: a statistic within this many standard errors of its expectation (atol = MC_SIGMAS * se).
MC_SIGMAS = 5
# the wider bound of the maxima over many coordinates in the moment tests (table steps, Euler VE, test_moments)
MC_SIGMAS_WIDE = 6


def assert_close(
    actual,
    expected,
    dtype: torch.dtype | None = None,
    scale: float = 1.0,
    *,
    kind: str | None = None,
    msg=None,
    equal_nan: bool = False,
):
    """Compare with ``COMPARISONS[kind]`` or, without a kind, with the tolerance of ``dtype`` (default:
    actual.dtype); either widened by ``scale``. With ``dtype`` both sides are compared in float64 on the CPU;
    with ``kind`` they are compared as given (torch.testing.assert_close: dtypes and devices must match too)."""
    if kind is not None:
        if dtype is not None:
            raise TypeError("assert_close takes dtype= or kind=, not both")
        atol, rtol = COMPARISONS[kind]
    else:
        atol, rtol = TOLERANCES[dtype or actual.dtype]
        actual, expected = actual.to("cpu", torch.float64), expected.to("cpu", torch.float64)
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol * scale, msg=msg, equal_nan=equal_nan)


def assert_within(actual, expected, atol: float, msg=None):
    """An absolute bound only (rtol 0), for Monte Carlo bounds derived from a standard error:
    ``atol = MC_SIGMAS * se``."""
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0.0, msg=msg)


def is_close(actual: torch.Tensor, expected: torch.Tensor, kind: str) -> bool:
    """torch.allclose with ``COMPARISONS[kind]``."""
    atol, rtol = COMPARISONS[kind]
    return torch.allclose(actual, expected, rtol=rtol, atol=atol)


def assert_loop_error_within(actual, upstream, oracle, msg=None):
    """A float32 loop ``actual`` against upstream's float32 loop ``upstream``, both judged against ``oracle``,
    upstream's arithmetic in float64 (see ``LOOP_ERROR_FACTOR``): |actual - oracle| <= LOOP_ERROR_FACTOR *
    max |upstream - oracle| + atol + rtol |oracle| with COMPARISONS["f32"]'s atol, rtol. Compared in float64 on the
    CPU; NaN only where the oracle has NaN."""
    actual, upstream, oracle = (t.detach().to("cpu", torch.float64) for t in (actual, upstream, oracle))
    finite = torch.isfinite(oracle)
    upstream_error = (upstream - oracle)[finite].abs().max().item() if bool(finite.any()) else 0.0
    scale = max(oracle[finite].abs().max().item() if bool(finite.any()) else 0.0, 1.0)
    if upstream_error > ORACLE_SANITY * scale:  # a rounding error, not another computation (another start, seed)
        raise AssertionError(f"upstream is {upstream_error:.3g} off the oracle: the oracle is not its arithmetic")
    atol, rtol = COMPARISONS["f32"]
    torch.testing.assert_close(
        actual, oracle, atol=LOOP_ERROR_FACTOR * upstream_error + atol, rtol=rtol, msg=msg, equal_nan=True
    )
