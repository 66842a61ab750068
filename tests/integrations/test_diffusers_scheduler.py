"""DDIMGMMScheduler: parity with diffusers' DDIMScheduler, config round trips, pipelines, compile, bad input."""

import inspect

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel  # noqa: E402

import ddim_gmm_ext as dg  # noqa: E402
from ddim_gmm_ext.diffusers import DDIMGMMScheduler  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

SHAPE = (2, 3, 4, 4)


def _model(x, t):
    """A smooth stand-in for a UNet output, depending on the sample and the timestep."""
    return torch.sin(3 * x) + 0.1 * float(t) / 1000


def _run(scheduler, steps, x, noises, **step_kwargs):
    """(samples, x0 predictions) along a sampling run with the given per-step variance noise."""
    scheduler.set_timesteps(steps)
    xs, x0s = [], []
    for i, t in enumerate(scheduler.timesteps):
        out = scheduler.step(_model(x, t), t, x, variance_noise=noises[i], **step_kwargs)
        x = out.prev_sample
        xs.append(x)
        x0s.append(out.pred_original_sample)
    return torch.stack(xs), torch.stack(x0s)


def _assert_parity(config, eta, use_clipped_model_output=False, steps=5):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPE, generator=gen)
    noises = torch.randn((steps, *SHAPE), generator=gen)
    kwargs = dict(eta=eta, use_clipped_model_output=use_clipped_model_output)
    expected = _run(DDIMScheduler(**config), steps, x, noises, **kwargs)
    actual = _run(DDIMGMMScheduler(**config), steps, x, noises, **kwargs)
    for a, e in zip(actual, expected, strict=False):
        assert_close(a, e, kind="f32_loop_upstream")


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_gmm_off_equals_ddim(prediction_type, spacing, eta):
    _assert_parity(dict(prediction_type=prediction_type, timestep_spacing=spacing), eta)


@pytest.mark.parametrize(
    "config, use_clipped",
    [
        (dict(clip_sample=False), False),
        (dict(clip_sample_range=0.5), True),
        (dict(thresholding=True, sample_max_value=1.5, prediction_type="v_prediction"), False),
        (dict(thresholding=True, dynamic_thresholding_ratio=0.9), True),
        (dict(set_alpha_to_one=False, steps_offset=1, beta_schedule="scaled_linear", beta_end=0.012), False),
        (dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample"), True),
        (dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"), False),
        (dict(trained_betas=torch.linspace(1e-4, 0.03, 500).tolist(), num_train_timesteps=500), False),
    ],
)
def test_gmm_off_equals_ddim_configs(config, use_clipped):
    _assert_parity(config, eta=0.7, use_clipped_model_output=use_clipped)


def test_keeps_every_ddim_config_key_and_default():
    ours = inspect.signature(DDIMGMMScheduler.__init__).parameters
    for name, p in inspect.signature(DDIMScheduler.__init__).parameters.items():
        assert name in ours and ours[name].default == p.default, name
    assert (
        inspect.signature(DDIMGMMScheduler.step).parameters.keys()
        == inspect.signature(DDIMScheduler.step).parameters.keys()
    )


def test_generator_parity_single_and_list():
    """The same generator state gives diffusers' result (noise drawn with randn_tensor, as DDIMScheduler)."""
    x = torch.randn(SHAPE)
    for make in (lambda: torch.Generator().manual_seed(3), lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]):
        results = []
        for cls in (DDIMScheduler, DDIMGMMScheduler):
            s = cls(clip_sample=False)
            s.set_timesteps(4)
            gen, y = make(), x
            for t in s.timesteps:
                y = s.step(_model(y, t), t, y, eta=1.0, generator=gen).prev_sample
            results.append(y)
        assert_close(results[1], results[0], kind="f32_loop_upstream")


def test_philox_stream_is_batch_invariant_and_seeded():
    """Without generator / variance_noise, a sample depends on (seed, its index), not on the batch around it."""
    x = torch.randn(SHAPE)

    def run(batch, seed):
        s = DDIMGMMScheduler(clip_sample=False, gmm_variant="ortho", gmm_n_components=3, seed=seed)
        s.set_timesteps(3)
        y = batch
        for t in s.timesteps:
            y = s.step(_model(y, t), t, y, eta=0.8).prev_sample
        return y

    full = run(x, 5)
    torch.testing.assert_close(run(x[:1], 5), full[:1])
    torch.testing.assert_close(run(x, 5), full)
    assert not torch.allclose(run(x, 6), full)


def test_gmm_matches_ddim_step_with_the_same_tables():
    """With GMM on, each step is dg.ddim_step of the same abar pair, GMM set, step index and seed; with
    final_step="gaussian" (the default) the last step has no GMM."""
    gmm = dg.GMM.create(48, n_components=4, n_steps=3, variant="rand", seed=2)
    s = DDIMGMMScheduler(clip_sample=False, seed=9)
    s.set_gmm_params(gmm_params=gmm)
    s.set_timesteps(3)
    x = y = torch.randn(SHAPE)
    for i, t in enumerate(s.timesteps):
        m = _model(y, t)
        prev = t - 1000 // 3
        abar_prev = s.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0)
        step_gmm = gmm if i < 2 else None
        expected = dg.ddim_step(m, y, s.alphas_cumprod[t], abar_prev, eta=0.5, gmm=step_gmm, step_index=i, seed=9)
        x = s.step(_model(x, t), t, x, eta=0.5).prev_sample
        y = expected.prev_sample
        assert_close(x, y, kind="f32_loop_upstream")


