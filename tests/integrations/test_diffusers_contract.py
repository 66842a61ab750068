"""What every fused diffusers scheduler owes a diffusers user, checked across all seven: compiling from the first
call, the global RNG left as the stock class leaves it, a GMM stream derived from the generator, output dtypes,
the zero-SNR rule, clear errors, empty batches, and an import that leaves diffusers' own classes unchanged."""

import inspect
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
import diffusers  # noqa: E402

import ddim_gmm_ext as dg  # noqa: E402
import ddim_gmm_ext.diffusers as gd  # noqa: E402
from tests.helpers import assert_close, is_close  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]  # the checkout: a subprocess imports this package
SHAPE = (2, 3, 8, 8)
STEPS = 7  # does not divide 1000

# (ours, stock, GMM config keys): every fused scheduler
PAIRS = [
    (gd.DDIMGMMScheduler, diffusers.DDIMScheduler),
    (gd.DDPMGMMScheduler, diffusers.DDPMScheduler),
    (gd.EulerDiscreteGMMScheduler, diffusers.EulerDiscreteScheduler),
    (gd.EulerAncestralDiscreteGMMScheduler, diffusers.EulerAncestralDiscreteScheduler),
    (gd.FlowMatchEulerDiscreteGMMScheduler, diffusers.FlowMatchEulerDiscreteScheduler),
    (gd.DPMSolverMultistepGMMScheduler, diffusers.DPMSolverMultistepScheduler),
    (gd.UniPCMultistepGMMScheduler, diffusers.UniPCMultistepScheduler),
]
DETERMINISTIC = (gd.EulerDiscreteGMMScheduler, gd.UniPCMultistepGMMScheduler)  # no noise: no GMM
STOCHASTIC = [p for p in PAIRS if p[0] not in DETERMINISTIC]  # those that take a GMM (with _stochastic_kwargs)
IDS = [p[0].__name__ for p in PAIRS]
GMM = dict(gmm_variant="ortho", gmm_n_components=2, gmm_scale=2.0)


def _model(x, t):
    return 0.5 * torch.sin(3 * x) + 0.1 * float(t) / 1000


def _generator(scheduler, generator) -> dict:
    """``generator`` as a step keyword, where the step takes one (UniPC's draws nothing and has none)."""
    if generator is None or "generator" not in inspect.signature(scheduler.step).parameters:
        return {}
    return dict(generator=generator)


def _loop(scheduler, x=None, generator=None, steps=STEPS, dtype=torch.float32, **step_kwargs):
    """Final sample of a whole loop as a pipeline runs it (scale_model_input, model, step)."""
    step_kwargs.update(_generator(scheduler, generator))
    scheduler.set_timesteps(steps)
    if x is None:
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    x = x.to(dtype) * getattr(scheduler, "init_noise_sigma", 1.0)
    out = None
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        out = scheduler.step(_model(inp, t), t, x, **step_kwargs)
        x = out.prev_sample
    return x, out


def _stochastic_kwargs(ours):
    """Step / config keys that make the loop draw noise (DDIM eta, RFIM's stochastic sampling, the SDE solver)."""
    if ours is gd.DDIMGMMScheduler:
        return {}, dict(eta=1.0)
    if ours is gd.FlowMatchEulerDiscreteGMMScheduler:
        return dict(stochastic_sampling=True), {}
    if ours is gd.DPMSolverMultistepGMMScheduler:
        return dict(algorithm_type="sde-dpmsolver++"), {}
    return {}, {}


