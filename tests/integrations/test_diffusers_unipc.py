"""UniPCMultistepGMMScheduler against diffusers' UniPCMultistepScheduler: whole loops over a covering set of the
options (not their full product), the mid-schedule start, a pipeline that edits the sample between steps, configs,
the compiled loop and the refusals."""

import itertools

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
import diffusers  # noqa: E402

from ddim_gmm_ext.diffusers import UniPCMultistepGMMScheduler  # noqa: E402
from tests.helpers import MIXED_DTYPES, assert_close, assert_loop_error_within  # noqa: E402

SHAPE = (2, 3, 4, 4)
# A fixed linear "model" per prediction type, near a denoiser of data at 0 so that loops stay O(1).
WEIGHTS = {"epsilon": 0.9, "sample": 0.1, "v_prediction": 0.5, "flow_prediction": 0.8}
SIGMAS = {
    "default": {},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
    "flow": {"use_flow_sigmas": True, "flow_shift": 3.0},
}
PREDICTIONS = ["epsilon", "sample", "v_prediction", "flow_prediction"]


def _model(x, t, prediction_type):
    return WEIGHTS[prediction_type] * x + 1e-4 * t.float() - 0.05


def _loop(scheduler, steps, start=None, edit=False):
    """Final sample of a whole loop (from step ``start`` with set_begin_index; ``edit``: the sample is changed
    between steps, as inpainting pipelines blend in the known region)."""
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    if start is not None:
        scheduler.set_begin_index(start)
        timesteps = timesteps[start:]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    pred = scheduler.config.prediction_type
    for t in timesteps:
        x = scheduler.step(_model(x, t, pred), t, x).prev_sample
        if edit:
            x = torch.cat([x[:, :1].clamp(-0.5, 0.5), x[:, 1:]], 1)
    return x


def _grid():
    """Every (solver_order, solver_type, predict_x0) with every sigma schedule, the prediction type cycling so
    that each pairs with each schedule. Without predict_x0 (the history is the noise prediction) the float32 loops
    are ill-conditioned on some schedules, in diffusers as here: flow sigmas start at a = 1e-6 (X = a_1 / a_0 ~ 1e5:
    diffusers' float32 loop is 600 off its own float64 arithmetic), "sample" divides by b_t (1.5e-3 off at
    sigma_min 0.03), beta sigmas' order-3 rho solve in float32 (3.5e-4 off); those are checked in float64 against
    diffusers' arithmetic in float64 (test_float64_loop_matches_unipc_in_float64). "zero" final sigmas give NaN
    in diffusers there (test_nan_where_diffusers_gives_nan): sigma_min."""
    for n, (order, solver, px0) in enumerate(itertools.product([1, 2, 3], ["bh1", "bh2"], [True, False])):
        for m, sigmas in enumerate(SIGMAS):
            if not px0 and sigmas in ("flow", "beta"):
                continue
            preds = PREDICTIONS if px0 else ["epsilon", "v_prediction"]
            final = "zero" if px0 and solver == "bh2" else "sigma_min"  # bh1 to sigma 0: see the NaN test
            yield (
                dict(
                    solver_order=order,
                    solver_type=solver,
                    predict_x0=px0,
                    prediction_type=preds[(n + m) % len(preds)],
                    final_sigmas_type=final,
                )
                | SIGMAS[sigmas]
            )


GRID = list(_grid())


def _assert_matches_stock(config, steps):
    """Our float32 loop against diffusers' float32 loop, both judged against diffusers' arithmetic in float64: the
    rho solve on beta sigmas and 1 / a_t amplify float32 rounding by a CPU-dependent amount (tests.helpers)."""
    ours = _loop(UniPCMultistepGMMScheduler(**config), steps)
    stock = _loop(diffusers.UniPCMultistepScheduler(**config), steps)
    oracle = _loop64(diffusers.UniPCMultistepScheduler(**config), steps)
    assert_loop_error_within(ours, stock, oracle)


