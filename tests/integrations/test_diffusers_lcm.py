"""LCMGMMScheduler, TCDGMMScheduler and FlowMatchLCMGMMScheduler against diffusers' LCMScheduler, TCDScheduler and
FlowMatchLCMScheduler: whole loops (GMM off) over their options, generators, mid-schedule starts, save / load, a
compiled loop, the GMM's one-step moments and bad input."""

import contextlib
import math

import pytest
import torch

pytest.importorskip("diffusers")
import diffusers  # noqa: E402
from diffusers.schedulers import scheduling_flow_match_lcm, scheduling_lcm, scheduling_tcd  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

import ddim_gmm_ext as dg  # noqa: E402
from ddim_gmm_ext.diffusers import FlowMatchLCMGMMScheduler, LCMGMMScheduler, TCDGMMScheduler  # noqa: E402
from tests.helpers import MC_SIGMAS_WIDE, assert_close, assert_loop_error_within, assert_within  # noqa: E402

SHAPE = (2, 3, 8, 8)
STOCK = {
    LCMGMMScheduler: diffusers.LCMScheduler,
    TCDGMMScheduler: diffusers.TCDScheduler,
    FlowMatchLCMGMMScheduler: diffusers.FlowMatchLCMScheduler,
}


def _model(x, t):
    """A smooth stand-in for a UNet output, depending on the sample and the timestep."""
    return 0.5 * torch.sin(3 * x) + 0.1 * float(t) / 1000


def _loop(s, steps=None, seed=3, dtype=torch.float32, begin=None, set_kwargs=None, **step_kwargs):
    """Final sample of a pipeline-style loop (from position ``begin`` with set_begin_index) with one generator
    (none when ``seed`` is None)."""
    s.set_timesteps(steps, **(set_kwargs or {}))
    timesteps = s.timesteps
    if begin is not None:
        s.set_begin_index(begin)
        timesteps = timesteps[begin:]
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).to(dtype)
    for t in timesteps:
        x = s.step(_model(x, t).to(dtype), t, x, generator=gen, **step_kwargs).prev_sample
    return x


@contextlib.contextmanager
def _float32_noise():
    """The stock modules' randn_tensor drawing float32 noise (then cast): a float64 loop with a float32 loop's noise."""

    def draw(shape, generator=None, device=None, dtype=None, layout=None):
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    modules = (scheduling_lcm, scheduling_tcd, scheduling_flow_match_lcm)
    saved = [m.randn_tensor for m in modules]
    for m in modules:
        m.randn_tensor = draw
    try:
        yield
    finally:
        for m, f in zip(modules, saved, strict=True):
            m.randn_tensor = f


def _assert_matches_stock(cls, config, steps, **kw):
    """Our float32 loop against the stock class's, both judged against the stock arithmetic in float64 with the
    same noise: x0 = (x - b m) / a amplifies float32 rounding by up to 1 / a_t (tests.helpers)."""
    ours = _loop(cls(**config), steps, **kw)
    stock = _loop(STOCK[cls](**config), steps, **kw)
    with _float32_noise():
        oracle = _loop(STOCK[cls](**config), steps, dtype=torch.float64, **kw)
    assert_loop_error_within(ours, stock, oracle)


# ---- LCM ----------------------------------------------------------------------------------------------------