# -- compiling from the first call -------------------------------------------------------------------------------------

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import ddim_gmm_ext.diffusers as gd

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def denoise(s, y, inp, t):
        with torch.no_grad():
            return s.step(torch.tanh(conv(inp)) + t / 1000, t, y).prev_sample

    # GMM off, seed=None: the noise comes from the global RNG; compiled random ops follow eager ones only with
    # fallback_random (DDPM's compiled step also draws at t = 0, where the noise std is 0)
    torch._inductor.config.fallback_random = True

    # every row kind of the multistep solvers: DPM-Solver++ order 3 (SDE, so that a GMM is taken), UniPC order 3 with
    # a disabled corrector step
    CONFIGS = {
        "DPMSolverMultistepGMMScheduler": dict(algorithm_type="sde-dpmsolver++", solver_order=3),
        "UniPCMultistepGMMScheduler": dict(solver_order=3, disable_corrector=[2]),
    }

    def loop(cls, gmm, fn):
        torch.manual_seed(0)
        config = CONFIGS.get(cls.__name__, {})
        s = cls(**config, **(dict(gmm_variant="ortho", gmm_n_components=2, seed=1) if gmm else {}))
        s.set_timesteps(7)
        s.prepare_gmm(x)
        y = x
        for t in s.timesteps:
            inp = s.scale_model_input(y, t) if hasattr(s, "scale_model_input") else y
            y = fn(s, y, inp, t)  # scale_model_input eagerly, as pipelines call it
        return y

    results = {}
    for case in sys.argv[2:]:  # "Name:off" cases first: each class's very first call is a compiled one
        name, gmm = case.split(":")
        cls = getattr(gd, name)
        torch._dynamo.reset()
        compiled = torch.compile(denoise, fullgraph=True)
        # the step index is a device tensor for these (prepare_gmm fills the multistep histories with zeros): one
        # graph for the whole loop
        once = name not in ("EulerDiscreteGMMScheduler", "EulerAncestralDiscreteGMMScheduler")
        try:
            with torch._dynamo.config.patch(error_on_recompile=once):
                actual = loop(cls, gmm == "gmm", compiled)
            results[case] = (actual, loop(cls, gmm == "gmm", denoise))
        except Exception as e:  # reported per case by the test
            results[case] = repr(e)[-3000:]
    torch.save(results, sys.argv[1])
    """
)
COMPILE_CASES = [f"{ours.__name__}:{gmm}" for gmm in ("off", "gmm") for ours, _ in PAIRS]
for _deterministic in DETERMINISTIC:
    COMPILE_CASES.remove(f"{_deterministic.__name__}:gmm")  # no noise: no GMM


@pytest.fixture(scope="module")
def compiled_loops(tmp_path_factory):
    """Every case of the compile test in one fresh process (an import of torch and diffusers and a compiler
    start each cost seconds; one process per case made this the suite's slowest test)."""
    out = tmp_path_factory.mktemp("compile") / "out.pt"
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, str(out), *COMPILE_CASES], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


# Mutation checked: without the eager field lookup at import (publish) and the compiling fallback, 9 of the 10 cases
# of the first five schedulers fail with Dynamo's "dataclass fields failure" on the first call; without
# prepare_gmm's zero history (multistep) or last_sample (UniPC), the multistep cases recompile. A fresh process:
# the field cache of an earlier test in this one would hide it.
@pytest.mark.parametrize("case", COMPILE_CASES)
def test_model_and_step_compile_fullgraph_from_the_first_call(case, compiled_loops):
    result = compiled_loops[case]
    assert not isinstance(result, str), result
    actual, expected = result
    assert torch.isfinite(actual).all()
    assert_close(actual, expected, kind="f32")


def test_compiled_gmm_loop_without_prepare_gmm_names_it():
    s = gd.DDIMGMMScheduler(**GMM)
    s.set_timesteps(STEPS)
    x = torch.zeros(SHAPE)
    step = torch.compile(lambda m, t, y: s.step(m, t, y).prev_sample, fullgraph=True)
    with pytest.raises(Exception, match="prepare_gmm"):
        step(x, s.timesteps[0], x)


# -- the global RNG ----------------------------------------------------------------------------------------------------


# Mutation checked: drawing the stream seed in set_timesteps (as before) fails every case; Philox noise for a
# GMM-off loop without a seed fails the stochastic ones (the stock class draws its noise from the global RNG).
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("ours, stock", PAIRS, ids=IDS)
def test_gmm_off_loop_leaves_the_global_rng_as_the_stock_class(ours, stock, stochastic):
    config, step_kwargs = _stochastic_kwargs(ours) if stochastic else ({}, {})
    results = []
    for cls in (stock, ours):
        scheduler = cls(**config)
        torch.manual_seed(11)
        x, _ = _loop(scheduler, **step_kwargs)
        results.append((x, torch.get_rng_state(), torch.randn(3)))
    (x_stock, state_stock, next_stock), (x_ours, state_ours, next_ours) = results
    assert torch.equal(state_ours, state_stock)
    assert_close(next_ours, next_stock, kind="exact")
    assert_close(x_ours, x_stock, kind="f32_loop_upstream")  # same torch.manual_seed: the stock samples