# Checked to fail: with the corrector's last rho left out (D1_t), with the h2 sum using last_sample alone (M_{i-2}
# dropped: orders 2 and 3 with the corrector on), with rhos_p = rhos_c[:-1] for order 2 (diffusers' 0.5), with the
# x0 history under predict_x0=False, and with the predictor's order-3 rho of M_{j-2} scaled by 1 + 1e-3 in _interval
# (a row coefficient off by 1e-3 relative).
@pytest.mark.parametrize("steps", [7, 13])
@pytest.mark.parametrize("config", GRID, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_whole_loop_matches_unipc(config, steps):
    _assert_matches_stock(config, steps)


OPTIONS = [
    {"thresholding": True, "sample_max_value": 1.5, "dynamic_thresholding_ratio": 0.9},
    {"thresholding": True, "solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
    {"lower_order_final": False, "final_sigmas_type": "sigma_min", "solver_order": 3},
    {"lower_order_final": False, "final_sigmas_type": "sigma_min", "solver_order": 2, "predict_x0": False},
    {"disable_corrector": [0, 2, 3], "solver_order": 3},
    {"disable_corrector": [1], "solver_order": 2, "predict_x0": False, "final_sigmas_type": "sigma_min"},
    {"predict_x0": False, "prediction_type": "sample", "solver_order": 1, "final_sigmas_type": "sigma_min"},
    {"timestep_spacing": "trailing", "beta_schedule": "scaled_linear"},
    {"timestep_spacing": "leading", "steps_offset": 1, "beta_schedule": "squaredcos_cap_v2"},
    {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    {"use_flow_sigmas": True, "flow_shift": 1.0, "prediction_type": "flow_prediction", "solver_order": 3},
    {"solver_order": 4, "final_sigmas_type": "sigma_min"},  # diffusers' own step
]


@pytest.mark.parametrize("steps", [7, 13])
@pytest.mark.parametrize("config", OPTIONS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_options_match_unipc(config, steps):
    # Checked to fail with the thresholding path skipping _threshold_sample, with disable_corrector ignored by the
    # rows, and with lower_order_final ignored (as the grid does).
    _assert_matches_stock(config, steps)


def _loop64(scheduler, steps):
    """A float64 loop; a stock scheduler computes in float64 too (its float32 sigmas cast after set_timesteps)."""
    scheduler.set_timesteps(steps)
    if type(scheduler) is diffusers.UniPCMultistepScheduler:
        scheduler.sigmas = scheduler.sigmas.double()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).double()  # _loop's start, in float64
    for t in scheduler.timesteps:
        x = scheduler.step(_model(x, t, scheduler.config.prediction_type), t, x).prev_sample
    return x


# Checked to fail with the eps history's "sample" conversion using a_t for b_t.
@pytest.mark.parametrize(
    "config",
    [
        dict(predict_x0=False, prediction_type=pred, solver_order=order, solver_type=solver) | SIGMAS[sigmas]
        for (pred, sigmas), order, solver in zip(
            itertools.product(["sample", "v_prediction", "epsilon"], ["flow", "beta", "karras"]),
            itertools.cycle([3, 2, 1, 3]),
            itertools.cycle(["bh1", "bh2"]),
        )
    ],
    ids=lambda c: "-".join(str(v) for v in c.values()),
)
def test_float64_loop_matches_unipc_in_float64(config):
    # The ill-conditioned float32 cases of _grid, in float64 on both sides: the same arithmetic to 1e-9, 1e-7 on flow
    # sigmas (X = a_1 / a_0 ~ 1e5 amplifies rounding).
    config = config | {"final_sigmas_type": "sigma_min"}
    ours = _loop64(UniPCMultistepGMMScheduler(**config), 7)
    stock = _loop64(diffusers.UniPCMultistepScheduler(**config), 7)
    assert_close(ours, stock, kind="f64_loop_upstream", scale=100.0 if config.get("use_flow_sigmas") else 1.0)


def test_nan_where_diffusers_gives_nan():
    # A step to sigma 0 with predict_x0=False: 0 * inf in diffusers' arithmetic, NaN samples; the fused step's row
    # is NaN too, not a silent finite value. bh1 at order 1 to sigma 0: diffusers computes x0 - alpha B(h) * 0 with
    # B(h) = -inf, NaN; the row (no residual term at order 1) gives the limit x0_hat of the last step, which diffusers
    # keeps as its last model output. Checked to fail with the NaN weights replaced by 0 (predict_x0=False).
    ours = _loop(UniPCMultistepGMMScheduler(predict_x0=False), 7)
    stock = _loop(diffusers.UniPCMultistepScheduler(predict_x0=False), 7)
    assert stock.isnan().all() and ours.isnan().all()
    ours = _loop(UniPCMultistepGMMScheduler(solver_type="bh1"), 7)
    stock_scheduler = diffusers.UniPCMultistepScheduler(solver_type="bh1")
    assert _loop(stock_scheduler, 7).isnan().all()
    assert_close(ours, stock_scheduler.model_outputs[-1], kind="f32_loop_upstream")


@pytest.mark.parametrize("begin", [True, False])
def test_a_run_starting_mid_schedule_restarts_order_and_corrector(begin):
    # set_begin_index (img2img), or a first timestep found in the schedule: diffusers counts orders from the first
    # step taken and has no last_sample there (corrector off). Checked to fail without the restart in _index
    # (begin=False) and in set_begin_index (begin=True): the order-3 corrector rows of a run from step 0.
    def run(s):
        s.set_timesteps(13)
        if begin:
            s.set_begin_index(4)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        for t in s.timesteps[4:]:
            x = s.step(_model(x, t, "epsilon"), t, x).prev_sample
        return x

    stock = run(diffusers.UniPCMultistepScheduler(solver_order=3))
    assert_close(run(UniPCMultistepGMMScheduler(solver_order=3)), stock, kind="f32_loop_upstream")


@pytest.mark.parametrize("predict_x0", [True, False])
def test_an_edited_sample_keeps_diffusers_semantics(predict_x0):
    # The corrector reads last_sample (the previous corrected sample), not the sample passed in: a pipeline that
    # edits the sample between steps gets diffusers' result. Checked to fail with the corrector expressed through
    # the passed sample (x_i^c = x_i + the corrector's residual, equal only for an unedited sample).
    config = dict(solver_order=3, predict_x0=predict_x0, final_sigmas_type="sigma_min")
    ours = _loop(UniPCMultistepGMMScheduler(**config), 7, edit=True)
    stock = _loop(diffusers.UniPCMultistepScheduler(**config), 7, edit=True)
    assert_close(ours, stock, kind="f32_loop_upstream")


def test_state_is_kept_functionally():
    # The op's x0 output becomes the history; the model output and the sample are not modified in place; the
    # diffusers counters advance as the stock class's.
    s = UniPCMultistepGMMScheduler(solver_order=3)
    s.set_timesteps(7)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for t in s.timesteps[:3]:
        m = _model(x, t, "epsilon")
        x_copy, m_copy = x.clone(), m.clone()
        x_next = s.step(m, t, x).prev_sample
        assert torch.equal(x, x_copy) and torch.equal(m, m_copy)
        x = x_next
    assert all(h is not None and h.shape == SHAPE for h in s.model_outputs)
    assert s.lower_order_nums == 3 and s.step_index == 3 and s.this_order == 3
    assert s.last_sample is not None and s.timestep_list[-1] == s.timesteps[2]


# ---- configs ------------------------------------------------------------------------------------------------


def test_from_config_both_ways_and_save_load(tmp_path):
    stock = diffusers.UniPCMultistepScheduler(
        solver_order=3, solver_type="bh1", disable_corrector=[0], final_sigmas_type="sigma_min"
    )
    ours = UniPCMultistepGMMScheduler.from_config(stock.config, predict_x0=False)
    assert ours.config.solver_order == 3 and ours.config.disable_corrector == [0] and not ours.predict_x0
    back = diffusers.UniPCMultistepScheduler.from_config(ours.config)
    assert back.config.solver_type == "bh1" and type(back) is diffusers.UniPCMultistepScheduler
    ours.save_pretrained(tmp_path)
    loaded = UniPCMultistepGMMScheduler.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(ours.config)
    assert diffusers.UniPCMultistepScheduler in ours.compatibles
    assert_close(_loop(loaded, 7), _loop(ours, 7), kind="exact")


# ---- refusals -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(solver_order=0), "solver_order must be an int >= 1, got 0"),
        (dict(solver_order=True), "solver_order must be an int >= 1, got True"),
        (dict(gmm_variant="ortho"), "gmm_variant='ortho': UniPC is deterministic"),
        (dict(prediction_type="x0"), "prediction_type must be"),
        (dict(prediction_type="flow_prediction", predict_x0=False), "needs predict_x0=True"),
        (dict(final_sigmas_type="last"), "final_sigmas_type must be"),
    ],
)
def test_bad_config_named(config, match):
    with pytest.raises(ValueError, match=match):
        UniPCMultistepGMMScheduler(**config)


def test_bad_arguments_named():
    s = UniPCMultistepGMMScheduler()
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 999, x)
    with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1"):
        s.set_timesteps(0)
    s.set_timesteps(7)
    t = s.timesteps[0]
    with pytest.raises(ValueError, match="model_output must have the sample's shape"):
        s.step(torch.zeros(1, 3), t, x)


