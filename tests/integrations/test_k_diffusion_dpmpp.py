"""sample_dpmpp_2m_gmm / sample_dpmpp_2m_sde_gmm / sample_dpmpp_3m_sde_gmm: GMM off against k-diffusion's own
sample_dpmpp_2m / sample_dpmpp_2m_sde / sample_dpmpp_3m_sde (whole loops, its default Brownian-tree noise
included), the SDE-GMM step against its Monte Carlo moments in VE units, the noise / seed rules, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import ddim_gmm_ext as dg
from ddim_gmm_ext.gmm import matched_steps
from ddim_gmm_ext.k_diffusion import (
    dpmpp_rows,
    sample_dpmpp_2m_gmm,
    sample_dpmpp_2m_sde_gmm,
    sample_dpmpp_3m_sde_gmm,
)
from tests.helpers import MC_SIGMAS, MC_SIGMAS_WIDE, assert_close, assert_within, is_close

SHAPE = (2, 2, 4, 4)


def _model(x, sigma, **extra_args):
    """A smooth nonlinear denoiser on x = x0 + sigma eps (its output depends on x and sigma)."""
    s = sigma.to(x.dtype)[:, None, None, None]
    return torch.tanh(x / (1 + s**2).sqrt()) * (1 + 0.1 * s) - 0.05 * x


class _SharedNoise:
    """One noise sequence for both samplers: the n-th call returns the n-th draw of a seeded generator."""

    def __init__(self, dtype):
        self.gen, self.dtype = torch.Generator().manual_seed(5), dtype

    def __call__(self, sigma, sigma_next):
        return torch.randn(SHAPE, generator=self.gen, dtype=self.dtype)


def _sigmas(steps: int, ends_in_zero: bool, dtype):
    from tests.integrations.kdiffusion_upstream import load_sampling

    full = load_sampling().get_sigmas_karras(steps, 0.03, 14.6).to(dtype)
    return full if ends_in_zero else full[:-2]  # a partial denoise: the last step is a full-order step


# (name, upstream sampler, ours, keyword arguments)
CONFIGS = {
    "2m": ("sample_dpmpp_2m", sample_dpmpp_2m_gmm, {}),
    "2m_sde-midpoint": ("sample_dpmpp_2m_sde", sample_dpmpp_2m_sde_gmm, dict(eta=1.0, s_noise=0.8)),
    "2m_sde-heun": ("sample_dpmpp_2m_sde", sample_dpmpp_2m_sde_gmm, dict(eta=0.5, solver_type="heun")),
    "2m_sde-eta0": ("sample_dpmpp_2m_sde", sample_dpmpp_2m_sde_gmm, dict(eta=0.0, solver_type="heun")),
    "3m_sde": ("sample_dpmpp_3m_sde", sample_dpmpp_3m_sde_gmm, dict(eta=0.7, s_noise=1.1)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ends_in_zero", [True, False])
@pytest.mark.parametrize("steps", [7, 13])
@pytest.mark.parametrize("config", CONFIGS)
def test_gmm_off_equals_k_diffusion(config, steps, ends_in_zero, dtype):
    # Whole loops with the same noise sampler. Checked to fail with (failing cases of 40): the Heun term
    # replaced by the midpoint one (24), r = h / h_last instead of h_last / h (40), s_noise left out of c (16),
    # e^(-h) instead of e^(-eta h) in the x coefficient (32), 3M's order-3 steps run as order 2 (8).
    from tests.integrations.kdiffusion_upstream import load_sampling

    upstream, ours, kwargs = CONFIGS[config]
    sigmas = _sigmas(steps, ends_in_zero, dtype)
    x = torch.randn(SHAPE, dtype=dtype, generator=torch.Generator().manual_seed(steps)) * sigmas[0]
    noise = {} if config == "2m" else {"noise_sampler": _SharedNoise(dtype)}
    expected = getattr(load_sampling(), upstream)(_model, x, sigmas, disable=True, **kwargs, **noise)
    noise = {} if config == "2m" else {"noise_sampler": _SharedNoise(dtype)}
    got = ours(_model, x, sigmas, disable=True, gmm=None, **kwargs, **noise)
    assert got.dtype == dtype
    assert_close(got, expected, kind="f64_loop_ve" if dtype == torch.float64 else "f32_loop_upstream")


# torchsde warns that float32 sigmas fall outside the tree's interval by a rounding, for k-diffusion's tree as ours
@pytest.mark.filterwarnings("ignore:Should have t:UserWarning")
@pytest.mark.parametrize("ends_in_zero", [True, False])
@pytest.mark.parametrize("config", ["2m_sde-midpoint", "2m_sde-heun", "3m_sde"])
def test_default_noise_is_k_diffusions_brownian_tree(config, ends_in_zero):
    # No noise_sampler, no seed, GMM off: k-diffusion's BrownianTreeNoiseSampler over [min positive sigma, max
    # sigma], its entropy drawn from torch's default generator. Checked to fail with the interval's sign
    # dropped (6 of 6), the tree over [min sigma, max sigma] (3: the schedules ending in 0), the entropy + 1 (6)
    # and an extra draw from torch's generator (6).
    from tests.integrations.kdiffusion_upstream import load_sampling

    upstream, ours, kwargs = CONFIGS[config]
    sigmas = _sigmas(7, ends_in_zero, torch.float32)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    torch.manual_seed(11)
    expected = getattr(load_sampling(), upstream)(_model, x, sigmas, disable=True, **kwargs)
    after_upstream = torch.get_rng_state()
    torch.manual_seed(11)
    got = ours(_model, x, sigmas, disable=True, gmm=None, **kwargs)
    assert_close(got, expected, kind="f32_loop_upstream")
    assert torch.equal(torch.get_rng_state(), after_upstream)  # the same draws from torch's default generator


def test_callback_extra_args_and_seeded_noise():
    # callback as k-diffusion's (x, i, sigma, sigma_hat, denoised before each update); extra_args reach the model;
    # a seed (argument or extra_args["seed"], as ComfyUI passes it) gives the Philox stream: reproducible and
    # the same sample whatever its batch (sample_offset).
    sigmas = _sigmas(7, True, torch.float64)
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    seen, kw = [], {}
    a = sample_dpmpp_2m_sde_gmm(
        lambda x, s, **extra: kw.update(extra) or _model(x, s), x, sigmas, extra_args={"seed": 9}, gmm=None,
        disable=True, callback=seen.append,
    )  # fmt: skip
    assert kw == {"seed": 9} and [d["i"] for d in seen] == list(range(7))
    assert all(d["sigma"] == d["sigma_hat"] == sigmas[d["i"]] for d in seen)
    assert_close(a, sample_dpmpp_2m_sde_gmm(_model, x, sigmas, seed=9, gmm=None, disable=True), kind="exact")
    alone = sample_dpmpp_2m_sde_gmm(_model, x[1:], sigmas, seed=9, gmm=None, disable=True, sample_offset=1)
    assert_close(alone, a[1:], kind="f64_loop_ve")


# ---- with a GMM -------------------------------------------------------------------------------------------


def _expected_two_steps(x0, d0, d1, sigmas, eta, s_noise):
    """k-diffusion's 2M SDE (midpoint) written out for two steps of a denoiser that ignores x (outputs d0, d1):
    the means and per-coordinate variances after each step, float64."""
    (s0, s1, s2), hs = sigmas, []
    mean, var = x0, 0.0
    for i, (t, s, d) in enumerate(((s0, s1, d0), (s1, s2, d1))):
        h = math.log(t / s)
        hs.append(h)
        mean = s / t * math.exp(-eta * h) * mean + (1 - math.exp(-(1 + eta) * h)) * d
        if i == 1:
            mean = mean + 0.5 * (1 - math.exp(-(1 + eta) * h)) * (hs[1] / hs[0]) * (d1 - d0)
        c2 = s * s * (1 - math.exp(-2 * eta * h)) * s_noise**2
        var = (s / t * math.exp(-eta * h)) ** 2 * var + c2
        yield mean, var, math.sqrt(c2), math.sqrt(1 + s * s)


@pytest.mark.parametrize("variant", ["ortho-lr", "rand"])
def test_sde_gmm_steps_match_the_sde_moments(variant):
    # Two steps (order 1, then order 2 with the history) of a denoiser that ignores x, from one x_T repeated
    # N times: the sample mean and per-coordinate variance after each step equal the SDE steps' (the mixture is
    # moment-matched where nothing clips, checked here), within Monte Carlo bounds; the mixture is active (the
    # samples differ from the GMM-off run of the same seed). Checked to fail with the mixture at the VP noise
    # level (c / g in the row) and with eta left out of c (sigma_s sqrt(1 - e^(-2h))), both variants.
    n, eta, s_noise, sigmas = 20000, 0.8, 0.9, (10.0, 3.0, 1.0)
    gen = torch.Generator().manual_seed(3)
    x0, d0, d1 = (torch.randn(1, 1, 4, 4, dtype=torch.float64, generator=gen) * 2 for _ in range(3))
    outs = {10.0: d0, 3.0: d1}

    def model(x, sigma):
        return outs[round(float(sigma[0]), 6)].expand_as(x)

    gmm = dg.GMM.create(16, n_components=4, n_steps=2, variant=variant, scale=0.8, seed=2, dtype=torch.float64)
    expected = list(_expected_two_steps(x0, d0, d1, sigmas, eta, s_noise))
    assert matched_steps(gmm, [e[2] for e in expected], [e[3] for e in expected]) == [True, True]
    runs = {}
    for name, g in (("gmm", gmm), ("off", None)):
        seen = []
        last = sample_dpmpp_2m_sde_gmm(
            model, x0.expand(n, 1, 4, 4), torch.tensor(sigmas, dtype=torch.float64), eta=eta, s_noise=s_noise,
            gmm=g, final_step="gmm", seed=21, disable=True, callback=seen.append,
        )  # fmt: skip
        runs[name] = [seen[1]["x"], last]
    for got, (mean, var, _, _) in zip(runs["gmm"], expected, strict=True):
        flat = got.reshape(n, -1)
        assert_within(flat.mean(0), mean.reshape(-1), MC_SIGMAS * math.sqrt(var / n))
        assert_within(flat.var(0), torch.full((16,), var, dtype=torch.float64), MC_SIGMAS_WIDE * var * math.sqrt(2 / n))
    assert not is_close(runs["gmm"][0], runs["off"][0], "distinct")


def test_sde_gmm_row_scales_the_vp_tables_by_g():
    # One order-2 step from the sampler's rows, component by component: the mean of the samples that drew
    # component k is the SDE mean plus g delta_k with g = sqrt(1 + sigma_s^2) (the VP tables in VE units).
    # Checked to fail with g = 1 in the rows.
    n, sigmas = 40000, [10.0, 3.0, 1.0]
    rows = dpmpp_rows(sigmas, "dpmpp_2m_sde", eta=0.8, s_noise=0.9)
    gmm = dg.GMM.create(16, n_components=4, n_steps=2, variant="ortho", scale=0.8, seed=2, dtype=torch.float64)
    gen = torch.Generator().manual_seed(4)
    x, d, h1 = (torch.randn(1, 16, dtype=torch.float64, generator=gen).expand(n, 16) for _ in range(3))
    out = dg.step_from_table(d, x, rows, 1, gmm=gmm, prediction_type="sample", seed=5, history=(h1,))
    plain = dg.step_from_table(d, x, rows, 1, prediction_type="sample", noise=torch.zeros_like(x), history=(h1,))
    c, g = float(rows[1, 4]), math.sqrt(2.0)
    for k in range(4):
        mine = out.prev_sample[out.components == k]
        shift = (mine - plain.prev_sample[: len(mine)]).mean(0)
        assert_within(shift, g * gmm.offsets[1, k], MC_SIGMAS_WIDE * c / math.sqrt(len(mine)))


def test_noise_sampler_with_a_gmm_supplies_z_and_components_come_from_the_stream():
    # A noise sampler carries no components: with a GMM its z is used (called exactly on the noisy steps) and
    # the components come from the Philox stream of the seed, so two runs with the same sampler and seed agree
    # and another seed changes the result.
    sigmas = _sigmas(7, True, torch.float64)
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * sigmas[0]
    calls = []

    def run(seed):
        sampler = _SharedNoise(torch.float64)
        return sample_dpmpp_3m_sde_gmm(
            _model, x, sigmas, gmm="ortho", n_components=3, seed=seed, disable=True,
            noise_sampler=lambda s, sn: calls.append(float(sn)) or sampler(s, sn),
        )  # fmt: skip

    a, b, other = run(1), run(1), run(2)
    assert len(calls) == 3 * 6 and all(c > 0 for c in calls)  # never for the step to sigma 0
    assert_close(a, b, kind="exact")
    assert not is_close(a, other, "distinct") and torch.isfinite(a).all()


def test_gmm_runs_through_every_sde_sampler_and_changes_the_samples():
    sigmas = _sigmas(7, False, torch.float32)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * sigmas[0]
    for fn, kw in ((sample_dpmpp_2m_sde_gmm, {"solver_type": "heun"}), (sample_dpmpp_3m_sde_gmm, {})):
        off = fn(_model, x, sigmas, gmm=None, seed=4, disable=True, **kw)
        on = fn(_model, x, sigmas, gmm="ortho-vub", n_components=4, seed=4, disable=True, gmm_steps="all", **kw)
        assert torch.isfinite(on).all() and not is_close(on, off, "distinct")


# ---- bad input ----------------------------------------------------------------------------------------------


def _never_called(x, sigma, **kwargs):
    raise AssertionError("the model was called before the arguments were checked")


@pytest.mark.parametrize(
    ("fn", "kwargs", "error", "match"),
    [
        ("2m_sde", dict(eta=-0.5), ValueError, "eta must be a finite number >= 0"),
        ("2m_sde", dict(eta=math.nan), ValueError, "eta must be a finite number >= 0"),
        ("3m_sde", dict(eta=math.inf), ValueError, "eta must be a finite number >= 0"),
        ("2m_sde", dict(s_noise=math.nan), ValueError, "s_noise must be a finite number"),
        ("3m_sde", dict(s_noise=-1.0), ValueError, "s_noise must be a finite number"),
        ("2m_sde", dict(solver_type="euler"), ValueError, "solver_type must be one of"),
        ("2m_sde", dict(noise_sampler=3), TypeError, "noise_sampler must be callable"),
        ("2m_sde", dict(sigmas=torch.tensor([1.0, 2.0, 0.0])), ValueError, r"must not increase, got sigmas\[0\]"),
        ("3m_sde", dict(sigmas=torch.tensor([2.0, 1.0, 1.0, 0.0])), ValueError, r"strictly decrease.*sigmas\[1\]"),
        ("2m", dict(sigmas=torch.tensor([2.0, 0.0, 0.0])), ValueError, "strictly decrease"),
        ("2m", dict(sigmas=torch.tensor([2.0, math.nan])), ValueError, "finite"),
        ("2m", dict(sigmas=torch.tensor([2.0])), ValueError, "at least 2 entries"),
        ("2m", dict(gmm="ortho"), ValueError, "sample_dpmpp_2m is deterministic|dpmpp_2m is deterministic"),
        ("2m_sde", dict(eta=0.0), ValueError, "eta=0.0, s_noise=1.0 give noise std 0"),
        ("3m_sde", dict(s_noise=0.0), ValueError, "noise std 0"),
        ("2m_sde", dict(gmm="vub"), ValueError, "GMM variant"),
        ("2m_sde", dict(gmm=None, scale=math.nan), ValueError, "scale must be a finite number"),
        ("3m_sde", dict(n_components=0), ValueError, "n_components must be an int"),
        ("2m_sde", dict(gmm_steps="some"), ValueError, "gmm_steps must be one of"),
        ("2m_sde", dict(gmm_steps=[5]), ValueError, "gmm_steps"),
        ("2m", dict(final_step="last"), ValueError, "final_step"),
        ("3m_sde", dict(seed=1.5), ValueError, "seed"),
        ("2m_sde", dict(sample_offset=-1), ValueError, "sample_offset must be in"),
        ("2m_sde", dict(gmm=dg.GMM.create(16, n_components=2, n_steps=2)), ValueError, "built for dim=16"),
        ("3m_sde", dict(x=torch.zeros(SHAPE, dtype=torch.int64)), TypeError, "x must have a floating dtype"),
        # used first inside the loop, where they failed naming nothing (AttributeError "'list' object has no
        # attribute 'get'", "'int' object is not callable"): checked to fail (5 of 5) without check_loop_arguments
        # (the sigmas case: with the old ValueError of _check_sigmas)
        ("2m", dict(model=3), TypeError, "model must be callable"),
        ("2m_sde", dict(extra_args=[("seed", 1)]), TypeError, "extra_args must be None or a dict"),
        ("3m_sde", dict(callback=3), TypeError, "callback must be callable or None, got int"),
        ("2m", dict(sigmas=[2.0, 1.0, 0.0]), TypeError, "sigmas must be a 1-D tensor .*, got list"),
        ("2m_sde", dict(noise_sampler="brownian"), TypeError, "noise_sampler must be callable or None, got str"),
    ],
)
def test_bad_input_is_refused_before_any_work(fn, kwargs, error, match):
    # Each new argument checked with a message naming it, before the model is called (the model raises).
    # Checked to fail with only the non-increasing check on sigmas (the repeated-sigma cases reach the model).
    fns = {"2m": sample_dpmpp_2m_gmm, "2m_sde": sample_dpmpp_2m_sde_gmm, "3m_sde": sample_dpmpp_3m_sde_gmm}
    args = dict(model=_never_called, sigmas=torch.tensor([2.0, 1.0, 0.0]), x=torch.zeros(SHAPE)) | kwargs
    with pytest.raises(error, match=match):
        fns[fn](disable=True, **args)


def _four_samplers():
    """Every k-diffusion twin that takes a noise_sampler, with its sigmas (flow times for sample_rfim_gmm)."""
    from ddim_gmm_ext.k_diffusion import sample_ddim_gmm, sample_rfim_gmm

    ve = torch.tensor([2.0, 1.0, 0.5, 0.0])
    return {
        "ddim": (sample_ddim_gmm, ve, dict(eta=1.0)),
        "rfim": (sample_rfim_gmm, torch.tensor([1.0, 0.6, 0.3, 0.0]), dict(eta=1.0)),
        "2m_sde": (sample_dpmpp_2m_sde_gmm, ve, {}),
        "3m_sde": (sample_dpmpp_3m_sde_gmm, ve, {}),
    }


@pytest.mark.parametrize("gmm", [None, "ortho"])
@pytest.mark.parametrize(
    ("draw", "error", "match"),
    [
        (lambda x: None, TypeError, r"noise_sampler\(sigma, sigma_next\) must return a real tensor.*NoneType"),
        (lambda x: torch.randn_like(x, dtype=torch.complex64), TypeError, "must return a real tensor.*complex64"),
        (lambda x: torch.randn(3, *x.shape[1:]), ValueError, r"noise_sampler.*x's shape \(2, 2, 4, 4\)"),
    ],
)
@pytest.mark.parametrize("fn", ["ddim", "rfim", "2m_sde", "3m_sde"])
def test_a_bad_noise_sampler_draw_is_refused_naming_noise_sampler(fn, draw, error, match, gmm):
    # k-diffusion raises TypeError when its noise sampler returns None (None * tensor); the DPM++ twins drew the
    # Philox stream instead, and took a complex draw's real part. Checked to fail (24 of 24) with sampler_noise
    # returning the draw as it came: the DPM++ twins ran the None and complex draws, the other errors named
    # `noise` or nothing.
    sampler, sigmas, kwargs = _four_samplers()[fn]
    x = torch.randn(SHAPE)
    with pytest.raises(error, match=match):
        sampler(_model, x, sigmas, disable=True, gmm=gmm, seed=0, noise_sampler=lambda s, t: draw(x), **kwargs)


def test_a_none_draw_is_a_type_error_in_k_diffusion_too():
    # What the rule above follows: k-diffusion 0.1.1.post1's sample_dpmpp_2m_sde adds the draw to x.
    from tests.integrations.kdiffusion_upstream import load_sampling

    with pytest.raises(TypeError):
        load_sampling().sample_dpmpp_2m_sde(
            _model, torch.randn(SHAPE), torch.tensor([2.0, 1.0, 0.0]), disable=True, noise_sampler=lambda s, t: None
        )


@pytest.mark.parametrize("fn", ["ddim", "rfim"])
def test_a_noise_sampler_that_is_not_callable_is_refused_before_any_work(fn):
    # The DDIM / RFIM twins called it mid-run ("'int' object is not callable", after the model's first call).
    # Checked to fail without the check_noise_sampler call in _sample.
    sampler, sigmas, kwargs = _four_samplers()[fn]
    with pytest.raises(TypeError, match="noise_sampler must be callable"):
        sampler(_never_called, torch.zeros(SHAPE), sigmas, disable=True, noise_sampler=3, **kwargs)


@pytest.mark.parametrize("draw_dtype", [torch.float64, torch.int64])
def test_noise_that_broadcasts_to_x_or_has_another_real_dtype_runs_as_in_k_diffusion(draw_dtype):
    # k-diffusion adds the draw to x: a [1, ...] draw (one noise for the batch) and an integer draw both run
    # there. Checked to fail without the expand in sampler_noise (the op refused the [1, ...] shape).
    from tests.integrations.kdiffusion_upstream import load_sampling

    sigmas = _sigmas(7, True, torch.float64)
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * sigmas[0]

    def draws():
        gen = torch.Generator().manual_seed(8)
        return lambda s, t: (torch.randn((1, *SHAPE[1:]), generator=gen, dtype=torch.float64) * 3).to(draw_dtype)

    expected = load_sampling().sample_dpmpp_2m_sde(_model, x, sigmas, disable=True, eta=0.7, noise_sampler=draws())
    got = sample_dpmpp_2m_sde_gmm(_model, x, sigmas, disable=True, eta=0.7, gmm=None, noise_sampler=draws())
    assert_close(got, expected, kind="f64_loop_ve")


def test_complex_sigmas_are_refused():
    # The host copy took their real part silently (k-diffusion's sigmas > 0 raises). Checked to fail without
    # the is_complex check in _check_sigmas.
    for sampler in (sample_dpmpp_2m_sde_gmm, _four_samplers()["ddim"][0]):
        with pytest.raises(TypeError, match="sigmas must be real, got a torch.complex64"):
            sampler(_never_called, torch.zeros(SHAPE), torch.tensor([2.0, 1.0, 0.0], dtype=torch.complex64))