# Mutation checked: an eager stream-seed draw in set_timesteps fails (the pipeline's latents would change).
@pytest.mark.parametrize("ours", [p[0] for p in STOCHASTIC], ids=[p[0].__name__ for p in STOCHASTIC])
def test_gmm_on_draws_the_stream_seed_at_the_first_step_not_at_set_timesteps(ours):
    config, step_kwargs = _stochastic_kwargs(ours)
    scheduler = ours(**config, **GMM)
    torch.manual_seed(5)
    scheduler.set_timesteps(STEPS)
    assert torch.equal(torch.get_rng_state(), torch.random.manual_seed(5).get_state())
    torch.manual_seed(5)
    first, _ = _loop(scheduler, **step_kwargs)
    torch.manual_seed(5)
    again, _ = _loop(scheduler, **step_kwargs)
    torch.manual_seed(6)
    other, _ = _loop(scheduler, **step_kwargs)
    assert_close(again, first, kind="exact")
    assert not is_close(other, first, "distinct")


# -- the GMM stream from the generator ---------------------------------------------------------------------------------


# Mutation checked: Euler ancestral without its components drawn from the generator (as before) fails.
@pytest.mark.parametrize("ours", [p[0] for p in STOCHASTIC], ids=[p[0].__name__ for p in STOCHASTIC])
def test_gmm_with_a_generator_ignores_the_global_rng(ours):
    config, step_kwargs = _stochastic_kwargs(ours)
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        x, _ = _loop(ours(**config, **GMM), generator=torch.Generator().manual_seed(3), **step_kwargs)
        runs.append(x)
    assert_close(runs[1], runs[0], kind="exact")
    torch.manual_seed(1)
    other, _ = _loop(ours(**config, **GMM), generator=torch.Generator().manual_seed(4), **step_kwargs)
    assert not is_close(other, runs[0], "distinct")


# -- a GMM without set_timesteps ---------------------------------------------------------------------------------------


# Mutation checked: without _check_gmm_ready, DDPM and Euler ancestral run the stock step silently.
@pytest.mark.parametrize("ours", [p[0] for p in STOCHASTIC], ids=[p[0].__name__ for p in STOCHASTIC])
def test_a_gmm_step_before_set_timesteps_is_an_error(ours):
    config, _ = _stochastic_kwargs(ours)
    scheduler = ours(**config, **GMM)
    x = torch.zeros(SHAPE)
    t = ours().timesteps[0]
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, t, x)


# -- output dtypes -----------------------------------------------------------------------------------------------------


# Mutation checked: Euler's sample kept in float32 for a float64 model output (as before) fails float64.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("ours, stock", PAIRS, ids=IDS)
def test_output_dtypes_match_the_stock_class(ours, stock, dtype):
    _, out_stock = _loop(stock(), generator=torch.Generator().manual_seed(0), dtype=dtype)
    _, out_ours = _loop(ours(), generator=torch.Generator().manual_seed(0), dtype=dtype)
    assert out_ours.keys() == out_stock.keys()
    for key in out_stock:
        assert out_ours[key].dtype == out_stock[key].dtype, key


# -- zero-SNR schedules with epsilon prediction ------------------------------------------------------------------------

ZERO_SNR = dict(rescale_betas_zero_snr=True, prediction_type="epsilon")


# Mutation checked: the old CPU kernel's affine x0 = (1 / a_t) x + (-b_t / a_t) m (inf - inf = NaN at a_t = 0)
# without the a_t = 2^-64 row substitution (since dropped) fails trailing / linspace; DDIM's old refusal at
# construction fails every case. The rows keep a_t = 0: the op's (x - b_t m) * (1 / a_t) is +-inf, clipped.
@pytest.mark.parametrize("spacing", ["trailing", "linspace", "leading"])
@pytest.mark.parametrize("ours, stock", PAIRS[:2], ids=IDS[:2])
def test_zero_snr_epsilon_with_clipping_matches_the_stock_class(ours, stock, spacing):
    config = dict(ZERO_SNR, timestep_spacing=spacing, clip_sample=True)
    x_stock, _ = _loop(stock(**config), generator=torch.Generator().manual_seed(0))
    x_ours, _ = _loop(ours(**config), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x_stock).all()
    assert_close(x_ours, x_stock, kind="f32_loop_upstream")
    if spacing != "leading":  # the first step is the zero-SNR one: x0 = +-clip_sample_range
        scheduler = ours(**config)
        scheduler.set_timesteps(STEPS)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
        t = scheduler.timesteps[0]
        x0 = scheduler.step(_model(x, t), t, x, generator=torch.Generator()).pred_original_sample
        assert_close(x0.abs(), torch.ones_like(x0), kind="exact")


