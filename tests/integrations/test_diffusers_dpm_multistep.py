"""DPMSolverMultistepGMMScheduler: whole-loop parity with diffusers' DPMSolverMultistepScheduler (GMM off) over
algorithms, orders, solver types, sigma schedules and prediction types; config round trips; a compiled loop; the
SDE-GMM one-step moments; bad configs and arguments."""

import itertools
import math
import sys
from unittest import mock

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
import diffusers  # noqa: E402

import ddim_gmm_ext as dg  # noqa: E402
from ddim_gmm_ext.diffusers import DPMSolverMultistepGMMScheduler  # noqa: E402
from tests.helpers import MC_SIGMAS_WIDE, MIXED_DTYPES, assert_close, assert_loop_error_within, assert_within  # noqa: E402

SHAPE = (2, 3, 4, 4)
# A fixed linear "model" per prediction type, near a denoiser of data at 0 so that loops stay O(1).
WEIGHTS = {"epsilon": 0.9, "sample": 0.1, "v_prediction": 0.5, "flow_prediction": 0.8}
SIGMAS = {
    "default": {},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
    "lu": {"use_lu_lambdas": True},
    "flow": {"use_flow_sigmas": True, "flow_shift": 3.0},
}


def _model(x, t, prediction_type):
    return WEIGHTS[prediction_type] * x + 1e-4 * t.float() - 0.05


def _loop(scheduler, steps, seed=1, noise=False):
    """Final sample of a whole loop drawing its noise from one seeded generator (or as variance_noise)."""
    scheduler.set_timesteps(steps)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(seed)
    pred = scheduler.config.prediction_type
    for t in scheduler.timesteps:
        if noise:
            z = torch.randn(SHAPE, generator=gen)
            x = scheduler.step(_model(x, t, pred), t, x, variance_noise=z).prev_sample
        else:
            x = scheduler.step(_model(x, t, pred), t, x, generator=gen).prev_sample
    return x


class _TorchWithFloat64Upcast:
    """torch, as diffusers' DPM-Solver module sees it, with float32 meaning float64: its step upcasts the sample with
    ``sample.to(torch.float32)`` and draws / converts the noise in float32; under this it runs in float64 (the same
    code, every other torch name unchanged)."""

    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


def _loop64(scheduler, steps, seed=1):
    """The oracle of _loop: diffusers' DPMSolverMultistepScheduler computing in float64 (its float32 sigmas cast
    after set_timesteps), from _loop's start and with _loop's noise (drawn in float32 from the same generator, as
    diffusers draws it, and passed as variance_noise)."""
    scheduler.set_timesteps(steps)
    scheduler.sigmas = scheduler.sigmas.double()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).double()
    gen = torch.Generator().manual_seed(seed)
    sde = scheduler.config.algorithm_type.startswith("sde")
    module = sys.modules[type(scheduler).__module__]
    with mock.patch.object(module, "torch", _TorchWithFloat64Upcast()):
        for t in scheduler.timesteps:
            z = torch.randn(SHAPE, generator=gen).double() if sde else None
            x = scheduler.step(_model(x, t, scheduler.config.prediction_type), t, x, variance_noise=z).prev_sample
    return x


def _assert_matches_stock(config, steps):
    """Our float32 loop against diffusers' float32 loop, both judged against diffusers' arithmetic in float64 (beta
    sigmas at order 3 amplify float32 rounding by a CPU-dependent amount: tests.helpers.LOOP_ERROR_FACTOR)."""
    ours = _loop(DPMSolverMultistepGMMScheduler(**config), steps)
    stock = _loop(diffusers.DPMSolverMultistepScheduler(**config), steps)
    oracle = _loop64(diffusers.DPMSolverMultistepScheduler(**config), steps)
    assert_loop_error_within(ours, stock, oracle)


def _grid():
    for alg, order, solver, sigmas in itertools.product(
        ["dpmsolver++", "sde-dpmsolver++"], [1, 2, 3], ["midpoint", "heun"], SIGMAS
    ):
        preds = ["flow_prediction", "v_prediction"] if sigmas == "flow" else ["epsilon", "sample", "v_prediction"]
        for pred in preds:
            yield (
                dict(algorithm_type=alg, solver_order=order, solver_type=solver, prediction_type=pred) | SIGMAS[sigmas]
            )


