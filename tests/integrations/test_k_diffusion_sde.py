"""sample_dpmpp_sde_gmm / sample_dpmpp_2s_ancestral_gmm: GMM off against the installed k-diffusion's
sample_dpmpp_sde / sample_dpmpp_2s_ancestral (whole loops on its eps and v wrappers and a flow denoiser, the
sigmas the denoiser and the noise sampler see, k-diffusion's default noise), the mixture's Monte Carlo moments per
sampler, the step rules over the two stages, GMM tables per stage, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import ddim_gmm_ext as dg
from ddim_gmm_ext.gmm import matched_steps
from ddim_gmm_ext.integrations.k_diffusion_sde import _plan
from ddim_gmm_ext.k_diffusion import sample_dpmpp_2s_ancestral_gmm, sample_dpmpp_sde_gmm
from tests.helpers import COMPARISONS, MC_SIGMAS, MC_SIGMAS_WIDE, assert_close, assert_within, is_close
from tests.integrations.test_comfy_flow import _flow_denoiser, _shift

SHAPE = (2, 2, 4, 4)
SAMPLERS = {"dpmpp_sde": sample_dpmpp_sde_gmm, "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral_gmm}


def _wrapped(kind: str, dtype):
    """k-diffusion's own wrappers (DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser, continuous t) around a smooth
    network of (scaled input, t) on SD's scaled-linear betas, or a flow denoiser (x = (1 - t) x0 + t eps)."""
    from tests.integrations.kdiffusion_upstream import load_external

    if kind == "flow":
        return _flow_denoiser()
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=dtype) ** 2
    abar = torch.cumprod(1 - betas, 0)

    def net(x, t):
        return torch.tanh(x) * 0.8 + 1e-4 * t.to(x.dtype)[:, None, None, None] * x

    wrapper = load_external().DiscreteEpsDDPMDenoiser if kind == "eps" else load_external().DiscreteVDDPMDenoiser
    return wrapper(net, abar, quantize=False)


def _schedule(kind: str, name: str, dtype):
    """7 steps (not dividing 1000): the wrapper's Karras sigmas (flow: SD3's shift-3 times from 1), its high half
    (ends above 0: a partial denoise), or a schedule with a repeated sigma."""
    from tests.integrations.kdiffusion_upstream import load_sampling

    if kind == "flow":
        full = _shift(torch.linspace(1, 0, 8, dtype=torch.float64)).to(dtype)
    else:
        model = _wrapped(kind, torch.float64)
        full = load_sampling().get_sigmas_karras(7, float(model.sigma_min), float(model.sigma_max)).to(dtype)
    return {"full": full, "partial": full[:4], "repeated": torch.cat([full[:3], full[2:]])}[name]


class _Recorder:
    """A noise sampler both loops share the sequence of: the n-th call returns the n-th draw of a seeded generator;
    the (sigma, sigma_next) of each call are recorded."""

    def __init__(self, dtype):
        self.gen, self.dtype, self.calls = torch.Generator().manual_seed(5), dtype, []

    def __call__(self, sigma, sigma_next):
        self.calls.append((sigma, sigma_next))
        return torch.randn(SHAPE, generator=self.gen, dtype=self.dtype)


CONFIGS = {  # the keyword arguments of both samplers (r: dpmpp_sde's)
    "eta1": dict(eta=1.0, s_noise=1.0),
    "eta0.5-r0.3": dict(eta=0.5, s_noise=0.8, r=0.3),
    "eta0-r1": dict(eta=0.0, r=1.0),
    "eta3": dict(eta=3.0, s_noise=1.1, r=0.7),  # sigma_up capped at sigma_next: 2S's Euler branch (sigma_down 0)
}


