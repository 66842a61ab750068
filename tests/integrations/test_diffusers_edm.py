"""EDMEulerGMMScheduler and EDMDPMSolverMultistepGMMScheduler: whole-loop parity with diffusers' EDM schedulers (GMM
off) over their config options, judged against diffusers' arithmetic in float64; custom sigmas, mid-schedule starts,
generators, save / load, a compiled loop; the SDE-GMM one-step moments; refusals and bad input."""

import math
import sys
from unittest import mock

import pytest
import torch

pytest.importorskip("diffusers")
import diffusers  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

import ddim_gmm_ext as dg  # noqa: E402
from ddim_gmm_ext.diffusers import EDMDPMSolverMultistepGMMScheduler, EDMEulerGMMScheduler  # noqa: E402
from tests.helpers import MC_SIGMAS_WIDE, assert_close, assert_loop_error_within, assert_within  # noqa: E402
from tests.integrations.test_diffusers_dpm_multistep import _TorchWithFloat64Upcast  # noqa: E402

SHAPE = (2, 3, 4, 4)
Stock = {
    EDMEulerGMMScheduler: diffusers.EDMEulerScheduler,
    EDMDPMSolverMultistepGMMScheduler: diffusers.EDMDPMSolverMultistepScheduler,
}


def _model(inp, t):
    """A smooth "network" of the preconditioned input c_in x and the noise level t = log(sigma) / 4."""
    return 0.8 * torch.tanh(inp) + 0.05 * torch.sin(3 * inp) + 0.02 * t


def _start(scheduler):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma


def _loop(scheduler, steps, seed=1, x=None, begin=0, **set_kwargs):
    """Final sample of a pipeline-style loop (scale_model_input, model, step) with one seeded generator."""
    scheduler.set_timesteps(steps, **set_kwargs)
    if begin:
        scheduler.set_begin_index(begin)
    x = _start(scheduler) if x is None else x
    gen = torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps[begin:]:
        inp = scheduler.scale_model_input(x, t)
        x = scheduler.step(_model(inp, t), t, x, generator=gen).prev_sample
    return x


def _loop64(scheduler, steps, seed=1, begin=0, **set_kwargs):
    """The oracle of _loop: diffusers' scheduler computing in float64 (its float32 sigmas cast after set_timesteps,
    its float32 upcast made float64), from _loop's start and with _loop's noise (drawn in float32 from the same
    generator, as the float32 loop draws it)."""
    scheduler.set_timesteps(steps, **set_kwargs)
    scheduler.sigmas = scheduler.sigmas.double()
    if begin:
        scheduler.set_begin_index(begin)
    x = _start(scheduler).double()
    gen = torch.Generator().manual_seed(seed)
    module = sys.modules[type(scheduler).__module__]

    def noise32(shape, generator=None, device=None, dtype=None):
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    with (
        mock.patch.object(module, "torch", _TorchWithFloat64Upcast()),
        mock.patch.object(module, "randn_tensor", noise32),
    ):
        for t in scheduler.timesteps[begin:]:
            inp = scheduler.scale_model_input(x, t)
            x = scheduler.step(_model(inp, t.double()), t, x, generator=gen).prev_sample
    return x


def _assert_matches_stock(cls, config, steps, **kwargs):
    """Ours within LOOP_ERROR_FACTOR of diffusers' float32 error against its float64 arithmetic; where diffusers'
    float32 loop is NaN and its float64 one is not (h rounds to 0 in float32), ours within float32 rounding of the
    float64 one."""
    ours = _loop(cls(**config), steps, **kwargs)
    stock = _loop(Stock[cls](**config), steps, **kwargs)
    oracle = _loop64(Stock[cls](**config), steps, **kwargs)
    if bool(stock.isnan().any()) and bool(oracle.isfinite().all()):
        assert_close(ours.double(), oracle, kind="f32_loop_upstream")
    else:
        assert_loop_error_within(ours, stock, oracle)


# ---- EDM Euler --------------------------------------------------------------------------------------------------

EULER_CONFIGS = [
    {},
    {"prediction_type": "v_prediction"},
    {"sigma_schedule": "exponential"},
    {"final_sigmas_type": "sigma_min", "sigma_data": 1.3, "rho": 5.0},
    {"sigma_min": 0.03, "sigma_max": 14.6, "prediction_type": "v_prediction", "sigma_data": 1.0},  # CosXL-like
]