LCM_CONFIGS = [
    {},
    {"timestep_scaling": 0.05},  # c_skip and c_out far from (0, 1) at the schedule's small timesteps
    {"original_inference_steps": 30, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {"prediction_type": "sample"},
    {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True},
    {"prediction_type": "v_prediction", "set_alpha_to_one": False, "beta_schedule": "squaredcos_cap_v2"},
]


# Mutations checked: c_skip / c_out taken at timestep_scaling = 1 fails the timestep_scaling=0.05 config (at the
# default 10 they are within float32 rounding of (0, 1) on these schedules); c (the re-noising std) * 0.99 fails
# every config with more than one step.
@pytest.mark.parametrize("config", LCM_CONFIGS)
@pytest.mark.parametrize("steps", [1, 3, 7])
def test_lcm_whole_loop_matches_diffusers(config, steps):
    _assert_matches_stock(LCMGMMScheduler, config, steps)


@pytest.mark.parametrize(
    "set_kwargs",
    [
        {"original_inference_steps": 20},
        {"strength": 0.6},
        {"timesteps": [999, 759, 499, 259, 19]},
        {"timesteps": [899, 601, 333, 7], "strength": 0.5},  # num_inference_steps (4) > len(timesteps): no last step
    ],
)
def test_lcm_set_timesteps_options_match_diffusers(set_kwargs):
    steps = None if "timesteps" in set_kwargs else 4
    _assert_matches_stock(LCMGMMScheduler, {}, steps, set_kwargs=set_kwargs)


def test_lcm_mid_schedule_start_and_generator_list_match_diffusers():
    _assert_matches_stock(LCMGMMScheduler, {}, 6, begin=2)
    gens = lambda: [torch.Generator().manual_seed(k) for k in (5, 6)]  # noqa: E731
    ours, stock = LCMGMMScheduler(), diffusers.LCMScheduler()
    outs = []
    for s in (ours, stock):
        s.set_timesteps(5)
        x, g = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)), gens()
        for t in s.timesteps:
            x = s.step(_model(x, t), t, x, generator=g).prev_sample
        outs.append(x)
    assert_close(*outs, kind="f32_loop_upstream")


@pytest.mark.parametrize("config", [{"clip_sample": True}, {"thresholding": True, "sample_max_value": 2.0}])
def test_lcm_clipped_x0_falls_back_to_diffusers(config):
    torch.testing.assert_close(_loop(LCMGMMScheduler(**config), 5), _loop(diffusers.LCMScheduler(**config), 5))


def test_lcm_without_generator_draws_from_torch_as_diffusers():
    # GMM off, seed None: the noise comes from torch's global RNG exactly as the stock class draws it
    torch.manual_seed(11)
    ours = _loop(LCMGMMScheduler(), 4, seed=None)
    after = torch.randn(1)
    torch.manual_seed(11)
    stock = _loop(diffusers.LCMScheduler(), 4, seed=None)
    assert_close(ours, stock, kind="f32_loop_upstream")
    assert torch.equal(after, torch.randn(1))  # the loop left the global RNG where the stock loop does


# ---- TCD ----------------------------------------------------------------------------------------------------

TCD_CONFIGS = [
    {},
    {"prediction_type": "sample", "original_inference_steps": 30},
    {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "beta_schedule": "linear"},
    {"clip_sample": True, "thresholding": True},  # the stock step ignores both
]