@pytest.mark.filterwarnings("ignore:Should have t:UserWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("schedule", ["full", "partial", "repeated"])
@pytest.mark.parametrize("kind", ["eps", "v", "flow"])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_gmm_off_equals_k_diffusion(sampler, config, kind, schedule, dtype):
    # Whole loops with one noise sequence, and the sigmas the denoiser and the noise sampler see equal to
    # k-diffusion's bit for bit. Checked to fail with (failing cases of 144): the stage-2 blend without D (fac = 1:
    # 54, the r != 1/2 dpmpp_sde cases), s_noise left out of stage 1's c (36), the intermediate sigma computed in
    # float64 and rounded (24 per sampler: its float32 cases), 2S's intermediate sigma from sigma_next instead of
    # sigma_down (42), the noise sampler skipped at eta 0 (18: dpmpp_sde's calls).
    from tests.integrations.kdiffusion_upstream import load_sampling

    kwargs = CONFIGS[config] if sampler == "dpmpp_sde" else {k: v for k, v in CONFIGS[config].items() if k != "r"}
    model = _wrapped(kind, dtype)
    sigmas = _schedule(kind, schedule, dtype)
    x = torch.randn(SHAPE, dtype=dtype, generator=torch.Generator().manual_seed(7)) * sigmas[0]
    seen = {"upstream": [], "ours": []}
    runs, noises = {}, {}
    for name, fn in (("upstream", getattr(load_sampling(), "sample_" + sampler)), ("ours", SAMPLERS[sampler])):
        noises[name] = _Recorder(dtype)
        extra = {} if name == "upstream" else {"gmm": None}

        def recorded(x, sigma, _seen=seen[name]):
            _seen.append(sigma)
            return model(x, sigma)

        runs[name] = fn(recorded, x, sigmas, disable=True, noise_sampler=noises[name], **kwargs, **extra)
    assert runs["ours"].dtype == dtype
    assert_close(runs["ours"], runs["upstream"], kind="f64_loop_ve" if dtype == torch.float64 else "f32_loop_upstream")
    assert len(seen["ours"]) == len(seen["upstream"])
    assert all(torch.equal(a, b) for a, b in zip(seen["ours"], seen["upstream"], strict=True))
    assert len(noises["ours"].calls) == len(noises["upstream"].calls)
    for a, b in zip(noises["ours"].calls, noises["upstream"].calls, strict=True):
        assert torch.equal(torch.as_tensor(a[0]), torch.as_tensor(b[0]))
        assert torch.equal(torch.as_tensor(a[1]), torch.as_tensor(b[1]))


def _model(x, sigma, **extra_args):
    s = sigma.to(x.dtype)[:, None, None, None]
    return torch.tanh(x / (1 + s**2).sqrt()) * (1 + 0.1 * s) - 0.05 * x


@pytest.mark.filterwarnings("ignore:Should have t:UserWarning")
@pytest.mark.parametrize("schedule", ["full", "partial"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_default_noise_is_k_diffusions(sampler, schedule):
    # No noise_sampler, no seed, GMM off: k-diffusion's default noise (dpmpp_sde: its Brownian tree over [min
    # positive sigma, max sigma], entropy from torch's default generator; 2S: torch.randn_like(x) per noisy step),
    # with the same draws from torch's default generator. Checked to fail with the Philox stream as the default
    # (4 of 4) and with an extra draw from torch's generator per 2S step (2).
    from tests.integrations.kdiffusion_upstream import load_sampling

    sigmas = _schedule("eps", schedule, torch.float32)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    torch.manual_seed(11)
    expected = getattr(load_sampling(), "sample_" + sampler)(_model, x, sigmas, disable=True)
    after_upstream = torch.get_rng_state()
    torch.manual_seed(11)
    got = SAMPLERS[sampler](_model, x, sigmas, disable=True, gmm=None)
    assert_close(got, expected, kind="f32_loop_upstream")
    assert torch.equal(torch.get_rng_state(), after_upstream)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_callback_extra_args_seeded_noise_and_sample_offset(sampler):
    # callback once per step as k-diffusion's (x, i, sigma, sigma_hat, denoised of the first evaluation); extra_args
    # reach both evaluations; a seed (argument or extra_args["seed"]) gives the Philox stream, the same sample
    # whatever its batch (sample_offset), with a GMM too.
    sigmas = _schedule("eps", "full", torch.float64)
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    seen, kw = [], []
    a = SAMPLERS[sampler](
        lambda x, s, **extra: kw.append(extra) or _model(x, s), x, sigmas, extra_args={"seed": 9}, gmm=None,
        disable=True, callback=seen.append,
    )  # fmt: skip
    assert kw == [{"seed": 9}] * (2 * 7 - 1) and [d["i"] for d in seen] == list(range(7))
    assert all(d["sigma"] == d["sigma_hat"] == sigmas[d["i"]] for d in seen)
    assert_close(a, SAMPLERS[sampler](_model, x, sigmas, seed=9, gmm=None, disable=True), kind="exact")
    for gmm in (None, "ortho"):
        full = SAMPLERS[sampler](_model, x, sigmas, seed=9, gmm=gmm, n_components=3, disable=True)
        alone = SAMPLERS[sampler](_model, x[1:], sigmas, seed=9, gmm=gmm, n_components=3, disable=True, sample_offset=1)
        assert_close(alone, full[1:], kind="f64_loop_ve")


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_noise_sampler_with_a_gmm_supplies_z_and_components_come_from_the_stream(sampler):
    # A noise sampler carries no components: with a GMM its draws are the z (called exactly where k-diffusion calls
    # it) and the components come from the Philox stream of the seed: two runs with fresh samplers and one seed
    # agree, another seed changes the result. Checked to fail with the noise sampler ignored when a GMM is on
    # (2 of 2: no calls).
    from tests.integrations.kdiffusion_upstream import load_sampling

    sigmas = _schedule("eps", "full", torch.float64)
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * sigmas[0]
    upstream = _Recorder(torch.float64)
    getattr(load_sampling(), "sample_" + sampler)(_model, x, sigmas, disable=True, noise_sampler=upstream)
    runs = []
    for seed in (4, 4, 5):
        noise = _Recorder(torch.float64)
        runs.append(
            SAMPLERS[sampler](
                _model, x, sigmas, gmm="ortho", n_components=3, seed=seed, noise_sampler=noise, disable=True
            )
        )
        assert len(noise.calls) == len(upstream.calls)
    assert_close(runs[0], runs[1], kind="exact")
    assert not is_close(runs[0], runs[2], "distinct")


# ---- the mixture's moments ---------------------------------------------------------------------------------


def _affine_denoiser(d: dict, inputs: dict):
    """D(x, sigma) = x / (2 + sigma^2 / 50) + d[sigma]: elementwise affine in x, so a step's output is affine in its
    noise draws with scalar gains (stage 1's felt through stage 2's denoiser); the input at each sigma is kept in
    ``inputs`` (stage 2 sees x_2)."""

    def model(x, sigma, **extra_args):
        s = round(float(sigma[0]), 9)
        inputs[s] = x
        return x / (2 + s * s / 50) + d[s].expand_as(x)

    return model


def _upstream_moments(sampler, model, inputs, mid, x0, sigmas, kwargs):
    """The mean and the per-coordinate variance of k-diffusion's own step (float64) and of its intermediate sample
    x_2, read off its code: the outputs with zero noise, and the gain of each noise draw (k-diffusion's step with
    that draw 1, the others 0)."""
    from tests.integrations.kdiffusion_upstream import load_sampling

    fn = getattr(load_sampling(), "sample_" + sampler)

    def run(hot):
        calls = []

        def noise(sigma, sigma_next):
            calls.append(None)
            return torch.full_like(x0, 1.0 if len(calls) - 1 == hot else 0.0)

        out = fn(model, x0, sigmas, disable=True, noise_sampler=noise, **kwargs)
        return (out, inputs[mid]), len(calls)

    means, n_calls = run(None)
    moments = []
    for j, mean in enumerate(means):
        gains = [run(k)[0][j] - mean for k in range(n_calls)]
        for g in gains:  # one scalar per draw
            assert_close(g, torch.full_like(g, float(g.flatten()[0])), kind="f64")
        moments.append((mean, sum(float(g.flatten()[0]) ** 2 for g in gains)))
    return moments


SCALE = 0.8


@pytest.mark.parametrize("variant", ["ortho-lr", "rand"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_gmm_step_matches_the_stock_step_moments(sampler, variant):
    # One step (sigma 10 -> 3, both stages) of an affine denoiser from one x_T repeated N times: the sample mean and
    # per-coordinate variance of the intermediate sample x_2 (what stage 2's denoiser sees) and of the step's
    # output equal k-diffusion's (its code run with unit draws, above) within Monte Carlo bounds, where nothing
    # clips (checked); the mixture is active (the samples differ from the GMM-off run of the same seed). Planted
    # mutations (failing cases of 4): stage 2 drawing stage 1's normals (the Philox counter of row S + i: correlated
    # draws, 2: dpmpp_sde), the mixture at the VP level (c / g in the rows, 4), s_noise left out of stage 1's c (2:
    # dpmpp_sde) and of the landing's (2: 2S).
    n, kwargs = 20000, dict(eta=0.8, s_noise=0.9)
    if sampler == "dpmpp_sde":
        kwargs["r"] = 0.35  # fac != 1: stage 2 blends D and D_2 through the op's history
    sigmas = torch.tensor([10.0, 3.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, 1, 4, 4, dtype=torch.float64, generator=gen) * 10
    steps, rows = _plan(sigmas, sigmas.tolist(), sampler, 0.8, 0.9, kwargs.get("r", 0.5), "k_diffusion", "ve")
    mid = round(float(steps[0][0]), 9)
    d = {s: torch.randn(1, 1, 4, 4, dtype=torch.float64, generator=gen) * 2 for s in (10.0, mid)}
    inputs = {}
    model = _affine_denoiser(d, inputs)
    expected = _upstream_moments(sampler, model, inputs, mid, x0, sigmas, kwargs)
    gmm = dg.GMM.create(16, n_components=4, n_steps=2, variant=variant, scale=SCALE, seed=2, dtype=torch.float64)
    assert all(matched_steps(gmm, rows[:, 4], rows[:, 5])) and rows[0, 5] != 0  # landing, then stage 1
    runs = {}
    for name, g in (("gmm", gmm), ("off", None)):
        out = SAMPLERS[sampler](
            model, x0.expand(n, 1, 4, 4), sigmas, gmm=g, final_step="gmm", seed=21, disable=True, **kwargs
        )
        runs[name] = (out, inputs[mid])
    floor = COMPARISONS["f64"][0]  # 2S's x_2 has no noise: its mean is a float64 formula
    for got, (mean, var) in zip(runs["gmm"], expected, strict=True):
        flat = got.reshape(n, -1)
        assert_within(flat.mean(0), mean.reshape(-1), MC_SIGMAS * math.sqrt(var / n) + floor)
        assert_within(flat.var(0), torch.full((16,), var, dtype=torch.float64), MC_SIGMAS_WIDE * var * math.sqrt(2 / n))
    assert not is_close(runs["gmm"][0], runs["off"][0], "distinct")


# ---- the step rules over the stages, GMM tables per stage --------------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_gmm_steps_and_final_step_act_on_both_stages_of_a_step(sampler):
    # gmm_steps speaks of steps: [1] leaves step 0 (both stages) Gaussian, so x after step 0 equals the GMM-off run's
    # of the same seed, and step 1 carries the mixture; final_step="gaussian" is gmm_steps without the last step.
    # Checked to fail with DPM++ SDE's step mask interleaved over its rows instead of tiled (landings, then stage-1
    # rows) and with its final-step rule applied to the last row only (1 of 2 each: 2S has one noisy row per step).
    sigmas = torch.tensor([14.6, 5.0, 2.0, 0.5], dtype=torch.float64)
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 14.6
    fn = SAMPLERS[sampler]
    xs = {}
    for name, options in (("off", dict(gmm=None)), ("step1", dict(gmm="ortho", gmm_steps=[1], final_step="gmm"))):
        seen = []
        fn(_model, x, sigmas, seed=3, n_components=3, disable=True, callback=seen.append, **options)
        xs[name] = [d["x"] for d in seen]
    assert_close(xs["step1"][1], xs["off"][1], kind="exact")
    assert not is_close(xs["step1"][2], xs["off"][2], "distinct")
    gaussian_last = fn(_model, x, sigmas, seed=3, gmm="ortho", n_components=3, disable=True)
    explicit = fn(
        _model, x, sigmas, seed=3, gmm="ortho", n_components=3, disable=True, gmm_steps=[0, 1], final_step="gmm"
    )
    assert_close(gaussian_last, explicit, kind="exact")


def test_gmm_tables_hold_a_set_per_step_and_dpmpp_sde_one_per_stage():
    # 2S re-noises once per step: a GMM of len(sigmas) - 1 sets; DPM++ SDE twice: 2 (len(sigmas) - 1) sets (S + i
    # for step i's first stage). Such tables are the variant's own; fewer sets are refused naming the count, a
    # shared set serves every stage.
    sigmas = torch.tensor([14.6, 5.0, 2.0, 0.0], dtype=torch.float64)
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 14.6
    for fn, n_sets in ((sample_dpmpp_sde_gmm, 6), (sample_dpmpp_2s_ancestral_gmm, 3)):
        tables = dg.GMM.create(32, n_components=3, n_steps=n_sets, variant="ortho", seed=1, dtype=torch.float64)
        by_name = fn(_model, x, sigmas, gmm="ortho", n_components=3, seed=1, disable=True)
        assert_close(fn(_model, x, sigmas, gmm=tables, seed=1, disable=True), by_name, kind="exact")
        fewer = dg.GMM.create(32, n_components=3, n_steps=n_sets - 1, variant="ortho", dtype=torch.float64)
        with pytest.raises(ValueError, match=f"parameter sets for {n_sets - 1} steps but sampling takes {n_sets}"):
            fn(_model, x, sigmas, gmm=fewer, seed=1, disable=True)
        shared = dg.GMM.create(32, n_components=3, variant="ortho", share_across_steps=True, dtype=torch.float64)
        assert torch.isfinite(fn(_model, x, sigmas, gmm=shared, seed=1, disable=True)).all()


# ---- bad input ---------------------------------------------------------------------------------------------


def _never(x, sigma, **extra_args):
    pytest.fail("the model was called: the check came after work started")


BAD = [
    (dict(eta=math.nan), ValueError, "eta must be a finite number >= 0"),
    (dict(eta=-0.5), ValueError, "eta must be a finite number >= 0"),
    (dict(eta=torch.tensor(1.0)), ValueError, "eta must be a finite number >= 0"),
    (dict(s_noise=-1.0), ValueError, "s_noise must be a finite number >= 0"),
    (dict(s_noise=math.inf), ValueError, "s_noise must be a finite number >= 0"),
    (dict(sigmas=torch.tensor([1.0, 2.0, 0.0])), ValueError, "sigmas must not increase"),
    (dict(sigmas=torch.tensor([3.0, math.nan, 0.0])), ValueError, "sigmas must be finite and >= 0"),
    (dict(sigmas=torch.tensor([3.0])), ValueError, "sigmas must be a 1-D tensor with at least 2 entries"),
    (dict(sigmas=torch.tensor([3.0, 0.0, 0.0])), ValueError, "sigmas must be > 0 except the last"),
    (dict(sigmas=[3.0, 0.0]), TypeError, "sigmas must be a 1-D tensor"),
    (dict(eta=0.0, gmm="ortho"), ValueError, "needs noise to replace"),
    (dict(s_noise=0.0, gmm="ortho"), ValueError, "needs noise to replace"),
    (dict(gmm_steps=[5]), ValueError, r"gmm_steps step indices must be in \[0, 2\)"),
    (dict(gmm="vub"), ValueError, "variant must be None"),
    (dict(noise_sampler=3), TypeError, "noise_sampler must be callable"),
    (dict(x=torch.tensor(1.0)), ValueError, "x must have a batch dimension"),
    (dict(sample_offset=-1), ValueError, "sample_offset"),
]
BAD_R = [
    (dict(r=0.0), ValueError, "r must be a finite number > 0"),
    (dict(r=-0.5), ValueError, "r must be a finite number > 0"),
    (dict(r=math.inf), ValueError, "r must be a finite number > 0"),
    (dict(r=True), ValueError, "r must be a finite number > 0"),
]


@pytest.mark.parametrize(
    ("sampler", "bad", "error", "match"),
    [(sampler, *case) for sampler in SAMPLERS for case in BAD] + [("dpmpp_sde", *case) for case in BAD_R],
)
def test_bad_input_is_refused_before_any_work(sampler, bad, error, match):
    # Each refused naming the argument before the model is called, x untouched. Checked to fail with check_r
    # removed (4 of 4 r cases) and with the check of a step from sigma 0 removed (2).
    args = dict(x=torch.ones(SHAPE), sigmas=torch.tensor([3.0, 1.0, 0.0]), gmm=None) | bad
    x, sigmas = args.pop("x"), args.pop("sigmas")
    before = x.clone()
    with pytest.raises(error, match=match):
        SAMPLERS[sampler](_never, x, sigmas, disable=True, **args)
    assert torch.equal(x, before)
