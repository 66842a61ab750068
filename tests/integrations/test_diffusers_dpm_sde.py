"""DPMSolverSDEGMMScheduler: whole-loop parity with diffusers' DPMSolverSDEScheduler (the same Brownian tree) over
its config options, mid-schedule starts, save / load, one op call per model evaluation, the mixture's moments on
each noisy stage, compile, bad input."""

import math
from unittest import mock

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("torchsde")
import diffusers  # noqa: E402
from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler  # noqa: E402

import ddim_gmm_ext as dg  # noqa: E402
from ddim_gmm_ext import api  # noqa: E402
from ddim_gmm_ext.diffusers import DPMSolverSDEGMMScheduler  # noqa: E402
from ddim_gmm_ext.gmm import matched_steps  # noqa: E402
from tests.helpers import MC_SIGMAS, MC_SIGMAS_WIDE, assert_close, assert_loop_error_within, assert_within  # noqa: E402

Stock = diffusers.DPMSolverSDEScheduler
SHAPE = (2, 3, 8, 8)
GMM = dict(gmm_variant="ortho", gmm_n_components=3, seed=1)


def _model(x, t):
    return 0.5 * torch.sin(3 * x) + 0.1 * float(t) / 1000


def _loop(scheduler, steps, begin=0, dtype=torch.float32, set_steps=True, **step_kwargs):
    """Final sample of a loop as a pipeline runs it (scale_model_input, model, step) from position ``begin``."""
    if set_steps:
        scheduler.set_timesteps(steps)
    if begin:
        scheduler.set_begin_index(begin)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).to(dtype) * scheduler.sigmas[begin]
    for t in scheduler.timesteps[begin:]:
        inp = scheduler.scale_model_input(x, t)
        x = scheduler.step(_model(inp, t).to(dtype), t, x, **step_kwargs).prev_sample
    return x


CONFIGS = [
    {},
    {"use_karras_sigmas": True},
    {"use_exponential_sigmas": True},
    {"use_beta_sigmas": True},
    {"timestep_spacing": "trailing", "beta_schedule": "scaled_linear"},
    {"timestep_spacing": "leading", "steps_offset": 1, "beta_schedule": "squaredcos_cap_v2"},
    {"prediction_type": "v_prediction", "use_karras_sigmas": True},
    {"trained_betas": torch.linspace(1e-4, 0.02, 1000).tolist(), "num_train_timesteps": 1000},
]


class _Replay:
    """A noise sampler that returns the recorded draws of another run, in order, in float64."""

    def __init__(self, noises):
        self.noises = iter(noises)

    def __call__(self, sigma, sigma_next):
        return next(self.noises).double()


def _assert_matches_stock(config, steps, begin=0):
    """Our float32 loop against diffusers' float32 loop, both judged against diffusers' arithmetic in float64 (its
    float32 sigmas cast after set_timesteps) fed the float32 run's tree draws: x0 = x - sigma m at sigma ~ 150
    amplifies float32 rounding by a CPU-dependent amount (tests.helpers.LOOP_ERROR_FACTOR)."""
    noises = []
    draw = BrownianTreeNoiseSampler.__call__

    def recorded(self, sigma, sigma_next):
        noises.append(draw(self, sigma, sigma_next))
        return noises[-1]

    ours = _loop(DPMSolverSDEGMMScheduler(noise_sampler_seed=3, **config), steps, begin)
    with mock.patch.object(BrownianTreeNoiseSampler, "__call__", recorded):
        stock = _loop(Stock(noise_sampler_seed=3, **config), steps, begin)
    oracle = Stock(**config)
    oracle.set_timesteps(steps)
    oracle.sigmas = oracle.sigmas.double()
    oracle.noise_sampler = _Replay(noises)
    oracle = _loop(oracle, steps, begin, dtype=torch.float64, set_steps=False)
    assert_loop_error_within(ours, stock, oracle)