GRID = list(_grid())


# Checked to fail: with the heun D1 coefficient used for midpoint (order 2), with r0 inverted in the weights, with
# the SDE's e^-h left out of the x_t coefficient, and with the order-3 k2 of _solver_coefficients scaled by 1 + 1e-3
# (a row coefficient off by 1e-3 relative).
@pytest.mark.parametrize("steps", [7, 13])
@pytest.mark.parametrize("config", GRID, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_whole_loop_matches_dpm_solver(config, steps):
    _assert_matches_stock(config, steps)


OPTIONS = [
    {"thresholding": True, "sample_max_value": 1.5, "dynamic_thresholding_ratio": 0.9},
    {"thresholding": True, "algorithm_type": "sde-dpmsolver++", "solver_order": 3},
    {"euler_at_final": True, "final_sigmas_type": "sigma_min"},
    {"lower_order_final": False, "final_sigmas_type": "sigma_min", "solver_order": 3},
    {"final_sigmas_type": "sigma_min", "algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
    {"timestep_spacing": "trailing", "beta_schedule": "scaled_linear"},
    {"timestep_spacing": "leading", "steps_offset": 1, "beta_schedule": "squaredcos_cap_v2"},
    {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    {"prediction_type": "flow_prediction"},  # on VP sigmas: x0 in torch with diffusers' sigma
    {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},  # diffusers' own step
    {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"},
]


@pytest.mark.parametrize("steps", [7, 13])
@pytest.mark.parametrize("config", OPTIONS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_options_match_dpm_solver(config, steps):
    # Checked to fail with the thresholding path skipping _threshold_sample.
    _assert_matches_stock(config, steps)


def test_variance_noise_and_learned_variance():
    config = dict(algorithm_type="sde-dpmsolver++", solver_order=3)
    ours = _loop(DPMSolverMultistepGMMScheduler(**config), 7, noise=True)
    assert_close(ours, _loop(diffusers.DPMSolverMultistepScheduler(**config), 7, noise=True), kind="f32_loop_upstream")

    def run(s):  # learned variance: 6 channels out, the first 3 the epsilon
        s.set_timesteps(7)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        for t in s.timesteps:
            m = torch.cat([_model(x, t, "epsilon"), torch.ones_like(x)], 1)
            x = s.step(m, t, x).prev_sample
        return x

    stock = run(diffusers.DPMSolverMultistepScheduler(variance_type="learned_range"))
    assert_close(run(DPMSolverMultistepGMMScheduler(variance_type="learned_range")), stock, kind="f32_loop_upstream")


def test_a_run_starting_mid_schedule_restarts_the_order():
    # set_begin_index (img2img): diffusers counts orders from the first step taken.
    def run(s):
        s.set_timesteps(13)
        s.set_begin_index(4)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        for t in s.timesteps[4:]:
            x = s.step(_model(x, t, "epsilon"), t, x).prev_sample
        return x

    config = dict(solver_order=3)
    stock = run(diffusers.DPMSolverMultistepScheduler(**config))
    assert_close(run(DPMSolverMultistepGMMScheduler(**config)), stock, kind="f32_loop_upstream")


def test_history_is_kept_functionally():
    # The op's x0 output becomes the history; the model output and the sample are not modified in place.
    s = DPMSolverMultistepGMMScheduler(solver_order=3)
    s.set_timesteps(7)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for t in s.timesteps[:3]:
        m = _model(x, t, "epsilon")
        x_copy, m_copy = x.clone(), m.clone()
        x_next = s.step(m, t, x).prev_sample
        assert torch.equal(x, x_copy) and torch.equal(m, m_copy)
        x = x_next
    assert all(h is not None and h.shape == SHAPE for h in s.model_outputs)
    assert s.lower_order_nums == 3 and s.step_index == 3


# ---- configs ------------------------------------------------------------------------------------------------


def test_from_config_both_ways_and_save_load(tmp_path):
    stock = diffusers.DPMSolverMultistepScheduler(solver_order=3, algorithm_type="sde-dpmsolver++")
    ours = DPMSolverMultistepGMMScheduler.from_config(stock.config, gmm_variant="ortho", seed=4)
    assert ours.config.solver_order == 3 and ours.config.gmm_variant == "ortho"
    back = diffusers.DPMSolverMultistepScheduler.from_config(ours.config)
    assert back.config.algorithm_type == "sde-dpmsolver++" and type(back) is diffusers.DPMSolverMultistepScheduler
    ours.save_pretrained(tmp_path)
    loaded = DPMSolverMultistepGMMScheduler.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(ours.config)
    assert diffusers.DPMSolverMultistepScheduler in ours.compatibles  # the stock side: patch_diffusers (contract)
    assert_close(_loop(loaded, 7), _loop(ours, 7), kind="exact")


# ---- SDE-GMM moments ----------------------------------------------------------------------------------------


def _one_step_moments(gmm_params=None, n=20000, step=3):
    """Mean and per-coordinate variance of x_s over n samples of one second-order SDE-DPM-Solver++(GMM) step from
    the same x_t and history; and the Gaussian step's mean and c."""
    D = 16
    s = DPMSolverMultistepGMMScheduler(
        algorithm_type="sde-dpmsolver++", gmm_variant="ortho", gmm_n_components=4, gmm_scale=2.0, seed=7,
        final_step="gmm",
    )  # fmt: skip
    s.set_timesteps(7)
    if gmm_params is not None:
        s.set_gmm_params(gmm_params)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, D, generator=g).expand(n, D).contiguous()
    m = torch.randn(1, D, generator=g).expand(n, D).contiguous()
    h0 = torch.randn(1, D, generator=g).expand(n, D).contiguous()
    s._step_index, s.lower_order_nums, s.model_outputs = step, 2, [h0, h0]
    out = s.step(m, s.timesteps[step], x).prev_sample
    a_t, b_t, A, B, c, _, H1, _ = s._rows[step].tolist()
    mean = A * (x[0] - b_t * m[0]) / a_t + B * m[0] + H1 * h0[0]
    return out.mean(0), out.var(0), mean, c, s


def test_sde_gmm_step_matches_the_sde_moments():
    # Where nothing clips (g^2 v_k <= c^2), the mixture step has the SDE step's mean and per-coordinate variance.
    mean, var, target_mean, c, s = _one_step_moments()
    v = s.gmm.tables(torch.empty(0))[2][3]
    assert (v <= c * c).all(), "the oracle needs an unclipped step"
    n = 20000
    assert_within(mean, target_mean, MC_SIGMAS_WIDE * c / math.sqrt(n))
    assert_within(var, torch.full_like(var, c * c), MC_SIGMAS_WIDE * c * c * math.sqrt(2 / n))


def test_the_moment_oracle_catches_an_uncompensated_mixture():
    # Planted mutation: the same offsets with zero variance offsets (noise not reduced): the variance exceeds c^2.
    _, _, _, _, s = _one_step_moments(n=10)
    priors, offsets, var, basis = s.gmm.tables(torch.empty(0))
    mutated = dg.GMM.from_params(priors, offsets, torch.zeros_like(var), n_steps=priors.shape[0])
    _, var_m, _, c, _ = _one_step_moments(gmm_params=mutated)
    with pytest.raises(AssertionError):
        assert_within(var_m, torch.full_like(var_m, c * c), MC_SIGMAS_WIDE * c * c * math.sqrt(2 / 20000))


# ---- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (dict(solver_order=4), "solver_order must be 1, 2 or 3, got 4"),
        (dict(solver_order=0), "solver_order must be 1, 2 or 3, got 0"),
        (dict(solver_order=True), "solver_order must be 1, 2 or 3, got True"),
        (dict(gmm_variant="ortho"), "gmm_variant='ortho' needs algorithm_type='sde-dpmsolver\\+\\+'.*deterministic"),
        (dict(gmm_variant="rand", algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"), "algorithm_type"),
        (dict(prediction_type="x0"), "prediction_type must be"),
        (dict(gmm_variant="nope", algorithm_type="sde-dpmsolver++"), "gmm_variant must be"),
        (dict(final_step="last", algorithm_type="sde-dpmsolver++"), "final_step"),
    ],
)
def test_bad_config_named(config, match):
    with pytest.raises(ValueError, match=match):
        DPMSolverMultistepGMMScheduler(**config)


def test_bad_arguments_named():
    s = DPMSolverMultistepGMMScheduler(algorithm_type="sde-dpmsolver++")
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 999, x)
    with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1"):
        s.set_timesteps(0)
    s.set_timesteps(7)
    t = s.timesteps[0]
    with pytest.raises(ValueError, match="variance_noise must have the model output's shape"):
        s.step(x, t, x, variance_noise=torch.zeros(1, 3))
    with pytest.raises(TypeError, match="generator must be"):
        s.step(x, t, x, generator=3)
    for t in s.timesteps:
        x = s.step(x, t, x).prev_sample
    with pytest.raises(ValueError, match="past the end of the 7-step schedule"):
        s.step(x, t, x)


# ---- dtypes and model-output forms --------------------------------------------------------------------------------


def _fixed_output_loop(scheduler, sample_dtype, output, steps=5):
    """A loop whose model output ``output(t)`` depends on t only (both loops see the same rounded outputs)."""
    scheduler.set_timesteps(steps)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(sample_dtype)
    gen = torch.Generator().manual_seed(1)
    for t in scheduler.timesteps:
        x = scheduler.step(output(t), t, x, generator=gen).prev_sample
    return x


BASE = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
@pytest.mark.parametrize("sample_dtype, output_dtype", MIXED_DTYPES)
def test_output_dtype_is_diffusers(algorithm_type, prediction_type, sample_dtype, output_dtype):
    # diffusers returns its data prediction's dtype: the promoted dtype of the sample and the model output
    # ("epsilon": a float32 sample with an autocast fp16 output stays float32, float64 stays float64), the model
    # output's with "sample". Checked to fail with the output cast to the model output's dtype (fp16 / bf16 outputs
    # of a float32 sample, "epsilon").
    config = dict(algorithm_type=algorithm_type, prediction_type=prediction_type, solver_order=3)

    def output(t):
        return (0.3 * BASE + t / 1000).to(output_dtype)

    ours = _fixed_output_loop(DPMSolverMultistepGMMScheduler(**config), sample_dtype, output)
    stock = _fixed_output_loop(diffusers.DPMSolverMultistepScheduler(**config), sample_dtype, output)
    assert ours.dtype == stock.dtype
    # diffusers rounds sigma_t * model_output to a half output's dtype (a 0-d float32 factor does not promote), ours
    # computes in float32: they differ by the half dtype's rounding, amplified by 1 / a_t over the loop
    lowest = max(sample_dtype, output_dtype, ours.dtype, key=lambda d: torch.finfo(d).eps)
    assert_close(ours, stock, dtype=lowest, scale=10.0)


FORMS = {
    "numpy": lambda t: (0.3 * BASE + t / 1000).numpy(),
    "numpy-float64": lambda t: (0.3 * BASE + t / 1000).double().numpy(),
    "0-d": lambda t: t.float() / 1000 - 0.4,
    "float": lambda t: float(t) / 1000 - 0.4,
    "broadcast": lambda t: (0.3 * BASE + t / 1000)[:1, :, :1, :1],
}


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("form", FORMS)
def test_model_output_forms_diffusers_takes(algorithm_type, form):
    # NumPy arrays, 0-d tensors, Python floats and outputs that broadcast to the sample: diffusers' epsilon
    # conversion takes them; ours gives its samples, in its dtype (it failed with AttributeError / the op's shape
    # message). With "sample" diffusers fails on some of them (a NumPy dtype in .to(), a 0-d noise shape); ours takes
    # the same forms there, as their tensor. Checked to fail without _model_output_tensor's conversion.
    config = dict(algorithm_type=algorithm_type, solver_order=2)
    ours = _fixed_output_loop(DPMSolverMultistepGMMScheduler(**config), torch.float32, FORMS[form])
    stock = _fixed_output_loop(diffusers.DPMSolverMultistepScheduler(**config), torch.float32, FORMS[form])
    assert ours.dtype == stock.dtype
    assert_close(ours, stock, kind="f32_loop_upstream")
    config["prediction_type"] = "sample"

    def as_tensor(t):
        return torch.as_tensor(FORMS[form](t)).expand(SHAPE)

    ours = _fixed_output_loop(DPMSolverMultistepGMMScheduler(**config), torch.float32, FORMS[form])
    same = _fixed_output_loop(DPMSolverMultistepGMMScheduler(**config), torch.float32, as_tensor)
    assert_close(ours, same, kind="exact")


REAL = "model_output must be a real floating-point tensor"


@pytest.mark.parametrize(
    "output, error, match",
    [
        (torch.ones(SHAPE, dtype=torch.int32), TypeError, f"{REAL}, got torch.int32"),
        (torch.ones(SHAPE, dtype=torch.bool), TypeError, f"{REAL}, got torch.bool"),
        (torch.ones(SHAPE, dtype=torch.complex64), TypeError, f"{REAL}, got torch.complex64"),
        (np.ones(SHAPE, dtype=np.int64), TypeError, f"{REAL}, got torch.int64"),
        ([0.1], TypeError, f"{REAL}, got list"),
        (
            torch.ones(3, 3),
            ValueError,
            "model_output must have the sample's shape \\(2, 3, 4, 4\\) or one that broadcasts",
        ),
    ],
    ids=["int", "bool", "complex", "numpy-int", "list", "shape"],
)
def test_model_outputs_that_are_not_real_floats_are_refused(output, error, match):
    # An int / bool output: diffusers' "sample" prediction returns an int sample (or fails on bool), its epsilon
    # one a float sample from the integer values; a noise or data prediction is real-valued, so ours refuses them
    # all naming model_output, before any noise is drawn or the step counter moves.
    s = DPMSolverMultistepGMMScheduler(algorithm_type="sde-dpmsolver++")
    s.set_timesteps(7)
    x = torch.zeros(SHAPE)
    with pytest.raises(error, match=match):
        s.step(output, s.timesteps[0], x)
    assert s.step_index is None
    with pytest.raises(TypeError, match="sample must be a torch.Tensor, got ndarray"):
        s.step(x, s.timesteps[0], x.numpy())


# ---- degenerate schedules ------------------------------------------------------------------------------------


def test_sde_timesteps_must_decrease():
    # Increasing custom timesteps with the SDE: the noise std b_s sqrt(1 - e^-2h) has h < 0 (diffusers: NaN samples;
    # ours failed at set_timesteps with "math domain error"). ValueError naming timesteps at set_timesteps; the ODE
    # (which runs either way) is accepted. Checked to fail without set_timesteps' _check_decreasing call.
    s = DPMSolverMultistepGMMScheduler(algorithm_type="sde-dpmsolver++")
    with pytest.raises(ValueError, match="timesteps must decrease with algorithm_type='sde-dpmsolver\\+\\+'"):
        s.set_timesteps(timesteps=[100, 300, 500, 700])
    DPMSolverMultistepGMMScheduler().set_timesteps(timesteps=[100, 300, 500, 700])
    s.set_timesteps(timesteps=[700, 500, 300, 100])


@pytest.mark.parametrize(
    "config, named",
    [
        (dict(beta_end=0.999), "beta_end=0.999"),  # alphas_cumprod reaches 0: sigma = inf
        (dict(beta_end=0.999, use_karras_sigmas=True), "use_karras_sigmas=True"),  # NaN
        (dict(use_flow_sigmas=True, flow_shift=0.0, prediction_type="flow_prediction"), "flow_shift=0.0"),  # zeros
        (dict(use_flow_sigmas=True, flow_shift=float("inf"), prediction_type="flow_prediction"), "flow_shift=inf"),
    ],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++"])
def test_degenerate_schedule_refused_at_set_timesteps(config, named, algorithm_type):
    # diffusers gives non-finite samples or fails at the last step (IndexError); ours gave non-finite samples, a
    # ZeroDivisionError at set_timesteps or "past the end" at the last step. ValueError at set_timesteps naming the
    # sigmas and the config keys. Checked to fail without set_timesteps' check_multistep_sigmas call.
    s = DPMSolverMultistepGMMScheduler(**config, algorithm_type=algorithm_type)
    with pytest.raises(ValueError, match=f"sigmas must be finite and > 0.*{named}"):
        s.set_timesteps(7)