# ---- degenerate configs ---------------------------------------------------------------------------------------


def test_singular_rho_system_is_refused_where_diffusers_raises():
    # solver_order=3, lower_order_final=False, final_sigmas_type="zero": the last step is an order-3 step to sigma 0,
    # whose rho system is singular. diffusers raises LinAlgError at that step; ours raises a ValueError naming the
    # config keys there, after the same earlier steps, and before writing NaN. A run from step 6 (img2img) has an
    # order-1 last step: no error on either side. Checked to fail without the step's _check_solvable call (an
    # all-NaN sample, no error).
    config = dict(solver_order=3, lower_order_final=False)
    samples = []
    for scheduler in (diffusers.UniPCMultistepScheduler(**config), UniPCMultistepGMMScheduler(**config)):
        scheduler.set_timesteps(7)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        for t in scheduler.timesteps[:-1]:
            x = scheduler.step(_model(x, t, "epsilon"), t, x).prev_sample
        samples.append(x)
        t = scheduler.timesteps[-1]
        with pytest.raises(Exception) as error:
            scheduler.step(_model(x, t, "epsilon"), t, x)
        if isinstance(scheduler, UniPCMultistepGMMScheduler):
            assert error.type is ValueError
            assert "solver_order=3 with lower_order_final=False" in str(error.value)
        else:
            assert isinstance(error.value, torch.linalg.LinAlgError)
    assert torch.isfinite(samples[1]).all()
    assert_close(samples[1], samples[0], kind="f32_loop_upstream")
    ours = _loop(UniPCMultistepGMMScheduler(**config), 7, start=6)
    assert torch.isfinite(ours).all()
    assert_close(ours, _loop(diffusers.UniPCMultistepScheduler(**config), 7, start=6), kind="f32_loop_upstream")
    ours = UniPCMultistepGMMScheduler(**config)
    ours.set_timesteps(7)
    with pytest.raises(ValueError, match="lower_order_final=False"):  # a compiled loop cannot raise at the step
        ours.prepare_gmm(torch.zeros(SHAPE))