# Mutations checked: stage 2 from the midpoint sample (history weight r moved into A, r x_m instead of r x) fails
# all 16 cases at 7 and 13 steps; the tree queried at float64 midpoints (sqrt(sigma sigma') rounded once) instead of
# the stock float32 exp(-t_mid) fails 13 of the 24 (the tree's draw moves by about sqrt(1e-7)).
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}" for k in c) or "default")
@pytest.mark.parametrize("steps", [1, 7, 13])
def test_whole_loop_matches_diffusers(config, steps):
    pytest.importorskip("scipy") if config.get("use_beta_sigmas") else None
    _assert_matches_stock(config, steps)


def test_s_noise_and_global_rng_seeded_tree_match_diffusers():
    # noise_sampler_seed None: the tree's seed is drawn from torch's global RNG at the first step, as the stock step
    # draws it; s_noise scales the rows' noise std
    torch.manual_seed(9)
    ours = _loop(DPMSolverSDEGMMScheduler(), 9, s_noise=0.7)
    after_ours = torch.rand(1)
    torch.manual_seed(9)
    stock = _loop(Stock(), 9, s_noise=0.7)
    assert_close(ours, stock, kind="f32_loop_upstream")
    assert torch.equal(after_ours, torch.rand(1))  # the global RNG left where the stock class leaves it


def test_dtypes_follow_the_stock_step():
    for dtype in (torch.float64, torch.float16):
        ours = _loop(DPMSolverSDEGMMScheduler(noise_sampler_seed=2), 5, dtype=dtype)
        assert ours.dtype == dtype
    ours = _loop(DPMSolverSDEGMMScheduler(noise_sampler_seed=2), 5, dtype=torch.float64)
    stock = _loop(Stock(noise_sampler_seed=2), 5, dtype=torch.float64)
    assert_close(ours.float(), stock.float(), kind="f32_loop_upstream")  # stock's coefficients are float32


# Mutation checked: the tree built over the run's sigmas (from its first position) instead of the whole schedule's,
# as the stock step builds it, fails both.
@pytest.mark.parametrize("begin", [2, 6])
def test_mid_schedule_start_matches_diffusers(begin):
    _assert_matches_stock({"use_karras_sigmas": True}, 11, begin)


def test_one_op_call_per_model_evaluation(monkeypatch):
    calls = []
    fused = api.fused_step

    def counting(*args, **kwargs):
        calls.append(kwargs.get("history", ()))
        return fused(*args, **kwargs)

    monkeypatch.setattr(api, "fused_step", counting)
    s = DPMSolverSDEGMMScheduler(noise_sampler_seed=0)
    _loop(s, 6)
    assert len(calls) == len(s.timesteps) == 11
    assert [len(h) for h in calls] == [0, 1] * 5 + [0]  # stage 2 passes the step's original sample as history


def test_save_load_round_trip_and_from_config(tmp_path):
    s = DPMSolverSDEGMMScheduler(use_karras_sigmas=True, noise_sampler_seed=5, final_step="gmm", **GMM)
    s.save_pretrained(tmp_path)
    back = DPMSolverSDEGMMScheduler.from_pretrained(tmp_path)
    assert back.config.gmm_variant == "ortho" and back.config.use_karras_sigmas and back.config.final_step == "gmm"
    torch.testing.assert_close(_loop(back, 7), _loop(s, 7))
    assert isinstance(DPMSolverSDEGMMScheduler.from_config(Stock().config), DPMSolverSDEGMMScheduler)
    stock = Stock.from_config(s.config)  # the stock class loads our config (and ignores the GMM keys)
    assert type(stock) is Stock and stock.config.use_karras_sigmas
    assert DPMSolverSDEGMMScheduler.__name__ not in [c.__name__ for c in Stock().compatibles]  # unpatched


# -- the mixture ------------------------------------------------------------------------------------------------