def test_gmm_tables_built_lazily_cached_and_rebuilt_for_a_new_size():
    s = DDIMGMMScheduler(gmm_variant="ortho-vub*", gmm_n_components=2, seed=0)
    assert s.gmm is None
    s.set_timesteps(2)
    s.step(torch.zeros(SHAPE), s.timesteps[0], torch.zeros(SHAPE))
    first = s.gmm
    assert first.dim == 48 and first.shared
    s.step(torch.zeros(SHAPE), s.timesteps[1], torch.zeros(SHAPE))
    assert s.gmm is first
    s.set_timesteps(2)
    s.step(torch.zeros(1, 2, 4, 4), s.timesteps[0], torch.zeros(1, 2, 4, 4))
    assert s.gmm is not first and s.gmm.dim == 32


def test_config_round_trips(tmp_path):
    s = DDIMGMMScheduler(prediction_type="v_prediction", gmm_variant="rand", gmm_scale=2.0, seed=4)
    s.save_pretrained(tmp_path)
    loaded = DDIMGMMScheduler.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(s.config)
    from_ddim = DDIMGMMScheduler.from_config(DDIMScheduler(steps_offset=1).config, gmm_variant="ortho")
    assert from_ddim.config.steps_offset == 1 and from_ddim.config.gmm_variant == "ortho"
    back = DDIMScheduler.from_config(s.config)
    assert back.config.prediction_type == "v_prediction"


def test_add_noise_and_get_velocity_unchanged():
    x0, noise, t = torch.randn(SHAPE), torch.randn(SHAPE), torch.tensor([10, 500])
    ours, theirs = DDIMGMMScheduler(), DDIMScheduler()
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t))
    torch.testing.assert_close(ours.get_velocity(x0, noise, t), theirs.get_velocity(x0, noise, t))


def _tiny_pipeline():
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_ddim_pipeline_with_and_without_gmm():
    pipe = _tiny_pipeline()

    def images(eta=0.5, seed=0):
        return pipe(
            batch_size=2,
            num_inference_steps=4,
            eta=eta,
            output_type="np",
            generator=torch.Generator().manual_seed(seed),
        ).images

    ddim = images()
    pipe.scheduler = DDIMGMMScheduler.from_config(pipe.scheduler.config)
    assert_close(images(), ddim, kind="f32")
    pipe.scheduler = DDIMGMMScheduler.from_config(pipe.scheduler.config, gmm_variant="ortho-vub", gmm_scale=5.0)
    gmm = images()
    assert gmm.shape == ddim.shape and (gmm != ddim).any()
    assert (images() == gmm).all() and (images(seed=1) != gmm).any()


def test_compiled_step_fullgraph_matches_eager():
    torch._dynamo.reset()

    def setup():
        s = DDIMGMMScheduler(clip_sample=False, gmm_variant="ortho", gmm_n_components=2, seed=1)
        s.set_timesteps(3)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        x = s.step(_model(x, 0), s.timesteps[0], x, eta=0.5).prev_sample  # builds the GMM tables eagerly
        return s, x

    (eager, x), (compiled, _) = setup(), setup()
    t = eager.timesteps[1]
    m = torch.sin(x)
    expected = eager.step(m, t, x, eta=0.5, return_dict=False)
    # the default (inductor) backend: the step is one fused op in the graph
    actual = torch.compile(compiled.step, fullgraph=True)(m, t, x, eta=0.5, return_dict=False)
    for a, e in zip(actual, expected, strict=False):
        torch.testing.assert_close(a, e)