DEGENERATE = [
    (dict(beta_end=0.999), None, "beta_end=0.999"),  # alphas_cumprod reaches 0: sigma = inf
    (dict(beta_start=0.5, beta_end=1.0, beta_schedule="scaled_linear"), None, "beta_end=1.0"),
    (dict(use_flow_sigmas=True, flow_shift=0.0, prediction_type="flow_prediction"), None, "flow_shift=0.0"),  # NaN
    (dict(use_flow_sigmas=True, flow_shift=float("nan"), prediction_type="flow_prediction"), None, "flow_shift=nan"),
    (dict(use_flow_sigmas=True, prediction_type="flow_prediction"), (0.9, float("nan"), 0.3), "the sigmas argument"),
    (dict(use_flow_sigmas=True, prediction_type="flow_prediction"), (0.9, 0.0, 0.3), "sigmas\\[1\\] = 0.0"),  # 0 early
]


@pytest.mark.parametrize("config, sigmas, named", DEGENERATE, ids=lambda v: str(v))
def test_degenerate_schedule_refused_at_set_timesteps(config, sigmas, named):
    # Sigmas that are not a point of the path (inf, NaN, 0 before the end): diffusers' loop gives non-finite samples
    # (or fails at a later step); ours refuses at set_timesteps, naming the sigmas and the config keys (it failed at
    # the first step with the op's "H1 = -nan but history0 is None"). Checked to fail without set_timesteps'
    # check_multistep_sigmas call.
    steps, sigmas = (7, None) if sigmas is None else (None, np.array(sigmas))
    stock = diffusers.UniPCMultistepScheduler(**config)
    stock.set_timesteps(steps, sigmas=sigmas)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    try:
        for t in stock.timesteps:
            x = stock.step(_model(x, t, stock.config.prediction_type), t, x).prev_sample
        assert not torch.isfinite(x).all()
    except (AssertionError, IndexError, RuntimeError) as error:
        assert not isinstance(error, AssertionError) or not error.args  # diffusers' own bare assert
    ours = UniPCMultistepGMMScheduler(**config)
    with pytest.raises(ValueError, match=f"sigmas must be finite and > 0.*{named}"):
        ours.set_timesteps(steps, sigmas=sigmas)


@pytest.mark.parametrize("sample_dtype, output_dtype", MIXED_DTYPES)
def test_output_dtype_is_diffusers(sample_dtype, output_dtype):
    # diffusers' UniPC returns the sample's dtype whatever the model output's (its updates end in .to(x.dtype)); so
    # does ours. The model output depends on t only, so that both loops see the same rounded outputs.
    def run(s):
        s.set_timesteps(5)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(sample_dtype)
        base = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
        for t in s.timesteps:
            x = s.step((0.3 * base + t / 1000).to(output_dtype), t, x).prev_sample
        return x

    ours, stock = run(UniPCMultistepGMMScheduler()), run(diffusers.UniPCMultistepScheduler())
    assert ours.dtype == stock.dtype == sample_dtype
    # diffusers rounds sigma_t * model_output to a half output's dtype (a 0-d float32 factor does not promote), ours
    # computes in float32: the two differ by the half dtype's rounding, amplified by 1 / a_t over the loop
    lowest = max(sample_dtype, output_dtype, key=lambda d: torch.finfo(d).eps)
    assert_close(ours, stock, dtype=lowest, scale=10.0)