def test_gmm_loop_keeps_the_stock_rows_where_it_is_gaussian():
    # gmm_steps=[5]: positions 0-4 are the stock rows with the stock tree's noise, exactly; from 5 on the mixture
    # acts (its Gaussian part is the same tree's increment) and the samples differ
    def run(scheduler, stop):
        scheduler.set_timesteps(7)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * scheduler.init_noise_sigma
        for t in scheduler.timesteps[:stop]:
            x = scheduler.step(_model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
        return x

    for stop, same in ((5, True), (6, False)):
        ours = run(DPMSolverSDEGMMScheduler(noise_sampler_seed=8, gmm_steps=[5], **GMM), stop)
        stock = run(Stock(noise_sampler_seed=8), stop)
        assert torch.isfinite(ours).all()
        assert torch.allclose(ours, stock, atol=1e-4, rtol=1e-4) == same


def test_gmm_final_step_and_seed():
    def run(**keys):
        return _loop(DPMSolverSDEGMMScheduler(noise_sampler_seed=1, **{**GMM, **keys}), 6)

    gauss, mixed, other_seed = run(), run(final_step="gmm"), run(seed=2)
    plain = _loop(DPMSolverSDEGMMScheduler(noise_sampler_seed=1), 6)
    assert all(torch.isfinite(v).all() for v in (gauss, mixed, other_seed))
    assert not torch.allclose(gauss, mixed) and not torch.allclose(gauss, plain)
    assert not torch.allclose(gauss, other_seed)
    torch.testing.assert_close(run(), gauss)  # seed and noise_sampler_seed fix the run


def _stage_moments(variant, stage, stock=False):
    """(centred output, target variance, the row's c and g^2 max v) of one noisy stage with the exact noise as
    model output on the VE path (point-mass data x0): the target is sigma_to^2 per coordinate, mean x0."""
    n, d = 8000, 48
    keys = {} if stock else dict(gmm_variant=variant, gmm_n_components=4, gmm_scale=0.5, seed=5)
    s = (Stock if stock else DPMSolverSDEGMMScheduler)(noise_sampler_seed=11, **keys)
    s.set_timesteps(10)
    i = 6  # step 3 of 10: sigma 4.50 -> 2.83 (midpoint 3.57)
    s.set_begin_index(i)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, d, generator=gen, dtype=torch.float64).expand(n, d).reshape(n, 3, 4, 4)
    eps = torch.randn(n, 3, 4, 4, generator=gen, dtype=torch.float64)
    sigma, nxt = float(s.sigmas[i]), float(s.sigmas[i + 1])
    x = x0 + sigma * eps
    out = s.step(eps.float(), s.timesteps[i], x.float()).prev_sample.double()  # stage 1: x0_1 = x0
    target = sigma * nxt  # the midpoint's sigma^2
    if stage == 2:  # the model at the midpoint returns the noise that gives x0_2 = x0 there
        mid = float(s.mid_point_sigma)
        out = s.step(((out - x0) / mid).float(), s.timesteps[i + 1], out.float()).prev_sample.double()
        target = nxt * nxt
    if stock:
        return (out - x0).flatten(1), target, 1.0, 0.0
    row = s._schedule_rows()[i + stage - 1]
    g2v = float(row[5]) ** 2 * float(s.gmm.var_offsets[i + stage - 1].max())
    return (out - x0).flatten(1), target, float(row[4]), g2v


# Mutations checked: stage 1's ancestral split taken over the whole step (down, up of sigma -> sigma' instead of
# sigma -> sigma_m) fails stage 1 for every variant; stage 2's taken over the half step (sigma -> sigma_m) fails
# stage 2 for every variant. The stock stage runs through the same oracle (its target is the same).
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("variant", ["rand", "ortho-lr", None])
def test_gmm_stage_moments_equal_the_stock_stage(variant, stage):
    centred, target, c, g2v = _stage_moments(variant, stage, stock=variant is None)
    n, d = centred.shape
    assert g2v <= c * c  # nothing clips at this stage: the mixture is moment matched
    assert (centred.mean(0).abs() < MC_SIGMAS_WIDE * math.sqrt(target / n)).all()
    ratio = centred.var(0) / target
    assert_within(ratio, torch.ones(d, dtype=torch.float64), MC_SIGMAS_WIDE * (2 / n) ** 0.5)
    # the mean over coordinates, with its standard error read from the samples (a sample's component is shared by
    # its coordinates, so they are not independent)
    per_sample = (centred - centred.mean(0)).square().mean(1) / target
    assert_within(ratio.mean(), torch.tensor(1.0, dtype=torch.float64), MC_SIGMAS * per_sample.std().item() / n**0.5)