def test_mid_schedule_loop_takes_the_step_index_from_the_timestep():
    # A loop starting at step 2 without set_begin_index must use GMM set 2 and Philox step 2, as the full loop
    # does there. Checked to fail with the index taken from a call counter (the previous behaviour).
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))

    def run(start):
        s = DDIMGMMScheduler(clip_sample=False, gmm_variant="ortho", gmm_n_components=3, gmm_scale=3.0, seed=7)
        s.set_timesteps(7)
        y, out = x, []
        for t in s.timesteps[start:]:
            y = s.step(_model(y, t), t, y, eta=1.0).prev_sample
            out.append(y)
        return out

    mid = run(2)
    # the same stream: stepping t_2 from the same x in a full-length schedule is bitwise the mid-start step
    s = DDIMGMMScheduler(clip_sample=False, gmm_variant="ortho", gmm_n_components=3, gmm_scale=3.0, seed=7)
    s.set_timesteps(7)
    s.step(_model(x, s.timesteps[0]), s.timesteps[0], x, eta=1.0)
    s.step(_model(x, s.timesteps[1]), s.timesteps[1], x, eta=1.0)
    third = s.step(_model(x, s.timesteps[2]), s.timesteps[2], x, eta=1.0).prev_sample
    assert_close(third, mid[0], kind="exact")
    assert s.step_index == 3


def test_set_begin_index_is_accepted_and_the_timestep_decides():
    s = DDIMGMMScheduler(gmm_variant="rand", gmm_n_components=2)
    s.set_timesteps(4)
    s.set_begin_index(2)
    for t in s.timesteps[2:]:
        s.step(torch.zeros(SHAPE), t, torch.zeros(SHAPE))
    assert s.step_index == 4
    with pytest.raises(ValueError, match="begin_index must be an int"):
        s.set_begin_index(-1)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(eta=1.5), ValueError, "eta must be a number in"),
        (dict(eta=-0.1), ValueError, "eta must be a number in"),
        (dict(variance_noise=torch.zeros(1, 3, 4, 4)), ValueError, "variance_noise must have the sample's shape"),
        (dict(generator=[torch.Generator()] * 3), ValueError, "list of 3 generators but the batch has 2"),
        (dict(generator="seed"), TypeError, "generator must be"),
        (dict(eta=0.5, generator=torch.Generator(), variance_noise=torch.zeros(SHAPE)), ValueError, "Cannot pass both"),
        (dict(timestep=torch.tensor([1, 2])), ValueError, "timestep must be one integer timestep"),
        (dict(timestep=1000), ValueError, r"timestep must be in \[0, 1000\)"),
        (dict(timestep=-1), ValueError, r"timestep must be in \[0, 1000\)"),
        (dict(timestep=2.5), TypeError, "timestep must be an int"),
    ],
)
def test_bad_step_input(kwargs, error, match):
    s = DDIMGMMScheduler()
    s.set_timesteps(2)
    timestep = kwargs.pop("timestep", s.timesteps[0])
    with pytest.raises(error, match=match):
        s.step(torch.zeros(SHAPE), timestep, torch.zeros(SHAPE), **kwargs)


def test_bad_use_and_config():
    with pytest.raises(ValueError, match="set_timesteps"):
        DDIMGMMScheduler().step(torch.zeros(SHAPE), 10, torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="gmm_variant must be"):
        DDIMGMMScheduler(gmm_variant="orthogonal")
    with pytest.raises(ValueError, match="seed"):
        DDIMGMMScheduler(seed=-1)
    with pytest.raises(ValueError, match="prediction_type"):
        DDIMGMMScheduler(prediction_type="flow")
    s = DDIMGMMScheduler()
    with pytest.raises(TypeError, match="gmm_params"):
        s.set_gmm_params(gmm_params="ortho")
    s.set_gmm_params(gmm_params=dg.GMM.create(48, n_components=2, n_steps=2))
    with pytest.raises(ValueError, match="gmm_params has parameter sets for 2 steps but sampling takes 3"):
        s.set_timesteps(3)
    s.set_timesteps(2)
    with pytest.raises(ValueError, match="gmm_params was built for dim=48"):
        s.step(torch.zeros(2, 2, 4, 4), s.timesteps[0], torch.zeros(2, 2, 4, 4))