# Checked to fail: the x weight (H1 = X) scaled by 1 + 1e-4, and b_t without the sign of the prediction type (every
# v_prediction config).
@pytest.mark.parametrize("config", EULER_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("steps", [7, 30])
def test_euler_whole_loop_matches_diffusers(config, steps):
    _assert_matches_stock(EDMEulerGMMScheduler, config, steps)


def test_euler_custom_sigmas_and_mid_schedule_start():
    # set_timesteps(sigmas=...) is the stock class's ramp in [0, 1]; a list is taken too (diffusers fails on one
    # with AttributeError); a run from a begin index
    ramp = torch.tensor([0.0, 0.2, 0.45, 0.7, 0.9, 1.0])
    _assert_matches_stock(EDMEulerGMMScheduler, {}, None, sigmas=ramp)
    ours = _loop(EDMEulerGMMScheduler(), None, sigmas=ramp.tolist())
    assert_close(ours, _loop(diffusers.EDMEulerScheduler(), None, sigmas=ramp), kind="f32_loop_upstream")
    _assert_matches_stock(EDMEulerGMMScheduler, {}, 11, begin=4)


def test_euler_churn_and_given_x0_and_training_sigmas():
    # s_churn > 0: the stock step (noise from the generator); pred_original_sample given: the op takes it; no
    # set_timesteps: the stock class steps on its 1000 training sigmas, ours on the same rows
    kw = {"s_churn": 2.0, "s_tmin": 0.05, "s_tmax": 50.0}

    def churn(s):
        s.set_timesteps(9)
        x, gen = _start(s), torch.Generator().manual_seed(2)
        for t in s.timesteps:
            x = s.step(_model(s.scale_model_input(x, t), t), t, x, generator=gen, **kw).prev_sample
        return x

    torch.testing.assert_close(churn(EDMEulerGMMScheduler()), churn(diffusers.EDMEulerScheduler()))

    def given(s):
        s.set_timesteps(7)
        x = _start(s)
        outs = []
        for t in s.timesteps:
            s.scale_model_input(x, t)
            x0 = 0.3 * torch.tanh(x / 10)
            out = s.step(torch.zeros_like(x), t, x, pred_original_sample=x0)
            assert out.pred_original_sample is x0  # returned as given, as the stock step does
            outs.append(out.pred_original_sample)
            x = out.prev_sample
        return x, outs

    (ours, ours_x0), (stock, stock_x0) = given(EDMEulerGMMScheduler()), given(diffusers.EDMEulerScheduler())
    assert_close(ours, stock, kind="f32_loop_upstream")
    for a, b in zip(ours_x0, stock_x0, strict=True):
        assert_close(a, b, kind="f32_loop_upstream")

    def training(s):
        x = _start(s)
        for t in s.timesteps[:5]:
            x = s.step(_model(s.scale_model_input(x, t), t), t, x).prev_sample
        return x

    assert_close(training(EDMEulerGMMScheduler()), training(diffusers.EDMEulerScheduler()), kind="f32_loop_upstream")


# ---- EDM DPM-Solver++ -------------------------------------------------------------------------------------------


def _dpm_grid():
    for algorithm in ("dpmsolver++", "sde-dpmsolver++"):
        for order in (1, 2, 3):
            for solver_type in ("midpoint", "heun"):
                for pred, schedule in (("epsilon", "karras"), ("v_prediction", "exponential")):
                    yield dict(algorithm_type=algorithm, solver_order=order, solver_type=solver_type,
                               prediction_type=pred, sigma_schedule=schedule)  # fmt: skip


def _steps(config, steps):
    """diffusers' SDE has no third-order update: with lower_order_final, 4 steps never reach one."""
    return 4 if config["algorithm_type"] == "sde-dpmsolver++" and config["solver_order"] == 3 else steps


# Checked to fail: the SDE's e^-h left out of the x weight, the noise std scaled by 1 + 1e-3, the h1 term's weight
# scaled by 1 + 1e-3, and the third order's h2 term left out.
@pytest.mark.parametrize("steps", [7, 13])
@pytest.mark.parametrize("config", list(_dpm_grid()), ids=lambda c: "-".join(str(v) for v in c.values()))
def test_dpm_whole_loop_matches_diffusers(config, steps):
    _assert_matches_stock(EDMDPMSolverMultistepGMMScheduler, config, _steps(config, steps))


DPM_OPTIONS = [
    {"thresholding": True, "sample_max_value": 1.5, "dynamic_thresholding_ratio": 0.9, "solver_order": 3},
    {"thresholding": True, "algorithm_type": "sde-dpmsolver++", "prediction_type": "v_prediction"},
    {"euler_at_final": True},
    {"lower_order_final": False, "solver_order": 3},
    # the last step goes from sigma_min to sigma_min: h = 0 in diffusers' float32 lambdas (NaN samples with heun and
    # at third order), h = -2e-7 in float64 (ours: the float64 step, nearly the identity)
    {"lower_order_final": False, "final_sigmas_type": "sigma_min", "solver_type": "heun"},
    {"lower_order_final": False, "final_sigmas_type": "sigma_min", "solver_order": 3},
    {"final_sigmas_type": "sigma_min", "solver_order": 3},
    {"sigma_min": 0.03, "sigma_max": 14.6, "sigma_data": 1.0, "rho": 5.0, "algorithm_type": "sde-dpmsolver++"},
    {"algorithm_type": "deis", "final_sigmas_type": "sigma_min"},  # diffusers maps it to dpmsolver++
]


# Checked to fail with the thresholding path skipping _threshold_sample.
@pytest.mark.parametrize("steps", [7, 13])
@pytest.mark.parametrize("config", DPM_OPTIONS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_dpm_options_match_diffusers(config, steps):
    _assert_matches_stock(EDMDPMSolverMultistepGMMScheduler, config, steps)


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++"])
def test_dpm_mid_schedule_starts_restart_the_order(algorithm_type):
    # set_begin_index, and an add_noise start found from the timestep (diffusers' img2img): the order count
    # restarts at the run's first step. Checked to fail without _index's _restart_rows call.
    config = dict(algorithm_type=algorithm_type, solver_order=2 if algorithm_type.startswith("sde") else 3)
    _assert_matches_stock(EDMDPMSolverMultistepGMMScheduler, config, 13, begin=5)

    def noised(s):
        s.set_timesteps(10)
        ts = s.timesteps[5:]
        x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * 0.5
        x = s.add_noise(x0, torch.randn(SHAPE, generator=torch.Generator().manual_seed(4)), ts[:1])
        gen = torch.Generator().manual_seed(5)
        for t in ts:
            x = s.step(_model(s.scale_model_input(x, t), t), t, x, generator=gen).prev_sample
        return x

    ours = noised(EDMDPMSolverMultistepGMMScheduler(**config))
    assert_close(ours, noised(diffusers.EDMDPMSolverMultistepScheduler(**config)), kind="f32_loop_upstream")


def test_dpm_noise_drawn_as_diffusers_draws_it():
    # a generator per sample, and the global RNG without one (GMM off, seed None): the stock class's samples and
    # the global RNG left where the stock class leaves it. Checked to fail with the noise drawn in float32 from a
    # float64 sample (diffusers draws in the data prediction's dtype).
    config = dict(algorithm_type="sde-dpmsolver++")

    def run(s, dtype=torch.float32, per_sample=False):
        s.set_timesteps(6)
        x = _start(s).to(dtype)
        gen = [torch.Generator().manual_seed(k) for k in range(SHAPE[0])] if per_sample else None
        torch.manual_seed(7)
        for t in s.timesteps:
            x = s.step(_model(s.scale_model_input(x, t), t), t, x, generator=gen).prev_sample
        return x, torch.rand(1)

    for kw in ({}, {"dtype": torch.float64}, {"per_sample": True}):
        (ours, after), (stock, after_stock) = (
            run(EDMDPMSolverMultistepGMMScheduler(**config), **kw),
            run(diffusers.EDMDPMSolverMultistepScheduler(**config), **kw),
        )
        assert ours.dtype == stock.dtype and torch.equal(after, after_stock)
        assert_close(ours, stock, kind="f32_loop_upstream")


@pytest.mark.parametrize("cls", [EDMEulerGMMScheduler, EDMDPMSolverMultistepGMMScheduler])
@pytest.mark.parametrize("output_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_output_dtype_is_diffusers(cls, output_dtype):
    # a float32 sample with a half / float64 model output: the stock class's result dtype (Euler: the model
    # output's; DPM: the promoted one)
    def run(s):
        s.set_timesteps(5)
        x = _start(s)
        for t in s.timesteps:
            x = s.step(_model(s.scale_model_input(x, t), t).to(output_dtype), t, x).prev_sample
        return x

    ours, stock = run(cls()), run(Stock[cls]())
    assert ours.dtype == stock.dtype
    assert_close(ours, stock, dtype=output_dtype if output_dtype != torch.float64 else torch.float32, scale=10.0)


# ---- configs, save / load, compile -------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [EDMEulerGMMScheduler, EDMDPMSolverMultistepGMMScheduler])
def test_from_config_both_ways_and_save_load(tmp_path, cls):
    stock = Stock[cls](sigma_schedule="exponential", sigma_data=1.0, prediction_type="v_prediction")
    gmm = dict(gmm_variant="ortho", seed=4) if cls is EDMDPMSolverMultistepGMMScheduler else {}
    if gmm:
        stock = Stock[cls].from_config(stock.config, algorithm_type="sde-dpmsolver++")
    ours = cls.from_config(stock.config, **gmm)
    assert isinstance(ours, cls) and ours.config.sigma_schedule == "exponential"
    back = Stock[cls].from_config(ours.config)
    assert type(back) is Stock[cls] and back.config.sigma_data == 1.0
    ours.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(ours.config)
    assert Stock[cls] in ours.compatibles
    assert_close(_loop(loaded, 7), _loop(ours, 7), kind="exact")


@pytest.mark.parametrize(
    "cls, config",
    [
        (EDMEulerGMMScheduler, {}),
        (EDMDPMSolverMultistepGMMScheduler, {"solver_order": 3}),
        (EDMDPMSolverMultistepGMMScheduler, dict(algorithm_type="sde-dpmsolver++", gmm_variant="ortho", seed=1)),
    ],
    ids=["euler", "dpm-order3", "sde-gmm"],
)
def test_compiled_loop_from_the_first_call(cls, config):
    # model + step compiled with fullgraph from the first call, scale_model_input eager as pipelines call it (the
    # host step counter advances, so each step is its own graph). Checked to fail with the DPM step's result dtype
    # from torch.result_type (a graph break under fullgraph: it returns no tensor).
    torch._dynamo.reset()
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))

    def denoise(s, y, inp, t):
        with torch.no_grad():
            return s.step(torch.tanh(inp) + t / 10, t, y).prev_sample

    def loop(fn):
        s = cls(**config)
        s.set_timesteps(5)
        s.prepare_gmm(x0)
        y = x0 * s.init_noise_sigma
        for t in s.timesteps:
            y = fn(s, y, s.scale_model_input(y, t), t)
        return y

    expected = loop(denoise)
    with torch._dynamo.config.patch(recompile_limit=16):
        actual = loop(torch.compile(denoise, fullgraph=True))
    assert torch.isfinite(actual).all()
    assert_close(actual, expected, kind="f32")


# ---- the SDE-GMM step ---------------------------------------------------------------------------------------------

N_MC = 20000
STEP = 1  # sigma 4.18 -> 1.54: c^2 = 2.05, g^2 = 3.37 (g^2 v_k <= c^2 at gmm_scale 1)


def _sde_step(gmm_params=None, n=N_MC, gmm=True):
    """n samples of one second-order SDE step (step 1 of 7) from one x_t and history with the mixture (or, gmm
    False, with diffusers' Gaussian noise); and the stock class's mean of that step and its noise std c."""
    D = 16
    config = dict(algorithm_type="sde-dpmsolver++", sigma_max=10.0)
    mixture = dict(gmm_variant="ortho", gmm_n_components=4, gmm_scale=1.0, seed=7, final_step="gmm")
    s = EDMDPMSolverMultistepGMMScheduler(**config, **(mixture if gmm else {}))
    s.set_timesteps(7)
    if gmm_params is not None:
        s.set_gmm_params(gmm_params)
    g = torch.Generator().manual_seed(0)
    x, m, h0 = (torch.randn(1, D, generator=g).expand(n, D).contiguous() for _ in range(3))
    x = 3 * x
    i = STEP
    s._step_index, s.lower_order_nums, s.model_outputs = i, 1, [h0, h0]
    out = s.step(m, s.timesteps[i], x).prev_sample
    # the stock step's mean: its output minus c z, z replayed from its generator
    stock = diffusers.EDMDPMSolverMultistepScheduler(**config)
    stock.set_timesteps(7)
    stock._step_index, stock.lower_order_nums, stock.model_outputs = i, 1, [h0[:1].double(), h0[:1].double()]
    prev = stock.step(m[:1].double(), stock.timesteps[i], x[:1].double(), generator=torch.Generator().manual_seed(9))
    z = torch.randn(1, D, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    c = float(s._rows[i, 4])
    return out, prev.prev_sample[0] - c * z[0], c, s


def test_sde_gmm_step_matches_the_sde_moments():
    # Where nothing clips (g^2 v_k <= c^2), the mixture step has the stock SDE step's mean and per-coordinate
    # variance c^2 (the GMM-off step's mean too). Checked to fail with the noise std column scaled by 1.1 (variance)
    # and with H2 = X zeroed (mean).
    out, target_mean, c, s = _sde_step()
    i = STEP
    g = float(s._rows[i, 5])
    v = s.gmm.tables(torch.empty(0))[2][i]
    assert (g * g * v <= c * c).all(), "the oracle needs an unclipped step"
    assert_within(out.double().mean(0), target_mean, MC_SIGMAS_WIDE * c / math.sqrt(N_MC))
    var = out.double().var(0)
    assert_within(var, torch.full_like(var, c * c), MC_SIGMAS_WIDE * c * c * math.sqrt(2 / N_MC))
    gauss, gauss_mean, _, _ = _sde_step(gmm=False)
    assert_within(gauss.double().mean(0), gauss_mean, MC_SIGMAS_WIDE * c / math.sqrt(N_MC))


def test_the_moment_oracle_catches_an_uncompensated_mixture():
    # Planted mutation: the same offsets with zero variance offsets (the Gaussian noise not reduced): the variance
    # exceeds c^2, and the oracle above must say so.
    _, _, _, s = _sde_step(n=10)
    priors, offsets, var, _ = s.gmm.tables(torch.empty(0))
    mutated = dg.GMM.from_params(priors, offsets, torch.zeros_like(var), n_steps=priors.shape[0])
    out, _, c, _ = _sde_step(gmm_params=mutated)
    var_m = out.double().var(0)
    with pytest.raises(AssertionError):
        assert_within(var_m, torch.full_like(var_m, c * c), MC_SIGMAS_WIDE * c * c * math.sqrt(2 / N_MC))


def test_sde_gmm_loops_with_gmm_steps_final_step_and_generator():
    # gmm_steps and final_step act as on DDIM; a generator draws z then the components (reproducible); each
    # setting changes the samples. Checked to fail with the final_step rule left out of the g column.
    base = dict(algorithm_type="sde-dpmsolver++", gmm_variant="ortho", gmm_n_components=3, seed=2)

    def run(seed=1, **kw):
        return _loop(EDMDPMSolverMultistepGMMScheduler(**base, **kw), 7, seed=seed)

    plain = _loop(EDMDPMSolverMultistepGMMScheduler(algorithm_type="sde-dpmsolver++"), 7)
    every, first_two, last = run(), run(gmm_steps=[0, 1]), run(final_step="gmm")
    assert torch.equal(every, run())
    for a, b in ((every, plain), (every, first_two), (every, last), (first_two, plain)):
        assert not torch.allclose(a, b)
    s = EDMDPMSolverMultistepGMMScheduler(**base, gmm_steps="matched")
    assert torch.isfinite(_loop(s, 7)).all()


# ---- refusals and bad input ---------------------------------------------------------------------------------------

NO_NOISE = "no noise to replace"


def test_gmm_on_a_deterministic_configuration_is_refused():
    # EDM Euler (s_churn = 0) and EDM DPM-Solver++ with dpmsolver++ have no noise for a mixture to replace.
    table = dg.GMM.create(48, n_components=2, n_steps=7, variant="ortho", seed=0)
    with pytest.raises(ValueError, match=f"set_gmm_params: EDMEulerGMMScheduler is deterministic.*{NO_NOISE}"):
        EDMEulerGMMScheduler().set_gmm_params(table)
    with pytest.raises(ValueError, match=f"gmm_variant='ortho' needs algorithm_type='sde-dpmsolver\\+\\+'.*{NO_NOISE}"):
        EDMDPMSolverMultistepGMMScheduler(gmm_variant="ortho")
    with pytest.raises(ValueError, match=f"set_gmm_params needs.*{NO_NOISE}"):
        EDMDPMSolverMultistepGMMScheduler(algorithm_type="deis", final_sigmas_type="sigma_min").set_gmm_params(table)


@pytest.mark.parametrize("cls", [EDMEulerGMMScheduler, EDMDPMSolverMultistepGMMScheduler])
@pytest.mark.parametrize(
    "config, match",
    [
        (dict(prediction_type="sample"), "prediction_type must be 'epsilon' or 'v_prediction'"),
        (dict(sigma_data=0.0), "sigma_data must be a finite number > 0"),
        (dict(sigma_data=float("nan")), "sigma_data must be a finite number > 0"),
        (dict(sigma_schedule="linear"), "sigma_schedule must be 'karras' or 'exponential', got 'linear'"),
        (dict(final_sigmas_type="last"), "final_sigmas_type must be 'zero' or 'sigma_min'"),
    ],
)
def test_bad_config_named(cls, config, match):
    # diffusers: a ValueError at the first step (prediction type), UnboundLocalError (DPM, sigma_schedule), NaN
    # samples or nothing. Checked to fail without _check_edm_config.
    with pytest.raises(ValueError, match=match):
        cls(**config)


@pytest.mark.parametrize("order", [0, 4, True])
def test_bad_solver_order_named(order):
    with pytest.raises(ValueError, match=f"solver_order must be 1, 2 or 3, got {order}"):
        EDMDPMSolverMultistepGMMScheduler(solver_order=order)


@pytest.mark.parametrize("cls", [EDMEulerGMMScheduler, EDMDPMSolverMultistepGMMScheduler])
def test_bad_arguments_named_before_any_work(cls):
    s = cls()
    x = torch.zeros(SHAPE)
    for bad in (0, -3, True):
        with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1"):
            s.set_timesteps(bad)
    s.set_timesteps(5)
    t = s.timesteps[0]
    with pytest.raises(TypeError, match="model_output must be a real floating-point tensor, got torch.int32"):
        s.step(x.int(), t, x)
    with pytest.raises(ValueError, match="model_output must have the sample's shape"):
        s.step(torch.zeros(3, 3), t, x)
    with pytest.raises(TypeError, match="sample must be a torch.Tensor, got ndarray"):
        s.step(x, t, x.numpy())
    assert s.step_index is None  # nothing moved
    for t in s.timesteps:
        x = s.step(x, t, x).prev_sample
    with pytest.raises(ValueError, match="past the end of the 5-step schedule"):
        s.step(x, t, x)


def test_bad_schedules_refused():
    # sigma_min = 0 puts a zero sigma before the end (diffusers: NaN samples); the SDE with a rising sigma (NaN);
    # the SDE's third order (diffusers: UnboundLocalError at that step) and a second-order step between equal
    # sigmas (sigma_min = sigma_max, whose equal timesteps start the run at step 1; diffusers: NaN) at that step,
    # before it draws or moves anything.
    with pytest.raises(ValueError, match="sigmas must be finite and > 0.*sigma_min=0"):
        EDMEulerGMMScheduler(sigma_min=0.0).set_timesteps(5)
    with pytest.raises(ValueError, match="sigmas must be finite and > 0.*the sigmas argument"):
        EDMEulerGMMScheduler(sigma_min=0.0).set_timesteps(sigmas=[0.0, 1.0])
    with pytest.raises(ValueError, match="must not rise with algorithm_type='sde-dpmsolver\\+\\+'"):
        EDMDPMSolverMultistepGMMScheduler(algorithm_type="sde-dpmsolver++", sigma_min=5.0, sigma_max=1.0).set_timesteps(
            5
        )
    s = EDMDPMSolverMultistepGMMScheduler(algorithm_type="sde-dpmsolver++")
    s.set_timesteps(5)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        s.step(torch.zeros(SHAPE), s.timesteps[0], torch.zeros(SHAPE), generator=3)
    for config, steps, match in (
        (dict(algorithm_type="sde-dpmsolver++", solver_order=3), 7, "solver_order=3 with algorithm_type='sde-dpm"),
        (
            dict(sigma_min=1.0, sigma_max=1.0, final_sigmas_type="sigma_min"),
            7,
            "step 2 of 7 goes from sigma 1 to 1 \\(h = 0\\)",
        ),
    ):
        s = EDMDPMSolverMultistepGMMScheduler(**config)
        s.set_timesteps(steps)
        x = _start(s)
        with pytest.raises(ValueError, match=match):
            for t in s.timesteps:
                i = s.step_index
                x = s.step(_model(s.scale_model_input(x, t), t), t, x).prev_sample
        assert s.step_index == i and torch.isfinite(x).all()