# Mutation checked: without the check, set_timesteps passes and the loop is non-finite, as the stock class's.
@pytest.mark.parametrize("unbounded", [dict(clip_sample=False), dict(clip_sample=True, thresholding=True)])
@pytest.mark.parametrize("ours, stock", PAIRS[:2], ids=IDS[:2])
def test_zero_snr_epsilon_without_clipping_is_refused_at_set_timesteps(ours, stock, unbounded):
    config = dict(ZERO_SNR, timestep_spacing="trailing", **unbounded)
    x_stock, _ = _loop(stock(**config), generator=torch.Generator().manual_seed(0))
    assert not torch.isfinite(x_stock).all()  # what the error replaces
    scheduler = ours(**config)  # construction is fine: the spacing decides whether a_t = 0 is reached
    with pytest.raises(ValueError, match=r"zero-SNR.*rescale_betas_zero_snr=True, timestep_spacing='trailing'"):
        scheduler.set_timesteps(STEPS)
    scheduler.register_to_config(timestep_spacing="leading")
    scheduler.set_timesteps(STEPS)  # leading never reaches the last training timestep


# -- errors that name the caller's argument; empty batches -------------------------------------------------------------


# Mutation checked: without check_model_output, DDPM / Euler ancestral / DDIM with a generator name `noise`, and
# flow matching drops the imaginary part of a complex output.
@pytest.mark.parametrize("ours", [p[0] for p in STOCHASTIC], ids=[p[0].__name__ for p in STOCHASTIC])
def test_bad_model_output_is_named(ours):
    config, step_kwargs = _stochastic_kwargs(ours)
    scheduler = ours(**config)
    scheduler.set_timesteps(STEPS)
    x = torch.zeros(SHAPE)
    t = scheduler.timesteps[0]
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"model_output must have the sample's shape"):
        scheduler.step(torch.zeros(2, 3, 8, 4), t, x, generator=gen, **step_kwargs)
    complex_output = torch.zeros(SHAPE, dtype=torch.complex64)
    with pytest.raises(TypeError, match=r"model_output must be a real floating-point tensor, got torch.complex64"):
        scheduler.step(complex_output, t, x, generator=gen, **step_kwargs)


def test_flow_matching_0d_sample_and_empty_sigmas_are_named():
    scheduler = gd.FlowMatchEulerDiscreteGMMScheduler()
    with pytest.raises(ValueError, match="sigmas must hold at least one value"):
        scheduler.set_timesteps(sigmas=[])
    with pytest.raises(ValueError, match="timesteps must hold at least one value"):
        scheduler.set_timesteps(timesteps=[])
    scheduler.set_timesteps(STEPS)
    with pytest.raises(ValueError, match="sample must be a real floating-point tensor with a batch dimension"):
        scheduler.step(torch.tensor(0.5), scheduler.timesteps[0], torch.tensor(0.5))


# Mutation checked: draw_components without the empty-batch case dies in multinomial.
@pytest.mark.parametrize("ours", [p[0] for p in STOCHASTIC], ids=[p[0].__name__ for p in STOCHASTIC])
def test_an_empty_batch_with_a_generator_and_a_gmm_is_an_empty_loop(ours):
    config, step_kwargs = _stochastic_kwargs(ours)
    x, _ = _loop(ours(**config, **GMM), x=torch.zeros(0, 3, 8, 8), generator=torch.Generator(), **step_kwargs)
    assert x.shape == (0, 3, 8, 8)


# -- importing changes no stock class ----------------------------------------------------------------------------------