# Mutations checked: s' = floor((1 - eta) p) replaced by p fails every eta > 0 with more than one step (at eta = 0
# they are equal); the noise ratio abar_p / abar_s' inverted fails the same cases.
@pytest.mark.parametrize("config", TCD_CONFIGS)
@pytest.mark.parametrize("eta", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("steps", [1, 4, 7])
def test_tcd_whole_loop_matches_diffusers(config, eta, steps):
    _assert_matches_stock(TCDGMMScheduler, config, steps, eta=eta)


@pytest.mark.parametrize(
    "set_kwargs", [{"original_inference_steps": 20}, {"timesteps": [999, 701, 433, 97]}, {"strength": 0.5}]
)
def test_tcd_set_timesteps_options_and_mid_start_match_diffusers(set_kwargs):
    steps = None if "timesteps" in set_kwargs else 5
    _assert_matches_stock(TCDGMMScheduler, {}, steps, set_kwargs=set_kwargs, eta=0.4)
    _assert_matches_stock(TCDGMMScheduler, {}, 7, begin=3, eta=0.4)


def test_tcd_eta_change_rebuilds_the_rows():
    # a loop with eta 0.5 after one with the default: the rows follow the step's eta
    s = TCDGMMScheduler()
    _loop(s, 4)
    ours = _loop(s, 4, eta=0.5)
    assert_close(ours, _loop(diffusers.TCDScheduler(), 4, eta=0.5), kind="f32_loop_upstream")


# ---- flow-matching LCM --------------------------------------------------------------------------------------

FLOW_CONFIGS = [
    {},
    {"shift": 3.0},
    {"invert_sigmas": True},
    {"use_karras_sigmas": True},
    {"shift_terminal": 0.1, "shift": 2.0},
    {"use_dynamic_shifting": True, "time_shift_type": "linear"},
]


# Mutation checked: c = 0.99 s fails every config but the one-step ones (s = 0 there, unless invert_sigmas).
@pytest.mark.parametrize("config", FLOW_CONFIGS)
@pytest.mark.parametrize("steps", [1, 4, 7])
def test_flow_lcm_whole_loop_matches_diffusers(config, steps):
    kw = {"set_kwargs": {"mu": 0.8}} if config.get("use_dynamic_shifting") else {}
    if steps == 1 and "shift_terminal" in config:  # the stock stretch divides 0 by 0: a NaN sigma, refused here
        with pytest.raises(ValueError, match="sigmas must lie in \\[0, 1\\], got \\[nan"):
            FlowMatchLCMGMMScheduler(**config).set_timesteps(1)
        return
    ours = _loop(FlowMatchLCMGMMScheduler(**config), steps, **kw)
    stock = _loop(diffusers.FlowMatchLCMScheduler(**config), steps, **kw)
    assert_close(ours, stock, kind="f32")


def test_flow_lcm_custom_sigmas_mid_start_and_scale_wise_fallback():
    sig = {"set_kwargs": {"sigmas": [1.0, 0.75, 0.4, 0.1]}}
    assert_close(_loop(FlowMatchLCMGMMScheduler(), None, **sig), _loop(diffusers.FlowMatchLCMScheduler(), None, **sig),
                 kind="f32")  # fmt: skip
    assert_close(_loop(FlowMatchLCMGMMScheduler(), 6, begin=2), _loop(diffusers.FlowMatchLCMScheduler(), 6, begin=2),
                 kind="f32")  # fmt: skip
    outs = []
    for cls in (FlowMatchLCMGMMScheduler, diffusers.FlowMatchLCMScheduler):
        s = cls()
        s.set_timesteps(3)
        s.set_scale_factors([1.0, 2.0], "nearest")
        x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(1)
        for t in s.timesteps:
            x = s.step(torch.tanh(x), t, x, generator=g).prev_sample
        outs.append(x)
    assert outs[0].shape == (1, 2, 8, 8)
    torch.testing.assert_close(*outs)


# ---- every class: save / load, compile -----------------------------------------------------------------------


@pytest.mark.parametrize("cls", list(STOCK))
def test_save_load_round_trip_and_from_stock_config(tmp_path, cls):
    s = cls.from_config(STOCK[cls]().config, gmm_variant="ortho", gmm_n_components=3, seed=4)
    assert isinstance(s, cls) and s.config.gmm_variant == "ortho"
    kw = {"eta": 0.5} if cls is TCDGMMScheduler else {}
    first = _loop(s, 4, seed=None, **kw)
    s.save_pretrained(tmp_path)
    back = cls.from_pretrained(tmp_path)
    assert back.config.gmm_variant == "ortho" and back.config.seed == 4
    assert_close(_loop(back, 4, seed=None, **kw), first, kind="exact")
    assert not torch.allclose(first, _loop(cls(seed=4), 4, seed=None, **kw))  # the mixture changed the samples


@pytest.mark.parametrize(
    ("cls", "config", "kw"),
    [(LCMGMMScheduler, {}, {}), (TCDGMMScheduler, {"gmm_variant": "ortho", "gmm_n_components": 3}, {"eta": 0.5})],
    ids=["lcm", "tcd_gmm"],
)
def test_whole_loop_compiles_once(cls, config, kw):
    # model + step compiled with fullgraph from the first call; error_on_recompile turns a step number baked into
    # the graph into a failure. Checked to fail with the step index taken from the host counter (a recompile), and
    # (TCD) with prepare_gmm ignoring its eta (the rows of eta 0.3 in the graph: a RuntimeError).
    torch._dynamo.reset()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))

    def make():
        s = cls(seed=2, **config)
        s.set_timesteps(5)
        s.prepare_gmm(x, **kw)
        return s

    def denoise(s, y, t):
        with torch.no_grad():
            return s.step(torch.tanh(y) + t / 1000, t, y, **kw).prev_sample

    def loop(s, fn):
        y = x
        for t in s.timesteps:
            y = fn(s, y, t)
        return y

    expected = loop(make(), denoise)
    compiled = torch.compile(denoise, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        actual = loop(make(), compiled)
    assert_close(actual, expected, kind="f32")


# ---- GMM: one step's moments --------------------------------------------------------------------------------

N_MC = 20000
MC_STEP = 0  # the first step: the largest noise level, where no variance offset is clipped at gmm_scale 1


def _moment_inputs():
    """N_MC copies of one (x, m)."""
    g = torch.Generator().manual_seed(0)
    x, m = (torch.randn(1, 3, 4, 4, generator=g).expand(N_MC, 3, 4, 4).contiguous() for _ in range(2))
    return x, m


def _moment_case(cls, variant):
    """(ours, out, mean, std): one re-noising step of a 4-step schedule (offsets large enough that dropping their
    variance shows, none clipped) with the GMM on a batch of N_MC copies
    of one (x, m), and the stock step's mean and noise std there (the stock step is affine in its noise)."""
    kw = {"eta": 0.6} if cls is TCDGMMScheduler else {}
    ours = cls(gmm_variant=variant, gmm_n_components=4, gmm_scale=2.0 if variant == "ortho" else 1.0, seed=5)
    stock = STOCK[cls]()
    for s in (ours, stock):
        s.set_timesteps(4)
    i = MC_STEP
    t = ours.timesteps[i]
    x, m = _moment_inputs()
    stock._step_index = i
    zero = stock.step(m[:1], t, x[:1], generator=torch.Generator().manual_seed(1), **kw).prev_sample
    stock._step_index = i
    one = stock.step(m[:1], t, x[:1], generator=torch.Generator().manual_seed(1), **kw).prev_sample
    assert torch.equal(zero, one)
    # the stock step's mean and std: its prev_sample minus its noise term, and the coefficient of the noise
    if cls is FlowMatchLCMGMMScheduler:
        std = float(stock.sigmas[i + 1])
    else:
        abar = stock.alphas_cumprod.double()
        p = int(stock.timesteps[i + 1])
        if cls is LCMGMMScheduler:
            std = math.sqrt(1 - abar[p])
        else:
            s_ = int(math.floor((1 - kw["eta"]) * p))
            std = math.sqrt(1 - abar[p] / abar[s_])
    noise = randn_tensor(zero.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    mean = (zero.double() - std * noise.double())[0]
    ours._step_index = i
    out = ours.step(m, t, x, **kw).prev_sample.double()
    return ours, out, mean, std


# Mutation checked (each class): the rows' c * 0.95 (the mixture then matches a smaller noise) fails the variance;
# a GMM with its variance offsets dropped (set_gmm_params) fails it too, below.
@pytest.mark.parametrize("variant", ["ortho", "ortho-lr"])
@pytest.mark.parametrize("cls", list(STOCK))
def test_gmm_one_step_moments_equal_the_stock_step(cls, variant):
    ours, out, mean, std = _moment_case(cls, variant)
    gmm = ours.gmm
    assert gmm is not None and float(gmm.var_offsets.max()) < std**2  # nothing clipped: c^2 >= g^2 v_k
    centred = out - mean
    assert (centred.mean(0).abs() < MC_SIGMAS_WIDE * std / N_MC**0.5).all()
    tol = MC_SIGMAS_WIDE * (2 / N_MC) ** 0.5
    assert_within(centred.var(0) / std**2, torch.ones_like(centred[0]), tol)
    k = out.flatten(1)[:, 0]
    assert k.unique().numel() > 100  # noise, not only the K offsets


@pytest.mark.parametrize("cls", list(STOCK))
def test_gmm_moment_oracle_sees_dropped_variance_offsets(cls):
    # the planted mutation of the oracle above on the GMM side: the variance offsets dropped (as test_moments does),
    # so the offsets' variance comes on top of the full noise
    ours, out, mean, std = _moment_case(cls, "ortho")
    gmm = ours.gmm
    gmm.var_offsets = torch.zeros_like(gmm.var_offsets)
    gmm._cache = {}
    kw = {"eta": 0.6} if cls is TCDGMMScheduler else {}
    x, m = _moment_inputs()
    ours._step_index = MC_STEP
    bad = ours.step(m, ours.timesteps[MC_STEP], x, **kw).prev_sample.double()
    ratio = (bad - mean).var(0) / std**2
    assert ratio.max() > 1 + 2 * MC_SIGMAS_WIDE * (2 / N_MC) ** 0.5


# ---- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "config", "match"),
    [
        (LCMGMMScheduler, {"prediction_type": "flow"}, "prediction_type must be"),
        (TCDGMMScheduler, {"prediction_type": "x0"}, "prediction_type must be"),
        (LCMGMMScheduler, {"timestep_scaling": 0.0}, "timestep_scaling must be a finite number > 0"),
        (LCMGMMScheduler, {"original_inference_steps": 0}, "original_inference_steps must be an int >= 1"),
        (LCMGMMScheduler, {"clip_sample": True, "gmm_variant": "ortho"}, "needs clip_sample=False"),
        (LCMGMMScheduler, {"thresholding": True, "gmm_variant": "ortho"}, "no fused noise for a mixture"),
        (FlowMatchLCMGMMScheduler, {"scale_factors": [1.5], "gmm_variant": "ortho"}, "needs scale_factors=None"),
        (FlowMatchLCMGMMScheduler, {"shift": 0.0}, "shift must be a finite number > 0"),
        (LCMGMMScheduler, {"gmm_variant": "nope"}, "gmm_variant"),
        (
            TCDGMMScheduler,
            {"beta_schedule": "linear", "beta_start": 0.1, "beta_end": 2.0},
            "must give betas in \\[0, 1\\]",
        ),
        (LCMGMMScheduler, {"trained_betas": [0.01] * 10}, "trained_betas must have num_train_timesteps=1000 values"),
    ],
)
def test_bad_config_is_refused(cls, config, match):
    with pytest.raises(ValueError, match=match):
        cls(**config)


def test_tcd_gmm_at_eta_zero_is_refused_before_any_work():
    s = TCDGMMScheduler(gmm_variant="ortho", seed=0)
    s.set_timesteps(4)
    x = torch.randn(SHAPE)
    before = x.clone()
    with pytest.raises(ValueError, match="eta \\(gamma\\) = 0 is deterministic .* no noise to replace"):
        s.step(x, s.timesteps[0], x, eta=0.0)
    assert s.step_index is None and torch.equal(x, before)
    with pytest.raises(ValueError, match="no noise to replace"):
        s.prepare_gmm(x, eta=0.0)
    plain = TCDGMMScheduler()
    plain.set_timesteps(4)
    plain.step(x, plain.timesteps[0], x, eta=0.0)  # deterministic GMM-off steps are fine
    with pytest.raises(ValueError, match="set_gmm_params: TCD with eta"):
        plain.set_gmm_params(dg.GMM.create(192, n_components=2, n_steps=4, variant="ortho"))


@pytest.mark.parametrize("cls", list(STOCK))
def test_bad_step_input_is_refused(cls):
    s = cls()
    for bad in (0, -2, True):
        with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1"):
            s.set_timesteps(bad)
    s.set_timesteps(4)
    x = torch.randn(SHAPE)
    t = s.timesteps[0]
    with pytest.raises(ValueError, match="model_output must have the sample's shape"):
        s.step(x[:1], t, x)
    with pytest.raises(TypeError, match="model_output must be a real floating-point tensor"):
        s.step(x.long(), t, x)
    with pytest.raises(TypeError, match="generator must be"):
        s.step(x, t, x, generator=3)
    assert s.step_index is None  # nothing was done
    with pytest.raises(ValueError, match="begin_index must be an int >= 0"):
        s.set_begin_index(-1)
    if cls is TCDGMMScheduler:
        for eta in (-0.1, 1.5, float("nan")):
            with pytest.raises(ValueError, match="eta \\(TCD's gamma\\) must be a number in \\[0, 1\\]"):
                s.step(x, t, x, eta=eta)
    if cls is not FlowMatchLCMGMMScheduler:
        with pytest.raises(ValueError, match="timesteps must be >= 0"):
            s.set_timesteps(timesteps=[500, -1])
        with pytest.raises(ValueError, match="not in the schedule"):
            s.step(x, 3, x)


@pytest.mark.parametrize("cls", list(STOCK))
def test_gmm_steps_select_the_re_noising_steps_as_on_ddim(cls):
    # gmm_steps reads the rows' c and g columns as DDIM's: a list leaves the other steps Gaussian (the same Philox
    # noise as the GMM off with that seed), and "matched" drops every step where a variance offset would clip
    # (gmm_scale 10: all of them). Checked to fail with the gate planted out (GMMSchedulerMixin._gate returning the
    # rows unchanged).
    kw = {"eta": 0.5} if cls is TCDGMMScheduler else {}

    def run(steps, **config):
        s = cls(seed=3, **config)
        s.set_timesteps(4)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
        outs = []
        for t in s.timesteps[:steps]:
            x = s.step(_model(x, t), t, x, **kw).prev_sample
            outs.append(x)
        return outs, s

    off, _ = run(3)
    listed, _ = run(3, gmm_variant="ortho", gmm_steps=[1])
    assert torch.equal(listed[0], off[0]) and not torch.allclose(listed[1], off[1])
    matched, s = run(3, gmm_variant="ortho", gmm_scale=10.0, gmm_steps="matched")
    assert s.gmm is not None and torch.equal(matched[2], off[2])
    assert dg.gmm.matched_steps(s.gmm, s._schedule_rows()[:3, 4]) == [False] * 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("cls", list(STOCK))
def test_output_fields_and_dtypes_match_the_stock_class(cls, dtype):
    # Checked to fail with LCM's prev_sample promoted to float32 for a half sample (the op's compute dtype).
    outs = []
    for c in (cls, STOCK[cls]):
        s = c()
        s.set_timesteps(3)
        x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
        g = torch.Generator().manual_seed(1)
        for t in s.timesteps:
            out = s.step(torch.tanh(x), t, x, generator=g)
            x = out.prev_sample
        outs.append({k: v.dtype for k, v in out.items()})
    assert outs[0] == outs[1]


@pytest.mark.parametrize("cls", list(STOCK))
def test_gmm_stream_seed_is_drawn_at_the_first_step_not_at_set_timesteps(cls):
    # seed=None with a GMM: set_timesteps leaves torch's global RNG alone (a pipeline draws its latents after it);
    # each run draws its stream seed at its first step. Checked to fail with the seed drawn in set_timesteps.
    kw = {"eta": 0.3} if cls is TCDGMMScheduler else {}
    s = cls(gmm_variant="ortho", gmm_n_components=3)
    torch.manual_seed(5)
    s.set_timesteps(4)
    assert torch.equal(torch.get_rng_state(), torch.random.manual_seed(5).get_state())
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(_loop(s, 4, seed=None, **kw))
    assert_close(runs[1], runs[0], kind="exact")
    assert not torch.allclose(runs[2], runs[0])