@pytest.mark.parametrize("steps", [0, -3, True, 2.0, 1001])
def test_bad_step_counts(steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        DDIMGMMScheduler().set_timesteps(steps)


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(beta_start=-0.001), r"beta_start / beta_end \(linear\) must give betas in \[0, 1\]"),
        (dict(steps_offset=-3), "steps_offset must be an int >= 0"),
        (dict(trained_betas=[0.01] * 10), "trained_betas must have num_train_timesteps=1000 values, got 10"),
        (dict(trained_betas=[1.5] * 1000), "trained_betas must give betas"),
        (dict(timestep_spacing="sometimes"), "timestep_spacing must be one of"),
    ],
)
def test_bad_config_values(config, match):
    with pytest.raises(ValueError, match=match):
        DDIMGMMScheduler(**config)


@pytest.fixture
def patched_diffusers():
    from ddim_gmm_ext.diffusers import patch_diffusers, unpatch_diffusers

    patch_diffusers()
    yield
    unpatch_diffusers()


def test_saved_pipeline_round_trips_with_our_scheduler(tmp_path, patched_diffusers):
    # Checked to fail without the SchedulerMixin name in ddim_gmm_ext.diffusers ("cannot be loaded ...").
    from diffusers import DiffusionPipeline

    pipe = _tiny_pipeline()
    pipe.scheduler = DDIMGMMScheduler.from_config(pipe.scheduler.config, gmm_variant="ortho", gmm_scale=2.0, seed=3)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is DDIMGMMScheduler and loaded.scheduler.config.gmm_scale == 2.0
    explicit = DiffusionPipeline.from_pretrained(tmp_path, scheduler=DDIMGMMScheduler(seed=1))
    assert explicit.scheduler.config.seed == 1
    # DDIMPipeline keeps a GMM scheduler once patched (stock diffusers converts it to a plain DDIMScheduler)
    assert type(DDIMPipeline.from_pretrained(tmp_path).scheduler) is DDIMGMMScheduler
    # the stock class loads our config; the GMM keys stay as hidden keys and come back in our class
    stock = DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert type(stock) is DDIMScheduler and stock.config.clip_sample is False
    assert DDIMGMMScheduler.from_config(stock.config).config.gmm_variant == "ortho"
    assert DDIMGMMScheduler in pipe.scheduler.compatibles
    assert DDIMGMMScheduler in _tiny_pipeline().scheduler.compatibles
    from diffusers import EulerDiscreteScheduler

    assert DDIMGMMScheduler in EulerDiscreteScheduler().compatibles