_IMPORT_SCRIPT = textwrap.dedent(
    """
    import diffusers, torch
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    def stock_state():
        classes = {n: getattr(diffusers, n) for n in dir(diffusers) if n.endswith("Scheduler")}
        return {n: list(getattr(c, "_compatibles", [])) for n, c in classes.items()}, DDIMPipeline.__init__

    before = stock_state()
    import ddim_gmm_ext.diffusers as gd

    compatibles, init = stock_state()
    assert {n: v for n, v in compatibles.items() if n in before[0]} == before[0], "a stock _compatibles changed"
    assert init is before[1], "DDIMPipeline.__init__ replaced"
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    assert type(DDIMPipeline(unet=unet, scheduler=gd.DDIMGMMScheduler()).scheduler) is DDIMScheduler  # stock
    gd.patch_diffusers()
    gd.patch_diffusers()  # idempotent
    assert gd.DDIMGMMScheduler in DDIMScheduler().compatibles
    assert gd.DDPMGMMScheduler in diffusers.DDPMScheduler().compatibles
    assert gd.DPMSolverMultistepGMMScheduler in diffusers.DPMSolverMultistepScheduler().compatibles
    assert gd.DPMSolverMultistepGMMScheduler in diffusers.DEISMultistepScheduler().compatibles
    assert gd.UniPCMultistepGMMScheduler in diffusers.UniPCMultistepScheduler().compatibles
    assert type(DDIMPipeline(unet=unet, scheduler=gd.DDIMGMMScheduler()).scheduler) is gd.DDIMGMMScheduler
    gd.unpatch_diffusers()
    assert stock_state()[0] == compatibles and DDIMPipeline.__init__ is init
    print("ok")
    """
)


