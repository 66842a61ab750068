"""What every fused diffusers scheduler owes a diffusers user, checked across all five: compiling from the first
call, the global RNG left as the stock class leaves it, a GMM stream derived from the generator, output dtypes,
the zero-SNR rule, clear errors, empty batches, and an import that leaves diffusers' own classes unchanged."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
import diffusers  # noqa: E402

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
]
STOCHASTIC = [p for p in PAIRS if p[0] is not gd.EulerDiscreteGMMScheduler]  # those that take a GMM
IDS = [p[0].__name__ for p in PAIRS]
GMM = dict(gmm_variant="ortho", gmm_n_components=2, gmm_scale=2.0)


def _model(x, t):
    return 0.5 * torch.sin(3 * x) + 0.1 * float(t) / 1000


def _loop(scheduler, x=None, generator=None, steps=STEPS, dtype=torch.float32, **step_kwargs):
    """Final sample of a whole loop as a pipeline runs it (scale_model_input, model, step)."""
    scheduler.set_timesteps(steps)
    if x is None:
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    x = x.to(dtype) * getattr(scheduler, "init_noise_sigma", 1.0)
    out = None
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        out = scheduler.step(_model(inp, t), t, x, generator=generator, **step_kwargs)
        x = out.prev_sample
    return x, out


def _stochastic_kwargs(ours):
    """Step / config keys that make the loop draw noise (DDIM eta, RFIM's stochastic sampling)."""
    if ours is gd.DDIMGMMScheduler:
        return {}, dict(eta=1.0)
    if ours is gd.FlowMatchEulerDiscreteGMMScheduler:
        return dict(stochastic_sampling=True), {}
    return {}, {}


# -- item 1: compiling from the first call ----------------------------------------------------------------------

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

    def loop(cls, gmm, fn):
        torch.manual_seed(0)
        s = cls(**(dict(gmm_variant="ortho", gmm_n_components=2, seed=1) if gmm else {}))
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
        # the step index is a device tensor for these: one graph for the whole loop
        once = name in ("DDIMGMMScheduler", "DDPMGMMScheduler", "FlowMatchEulerDiscreteGMMScheduler")
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
COMPILE_CASES.remove("EulerDiscreteGMMScheduler:gmm")  # Euler is deterministic: no GMM


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


# Mutation checked: without the eager field lookup at import (publish) and the compiling fallback, 9 of the 10
# cases fail with Dynamo's "dataclass fields failure" on the first call. A fresh process: the field cache
# of an earlier test in this one would hide it.
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


# -- item 3: the global RNG -------------------------------------------------------------------------------------


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


# -- item 4: the GMM stream from the generator -----------------------------------------------------------------


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


# -- item 5: a GMM without set_timesteps -------------------------------------------------------------------------


# Mutation checked: without _check_gmm_ready, DDPM and Euler ancestral run the stock step silently.
@pytest.mark.parametrize("ours", [p[0] for p in STOCHASTIC], ids=[p[0].__name__ for p in STOCHASTIC])
def test_a_gmm_step_before_set_timesteps_is_an_error(ours):
    scheduler = ours(**GMM)
    x = torch.zeros(SHAPE)
    t = ours().timesteps[0]
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, t, x)


# -- item 9: output dtypes -----------------------------------------------------------------------------------------


# Mutation checked: Euler's sample kept in float32 for a float64 model output (as before) fails float64.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("ours, stock", PAIRS, ids=IDS)
def test_output_dtypes_match_the_stock_class(ours, stock, dtype):
    _, out_stock = _loop(stock(), generator=torch.Generator().manual_seed(0), dtype=dtype)
    _, out_ours = _loop(ours(), generator=torch.Generator().manual_seed(0), dtype=dtype)
    assert out_ours.keys() == out_stock.keys()
    for key in out_stock:
        assert out_ours[key].dtype == out_stock[key].dtype, key


# -- item 2: zero-SNR schedules with epsilon prediction ---------------------------------------------------------

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


# -- items 10 and 13: errors that name the caller's argument; empty batches --------------------------------------


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


# -- issue 24 item 4: importing changes no stock class -----------------------------------------------------------

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