def test_matched_steps_read_the_rows():
    s = DPMSolverSDEGMMScheduler(gmm_steps="matched", gmm_scale=4.0, **{**GMM, "seed": 3})
    s.set_timesteps(6)
    x = torch.randn(SHAPE)
    gmm = s.prepare_gmm(x)
    rows = s._schedule_rows()
    ungated = s._row_table._source  # the rows before gmm_steps
    expected = [
        m and bool(g != 0) for m, g in zip(matched_steps(gmm, ungated[:, 4], ungated[:, 5]), ungated[:, 5], strict=True)
    ]
    acts = [bool(g != 0) for g in rows[:, 5]]
    assert acts == expected and 0 < sum(acts) < len(acts)  # some rows clip at this scale, some do not


# -- compile ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gmm", [False, True], ids=["gmm_off", "gmm"])
def test_compiled_step_from_the_first_call_matches_eager(gmm):
    # the tree's draw runs eagerly (a graph break); the rest of the step compiles from the first call. With a GMM
    # and seed=None, prepare_gmm draws the stream seed outside the graph. Checked to fail with the stage check
    # written `first != (i % 2 == 0)` (Dynamo makes the step index symbolic after its first recompile: an error).
    def run(compiled):
        torch._dynamo.reset()
        s = DPMSolverSDEGMMScheduler(noise_sampler_seed=6, **(dict(GMM, seed=None) if gmm else {}))
        torch.manual_seed(0)
        s.set_timesteps(3)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * s.init_noise_sigma
        s.prepare_gmm(x)
        step = torch.compile(lambda m, t, y: s.step(m, t, y).prev_sample) if compiled else None
        for t in s.timesteps:
            m = _model(s.scale_model_input(x, t), t)
            x = step(m, t, x) if compiled else s.step(m, t, x).prev_sample
        return x

    actual = run(True)
    assert torch.isfinite(actual).all()
    assert_close(actual, run(False), kind="f32")


# -- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (dict(s_noise=float("nan")), ValueError, "s_noise must be a finite real number >= 0"),
        (dict(s_noise=-1.0), ValueError, "s_noise"),
        (dict(model_output=torch.randn(2, 3, 8)), ValueError, "model_output must have the sample's shape"),
        (dict(model_output=torch.zeros(SHAPE, dtype=torch.int64)), TypeError, "model_output must be a real"),
        (dict(sample=torch.zeros(SHAPE, dtype=torch.int64)), TypeError, "sample must be a real floating"),
    ],
)
def test_bad_step_input_is_refused_before_any_work(change, error, match):
    s = DPMSolverSDEGMMScheduler(noise_sampler_seed=0)
    s.set_timesteps(4)
    x = torch.randn(SHAPE)
    kwargs = dict(model_output=torch.randn(SHAPE), timestep=s.timesteps[0], sample=x)
    kwargs.update(change)
    before = x.clone()
    with pytest.raises(error, match=match):
        s.step(**kwargs)
    assert s.noise_sampler is None and s.step_index in (None, 0) and torch.equal(x, before)