# Mutation checked: the old import-time registration (appending to stock _compatibles, replacing
# DDIMPipeline.__init__) fails; a fresh process, so that no earlier patch_diffusers call hides it.
def test_importing_leaves_stock_classes_unchanged_and_patching_is_explicit():
    proc = subprocess.run([sys.executable, "-c", _IMPORT_SCRIPT], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


# -- the GMM plumbing of every scheduler -------------------------------------------------------------------------------

# every scheduler class, with a config whose steps draw noise (a GMM is accepted there)
NOISY = [
    (gd.DDIMGMMScheduler, {}),
    (gd.DDPMGMMScheduler, {}),
    (gd.EulerAncestralDiscreteGMMScheduler, {}),
    (gd.FlowMatchEulerDiscreteGMMScheduler, dict(stochastic_sampling=True)),
    (gd.DPMSolverMultistepGMMScheduler, dict(algorithm_type="sde-dpmsolver++")),
    (gd.EDMDPMSolverMultistepGMMScheduler, dict(algorithm_type="sde-dpmsolver++")),
]
NOISY_IDS = [cls.__name__ for cls, _ in NOISY]
# configurations whose steps have no noise for a mixture to replace
NOISELESS = [
    (gd.DPMSolverMultistepGMMScheduler, dict(algorithm_type="dpmsolver++")),
    (gd.DPMSolverMultistepGMMScheduler, dict(algorithm_type="deis", final_sigmas_type="sigma_min")),
    (gd.DPMSolverMultistepGMMScheduler, dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min")),
    (gd.DPMSolverMultistepGMMScheduler, dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min")),
    (gd.UniPCMultistepGMMScheduler, {}),
    (gd.EDMDPMSolverMultistepGMMScheduler, dict(algorithm_type="dpmsolver++")),
    (gd.DDPMGMMScheduler, dict(variance_type="learned")),
    (gd.DDPMGMMScheduler, dict(variance_type="learned_range")),
    (gd.DDPMGMMScheduler, dict(thresholding=True)),
]


def _gmm_for_shape(n_steps=STEPS, **kwargs):
    return dg.GMM.create(math.prod(SHAPE[1:]), n_components=2, n_steps=n_steps, variant="ortho", **kwargs)


def _run(scheduler, x, generator=None, step_kwargs=None, set_timesteps=True):
    """A whole loop (as _loop) with the option of rerunning the schedule without set_timesteps."""
    if set_timesteps:
        scheduler.set_timesteps(STEPS)
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        kwargs = dict(step_kwargs or {}, **({} if generator is None else dict(generator=generator)))
        x = scheduler.step(_model(inp, t), t, x, **kwargs).prev_sample
    return x


# Mutation checked: set_gmm_params without its _refuse_gmm call (as before) fails every case: the tables are
# accepted (and ignored, or for dpmsolver++ added to the sample with no noise to replace).
@pytest.mark.parametrize(("ours", "config"), NOISELESS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_set_gmm_params_is_refused_where_gmm_variant_is(ours, config):
    with pytest.raises(ValueError) as by_config:
        ours(**config, gmm_variant="ortho")
    scheduler = ours(**config)
    with pytest.raises(ValueError) as by_params:
        scheduler.set_gmm_params(_gmm_for_shape())
    assert "set_gmm_params" in str(by_params.value)
    assert str(by_params.value) == str(by_config.value).replace("gmm_variant='ortho'", "set_gmm_params")
    scheduler.set_gmm_params(None)  # going back to the config is always allowed


def test_euler_refuses_set_gmm_params():
    with pytest.raises(ValueError, match="set_gmm_params: EulerDiscreteGMMScheduler is deterministic"):
        gd.EulerDiscreteGMMScheduler().set_gmm_params(_gmm_for_shape())


@pytest.mark.parametrize(("ours", "config"), NOISY, ids=NOISY_IDS)
def test_set_gmm_params_is_accepted_where_the_steps_draw_noise(ours, config):
    ours(**config, gmm_variant="ortho")
    scheduler = ours(**config)
    gmm = _gmm_for_shape()
    scheduler.set_gmm_params(gmm)
    assert scheduler.gmm is gmm


# Mutation checked: without the new-run rule in _use_stream (the stream seed drawn once per set_timesteps, as
# before) a rerun repeats the first run's noise bitwise and every case fails; without _new_run in prepare_gmm
# no seed is drawn there.
@pytest.mark.parametrize(
    ("ours", "step_kwargs"), [(gd.DDIMGMMScheduler, dict(eta=1.0)), (gd.DDPMGMMScheduler, {})], ids=lambda v: str(v)
)
def test_seed_none_gmm_rerun_without_set_timesteps_draws_fresh_noise(ours, step_kwargs):
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    scheduler = ours(**GMM)
    torch.manual_seed(0)
    first = _run(scheduler, x, step_kwargs=step_kwargs)
    state = torch.get_rng_state()
    again = _run(scheduler, x, step_kwargs=step_kwargs, set_timesteps=False)
    assert not is_close(again, first, "distinct")
    # the rerun is a run of its own: a new seed from the global RNG where the first run left it
    torch.set_rng_state(state)
    assert_close(again, _run(ours(**GMM), x, step_kwargs=step_kwargs), kind="exact")
    # a rerun from a begin index (img2img) is a new run too
    scheduler.set_begin_index(3) if hasattr(scheduler, "set_begin_index") else None
    y = x
    outs = []
    for _ in range(2):
        y = x
        for t in scheduler.timesteps[3:]:
            y = scheduler.step(_model(y, t), t, y, **step_kwargs).prev_sample
        outs.append(y)
    assert not is_close(outs[1], outs[0], "distinct")
    # prepare_gmm begins a run (the only run start a compiled loop's host sees): its seed is drawn there
    before = torch.get_rng_state()
    scheduler.prepare_gmm(x)
    assert not torch.equal(torch.get_rng_state(), before)
    # a fixed seed reproduces every rerun bitwise
    fixed = ours(**GMM, seed=4)
    one = _run(fixed, x, step_kwargs=step_kwargs)
    assert_close(_run(fixed, x, step_kwargs=step_kwargs, set_timesteps=False), one, kind="exact")


# Mutation checked: GMM.set_index checking a shared set's index against n_steps (as before) fails every case
# with "step_index must be in [0, 3), got 3" at the fourth step (the generator path draws the components there).
@pytest.mark.parametrize("shared", ["create", "from_params"])
@pytest.mark.parametrize(("ours", "config"), NOISY, ids=NOISY_IDS)
def test_a_shared_gmm_serves_any_number_of_steps(ours, config, shared):
    if shared == "create":
        gmm = _gmm_for_shape(n_steps=3, share_across_steps=True)
    else:
        priors, offsets, var_offsets, _ = _gmm_for_shape(n_steps=1).tables(torch.empty(0))
        gmm = dg.GMM.from_params(priors, offsets, var_offsets)  # one set: shared, n_steps 1
    # the oracle: the same set repeated for each of the STEPS steps
    per_step = dg.GMM.from_params(*(t.expand(STEPS, *t.shape[1:]) for t in gmm.tables(torch.empty(0))[:3]))
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    _, step_kwargs = _stochastic_kwargs(ours)
    results = []
    for tables in (gmm, per_step):
        for generator in (torch.Generator().manual_seed(2), None):
            scheduler = ours(**config, seed=5)
            scheduler.set_timesteps(STEPS)
            scheduler.set_gmm_params(tables)
            results.append(_run(scheduler, x, generator, step_kwargs, set_timesteps=False))
    assert_close(results[0], results[2], kind="exact")
    assert_close(results[1], results[3], kind="exact")
    # the host-index entry points of the op
    sample = torch.zeros(1, *SHAPE[1:])
    row = torch.tensor([[1.0, 0.5, 1.0, 0.5, 0.5, 1.0]])
    out = dg.step_from_table(sample, sample, row.expand(STEPS, 6), STEPS - 1, gmm=gmm, prediction_type="epsilon")
    assert torch.isfinite(out.prev_sample).all()
    out = dg.step(sample, sample, 1.0, 0.5, 1.0, 0.5, 0.5, gmm=gmm, step_index=STEPS - 1)
    assert torch.isfinite(out.prev_sample).all()
    assert gmm.set_index(STEPS - 1) == gmm.set_index(0) == 0


NUMPY_KEYS = dict(
    gmm_variant=np.str_("ortho"),
    gmm_n_components=np.int32(2),
    gmm_scale=np.float32(1.5),
    gmm_share_across_steps=np.bool_(False),
    gmm_uniform_priors=np.bool_(True),
    seed=torch.tensor(3),
    gmm_steps=np.array([0, 2, 5]),
    final_step=np.str_("gmm"),
)


# Mutation checked: without the Python values stored in _init_gmm (as before) save_pretrained fails ("not JSON
# serializable") and set_timesteps with the NumPy gmm_steps fails ("truth value of an array is ambiguous").
@pytest.mark.parametrize(("ours", "config"), NOISY, ids=NOISY_IDS)
def test_numpy_and_tensor_config_values_are_stored_as_python_values(ours, config, tmp_path):
    extra = dict(rfim_eta=np.float32(1.0)) if ours is gd.FlowMatchEulerDiscreteGMMScheduler else {}
    config = {k: v for k, v in config.items() if k != "stochastic_sampling"}
    scheduler = ours(**config, **NUMPY_KEYS, **extra)
    for key in (*NUMPY_KEYS, *extra):
        value = scheduler.config[key]
        assert type(value) in (str, int, float, bool, list), (key, type(value))
    assert scheduler.config.gmm_steps == [0, 2, 5]
    scheduler.save_pretrained(tmp_path)
    loaded = ours.from_pretrained(tmp_path)
    public = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == public
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    _, step_kwargs = _stochastic_kwargs(ours)
    plain = {k: python_list(v) for k, v in {**NUMPY_KEYS, **extra}.items()}
    expected = _run(ours(**config, **plain), x, None, step_kwargs)
    assert_close(_run(scheduler, x, None, step_kwargs), expected, kind="exact")
    assert_close(_run(loaded, x, None, step_kwargs), expected, kind="exact")


def python_list(value):
    """The plain Python form a user would have written (the oracle's config)."""
    return value.tolist() if isinstance(value, (np.ndarray, np.generic, torch.Tensor)) else value


@pytest.mark.parametrize("mask", [np.array([True, False] * 3 + [True]), torch.tensor([1, 3])])
def test_gmm_steps_as_an_array_is_accepted(mask):
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    got = _run(gd.DDIMGMMScheduler(**GMM, seed=0, gmm_steps=mask), x, step_kwargs=dict(eta=1.0))
    want = _run(gd.DDIMGMMScheduler(**GMM, seed=0, gmm_steps=mask.tolist()), x, step_kwargs=dict(eta=1.0))
    assert_close(got, want, kind="exact")


def test_a_non_bool_gmm_flag_is_refused_up_front():
    with pytest.raises(TypeError, match="gmm_share_across_steps must be a bool, got 1"):
        gd.DDIMGMMScheduler(**GMM, gmm_share_across_steps=1)


# Mutation checked: the final-step rule (_checks.final_step_allows) leaving out step n - 2 instead of n - 1 fails
# every case (the runs part at the step before the last); a scheduler writing g = 1 on every row ignores
# final_step and fails its case.
@pytest.mark.parametrize(("ours", "config"), NOISY, ids=NOISY_IDS)
def test_final_step_gaussian_leaves_the_mixture_out_of_the_last_step_only(ours, config):
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    _, step_kwargs = _stochastic_kwargs(ours)

    def samples(final_step):
        scheduler = ours(**config, **GMM, seed=3, final_step=final_step)
        scheduler.set_timesteps(STEPS)
        y, out = x * getattr(scheduler, "init_noise_sigma", 1.0), []
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(y, t) if hasattr(scheduler, "scale_model_input") else y
            y = scheduler.step(_model(inp, t), t, y, **step_kwargs).prev_sample
            out.append(y)
        return out

    gaussian, mixture = samples("gaussian"), samples("gmm")
    for a, b in zip(gaussian[:-1], mixture[:-1], strict=True):
        assert_close(a, b, kind="exact")
    assert not torch.equal(gaussian[-1], mixture[-1])


ALL_CLASSES = [*(cls for cls, _ in NOISY), gd.EulerDiscreteGMMScheduler, gd.UniPCMultistepGMMScheduler,
               gd.EDMEulerGMMScheduler]  # fmt: skip


# Mutation checked: without _check_prepared, DPM-Solver++ and UniPC fail inside the op ("history0 must have the
# sample's shape") and the others run on without a word; without the type check prepare_gmm(None) raises
# AttributeError.
@pytest.mark.parametrize("ours", ALL_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("prepared", [(1, *SHAPE[1:]), (2, 3, 4, 16)])
def test_prepare_gmm_with_another_shape_than_the_loop_is_named(ours, prepared):
    config = dict(NOISY).get(ours, {})
    scheduler = ours(**config)
    scheduler.set_timesteps(STEPS)
    with pytest.raises(TypeError, match="prepare_gmm\\(sample\\): sample must be a tensor"):
        scheduler.prepare_gmm(None)
    scheduler.prepare_gmm(torch.zeros(prepared))
    x = torch.zeros(SHAPE)
    t = scheduler.timesteps[0]
    named = rf"prepare_gmm was called with a sample of shape \({prepared[0]}, .*{SHAPE[-1]}\)"
    with pytest.raises(ValueError, match=named):
        scheduler.step(x, t, x)
    scheduler.set_timesteps(STEPS)  # as the message says
    scheduler.prepare_gmm(x)
    assert torch.isfinite(scheduler.step(x, t, x).prev_sample).all()


def test_a_compiled_step_after_prepare_gmm_with_another_shape_is_named():
    scheduler = gd.DDIMGMMScheduler(**GMM, seed=0)
    scheduler.set_timesteps(STEPS)
    scheduler.prepare_gmm(torch.zeros(1, *SHAPE[1:]))
    x = torch.zeros(SHAPE)
    step = torch.compile(lambda m, t, y: scheduler.step(m, t, y).prev_sample, fullgraph=True)
    with pytest.raises(Exception, match=r"prepare_gmm was called with a sample of shape \(1, 3, 8, 8\)"):
        step(x, scheduler.timesteps[0], x)


# Mutation checked: without check_begin_index the stock set_begin_index stores -1 and the first step fails in
# the op ("step_index must be in [0, 2**32)") or as "past the end"; without check_host_step in Euler's step, a
# second run fails in the op ("outside the coefficient table").
@pytest.mark.parametrize("ours", ALL_CLASSES, ids=lambda c: c.__name__)
def test_begin_index_and_a_second_run_without_set_timesteps_are_named(ours):
    config = dict(NOISY).get(ours, {})
    scheduler = ours(**config)
    scheduler.set_timesteps(STEPS)
    if hasattr(scheduler, "set_begin_index"):
        with pytest.raises(ValueError, match=r"begin_index must be an int >= 0 .*got -1"):
            scheduler.set_begin_index(-1)
    if ours in (gd.DDIMGMMScheduler, gd.DDPMGMMScheduler):
        return  # the step index comes from the timestep: a second run is a run (see the seed rule)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    _run(scheduler, x, set_timesteps=False)
    past = f"step {STEPS} is past the end of the {STEPS}-step schedule; call set_timesteps"
    with pytest.raises(ValueError, match=past):
        _run(scheduler, x, set_timesteps=False)