def test_ddim_pipeline_constructor_keeps_the_gmm(patched_diffusers):
    pipe = _tiny_pipeline()
    gmm_sched = DDIMGMMScheduler.from_config(pipe.scheduler.config, gmm_variant="ortho-vub", gmm_scale=5.0)
    kept = DDIMPipeline(unet=pipe.unet, scheduler=gmm_sched)
    assert kept.scheduler is gmm_sched
    from diffusers import PNDMScheduler

    converted = DDIMPipeline(unet=pipe.unet, scheduler=PNDMScheduler())
    assert type(converted.scheduler) is DDIMScheduler


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("gmm_variant", [None, "ortho"])
@pytest.mark.parametrize("family", ["ddim", "flow"])
def test_whole_loop_compiles_once(family, gmm_variant, eta):
    # model + step compiled with fullgraph; error_on_recompile turns any recompile (a step number baked into
    # the graph) into a failure. Checked to fail with the host counter as the step index.
    from ddim_gmm_ext.diffusers import FlowMatchEulerDiscreteGMMScheduler

    torch._dynamo.reset()
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def make():
        if family == "ddim":
            s = DDIMGMMScheduler(clip_sample=False, gmm_variant=gmm_variant, gmm_n_components=2, seed=1)
        else:
            s = FlowMatchEulerDiscreteGMMScheduler(shift=3.0, rfim_eta=eta, gmm_variant=gmm_variant, seed=1)
        s.set_timesteps(10)
        s.prepare_gmm(x)
        return s

    def loop(s, fn):
        y = x
        for t in s.timesteps:
            y = fn(s, y, t)
        return y

    def denoise(s, y, t):
        with torch.no_grad():
            m = torch.tanh(conv(y)) + t / 1000
            kwargs = dict(eta=eta) if family == "ddim" else {}
            return s.step(m, t, y, **kwargs).prev_sample

    x = torch.randn(SHAPE[0], 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = loop(make(), denoise)
    compiled = torch.compile(denoise, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        actual = loop(make(), compiled)
    assert_close(actual, expected, kind="f32")


def test_a_flow_matching_config_is_refused():
    from diffusers import FlowMatchEulerDiscreteScheduler

    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteGMMScheduler"):
        DDIMGMMScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)


def test_a_step_over_the_schedule_finds_its_index_without_device_work():
    # Iterating over scheduler.timesteps yields views: their position comes from the storage offset on the
    # host (on CUDA: a precomputed 0-d index tensor, so the step is one kernel launch). A copy of the same
    # value takes the lookup path and gives the same index; a view of another tensor is not mistaken for one.
    s = DDIMGMMScheduler()
    s.set_timesteps(7)
    for i, t in enumerate(s.timesteps):
        assert s._schedule_position(t) == i and s._index(t, t.device) == i
        assert s._schedule_position(t.clone()) is None and s._index(t.clone(), t.device) == i
    other = s.timesteps.clone()
    assert s._schedule_position(other[3]) is None


@pytest.mark.parametrize("config", [{}, dict(steps_offset=1), dict(timestep_spacing="trailing")])
def test_timesteps_off_the_schedule_follow_ddim_scheduler(config):
    # DDIMScheduler steps from any training timestep t to t - T // N; with the GMM off ours does the same (it
    # refused them before). diffusers' own check_over_forward steps from t = 0, 1, 10, 49. With a GMM on,
    # an off-schedule timestep has no parameter set and is refused. Checked to fail with the off-schedule
    # row's previous timestep taken as t - 1.
    from diffusers import DDIMScheduler

    ours, stock = DDIMGMMScheduler(**config), DDIMScheduler(**config)
    for s in (ours, stock):
        s.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x, m = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    for t in (0, 1, 10, 49, 999):
        for eta in (0.0, 1.0):
            a = ours.step(m, t, x, eta=eta, generator=torch.Generator().manual_seed(t))
            b = stock.step(m, t, x, eta=eta, generator=torch.Generator().manual_seed(t))
            # upstream's tolerance: at t = 999 rounding is amplified by 1 / a_t (about 150)
            assert_close(a.prev_sample, b.prev_sample, kind="f32_loop_upstream")
            assert_close(a.pred_original_sample, b.pred_original_sample, kind="f32_loop_upstream")
    gmm = DDIMGMMScheduler(gmm_variant="ortho", gmm_n_components=3, **config)
    gmm.set_timesteps(10)
    with pytest.raises(ValueError, match="is not in the schedule .* turn the GMM off"):
        gmm.step(m, 49, x)


@pytest.mark.parametrize("prev_only", [False, True])
def test_fast_scheduler_output_is_the_dataclass(prev_only):
    # scheduler_output skips BaseOutput.__post_init__ (about a quarter of a small step); what users touch must be
    # what the dataclass gives: entries, attributes, tuple / int / str indexing, pickling, pytree flattening.
    # Checked to fail with the OrderedDict entry left out, and with None fields stored as entries.
    import pickle

    import torch.utils._pytree as pytree
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

    from ddim_gmm_ext.integrations.diffusers._base import scheduler_output

    prev, x0 = torch.randn(SHAPE), None if prev_only else torch.randn(SHAPE)
    for cls, values in (
        (DDIMSchedulerOutput, dict(prev_sample=prev, pred_original_sample=x0)),
        (FlowMatchEulerDiscreteSchedulerOutput, dict(prev_sample=prev)),
    ):
        fast, slow = scheduler_output(cls, **values), cls(**values)
        assert type(fast) is cls and list(fast.keys()) == list(slow.keys())
        assert all(fast[k] is slow[k] for k in slow) and fast.to_tuple()[0] is slow[0]
        assert all(getattr(fast, name) is getattr(slow, name) for name in values)
        again = pickle.loads(pickle.dumps(fast))
        assert type(again) is cls and list(again.keys()) == list(slow.keys())
        assert torch.equal(again.prev_sample, prev)
        leaves, spec = pytree.tree_flatten(fast)
        assert len(leaves) == len(slow.keys()) and type(pytree.tree_unflatten(leaves, spec)) is cls


def test_one_step_schedule_follows_ddim_scheduler():
    # set_timesteps(1) crashed ('float' object has no attribute 'square': the reference returns one-element
    # coefficients as floats); a 1-step sampler is what distillation-style few-step users run.
    from diffusers import DDIMScheduler

    ours, stock = DDIMGMMScheduler(), DDIMScheduler()
    g = torch.Generator().manual_seed(1)
    x, m = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    for s in (ours, stock):
        s.set_timesteps(1)
    assert torch.equal(ours.timesteps, stock.timesteps)
    t = ours.timesteps[0]
    a = ours.step(m, t, x, eta=1.0, generator=torch.Generator().manual_seed(0))
    b = stock.step(m, t, x, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert_close(a.prev_sample, b.prev_sample, kind="f32_loop_upstream")