def test_bad_configs_and_schedules_are_refused():
    with pytest.raises(ValueError, match="prediction_type must be 'epsilon' or 'v_prediction'"):
        DPMSolverSDEGMMScheduler(prediction_type="flow")
    with pytest.raises(ValueError, match="gmm_n_components"):
        DPMSolverSDEGMMScheduler(gmm_variant="ortho", gmm_n_components=0)
    with pytest.raises(ValueError, match="sigmas must be finite .* beta_end=1.0"):  # the stock loop gives NaN
        DPMSolverSDEGMMScheduler(beta_end=1.0)
    s = DPMSolverSDEGMMScheduler()
    for bad in (0, -3, True):
        with pytest.raises(ValueError, match="num_inference_steps"):
            s.set_timesteps(bad)
    with pytest.raises(ValueError, match="begin_index"):
        s.set_begin_index(-1)
    with pytest.raises(NotImplementedError):  # as the stock step refuses it
        stock_like = DPMSolverSDEGMMScheduler(prediction_type="sample")
        stock_like.set_timesteps(3)
        stock_like.step(torch.zeros(SHAPE), stock_like.timesteps[0], torch.zeros(SHAPE))


def test_gmm_params_before_set_timesteps_and_a_gmm_without_set_timesteps():
    # the rows are built at set_timesteps (or, GMM off, at a step on the stock __init__'s schedule): tables for the
    # run's evaluations are accepted before set_timesteps and checked there
    s = DPMSolverSDEGMMScheduler(noise_sampler_seed=0)
    s.set_gmm_params(dg.GMM.create(math.prod(SHAPE[1:]), n_components=2, n_steps=7, variant="ortho"))
    s.set_timesteps(4)  # 7 evaluations
    assert torch.isfinite(_loop(s, 4, set_steps=False)).all()
    with pytest.raises(ValueError, match="gmm_params has parameter sets for 7 steps but sampling takes 9"):
        s.set_timesteps(5)
    with pytest.raises(ValueError, match="set_timesteps was not called"):
        DPMSolverSDEGMMScheduler(**GMM).step(torch.zeros(SHAPE), 999, torch.zeros(SHAPE))
    plain, stock = DPMSolverSDEGMMScheduler(noise_sampler_seed=0), Stock(noise_sampler_seed=0)
    x = torch.randn(SHAPE)
    for s in (plain, stock):  # as diffusers' own tests step it: the training schedule's last position
        s.scale_model_input(x, s.timesteps[-1])
    assert_close(plain.step(0.1 * x, 0, x).prev_sample, stock.step(0.1 * x, 0, x).prev_sample, kind="f32")


def test_odd_begin_index_past_the_end_and_gmm_without_noise_are_refused():
    s = DPMSolverSDEGMMScheduler(noise_sampler_seed=0)
    s.set_timesteps(4)
    s.set_begin_index(3)  # a second-order position: the stock step returns NaN here
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="must begin at an even position"):
        s.step(torch.randn(SHAPE), s.timesteps[3], x)
    s = DPMSolverSDEGMMScheduler(noise_sampler_seed=0)
    _loop(s, 2)
    with pytest.raises(ValueError, match="past the end of the 3-step schedule"):
        s.step(torch.randn(SHAPE), s.timesteps[-1], x)
    s = DPMSolverSDEGMMScheduler(noise_sampler_seed=0, **GMM)
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="s_noise=0 with a GMM"):
        s.step(torch.randn(SHAPE), s.timesteps[0], x, s_noise=0.0)


def test_the_package_imports_without_torchsde():
    """torchsde is optional (diffusers' own DPMSolverSDEScheduler needs it): without it ddim_gmm_ext.diffusers
    imports, patch_diffusers runs, and only the DPM SDE names raise an ImportError saying what to install.
    Checked to fail with the dpm_sde import unguarded (the package import fails) and with patch_diffusers reading
    _compatibles of diffusers' placeholder class (AttributeError)."""
    code = (
        "import sys; sys.modules['torchsde'] = None\n"
        "import ddim_gmm_ext.diffusers as d\n"
        "assert 'DPMSolverSDEGMMScheduler' not in d.__all__\n"
        "d.patch_diffusers(); d.unpatch_diffusers()\n"
        "try:\n"
        "    from ddim_gmm_ext.diffusers import DPMSolverSDEGMMScheduler\n"
        "except ImportError as e:\n"
        "    assert 'pip install torchsde' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no ImportError')\n"
    )
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
