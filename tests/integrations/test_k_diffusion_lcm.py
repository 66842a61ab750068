"""sample_lcm_gmm: GMM off against ComfyUI's sample_lcm (a stand-in written from its update rule and its model
samplings' noise_scaling: eps / v models on the VE path, CONST models on the flow path) over whole loops, the
LCM-GMM step against its Monte Carlo moments, the noise / seed rules, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import ddim_gmm_ext as dg
from ddim_gmm_ext.gmm import matched_steps
from ddim_gmm_ext.k_diffusion import sample_lcm_gmm
from tests.helpers import MC_SIGMAS, MC_SIGMAS_WIDE, assert_close, assert_within, is_close
from tests.integrations.test_comfy_flow import CONST, EPS

SHAPE = (2, 2, 4, 4)


class EpsSampling(EPS):
    """ComfyUI's EPS model sampling's noise_scaling, from its behaviour: sigma noise + latent."""

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return sigma * noise + latent_image


class ConstSampling(CONST):
    """ComfyUI's CONST model sampling's noise_scaling, from its behaviour: sigma (noise_scale noise) + (1 - sigma)
    latent, noise_scale 1 when the model sampling has none (older ComfyUI has no factor)."""

    def __init__(self, noise_scale=None):
        if noise_scale is not None:
            self.noise_scale = noise_scale

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return sigma * (getattr(self, "noise_scale", 1.0) * noise) + (1.0 - sigma) * latent_image


def comfy_lcm(model, x, sigmas, sampling, noise_sampler):
    """ComfyUI's sample_lcm, from its update rule: x = the denoiser output, re-noised by the model sampling's
    noise_scaling(sigma_next, noise, x) when sigma_next > 0 (the noise sampler is called only then)."""
    for i in range(len(sigmas) - 1):
        x = model(x, sigmas[i] * x.new_ones(x.shape[0]))
        if sigmas[i + 1] > 0:
            x = sampling.noise_scaling(sigmas[i + 1], noise_sampler(sigmas[i], sigmas[i + 1]), x)
    return x


def ve_model(x, sigma, **extra_args):
    """A smooth nonlinear denoiser on x = x0 + sigma eps."""
    s = sigma.to(x.dtype)[:, None, None, None]
    return torch.tanh(x / (1 + s**2).sqrt()) * (1 + 0.1 * s) - 0.05 * x


def flow_model(x, sigma, **extra_args):
    """A smooth nonlinear denoiser on x = (1 - t) x0 + t eps."""
    t = sigma.to(x.dtype)[:, None, None, None]
    return torch.tanh(x * (1 - t)) * (1 + 0.3 * t) - 0.1 * t * x


class SharedNoise:
    """One noise sequence for both samplers: the n-th call returns the n-th draw of a seeded generator; records
    the calls."""

    def __init__(self, dtype, shape=SHAPE):
        self.gen, self.dtype, self.shape, self.calls = torch.Generator().manual_seed(5), dtype, shape, []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return torch.randn(self.shape, generator=self.gen, dtype=self.dtype)


SCHEDULES = {  # path -> name -> sigmas
    "ve": {
        "karras-7": [14.6, 6.1, 2.4, 0.9, 0.3, 0.1, 0.03, 0.0],
        "partial": [14.6, 6.1, 2.4, 0.9],  # ends above 0: the last step re-noises
        "repeat": [14.6, 2.4, 2.4, 0.3, 0.0, 0.0],  # LCM re-noises between equal sigmas; a step from 0 to 0
    },
    "flow": {
        "shift-3": [1.0, 0.955, 0.9, 0.818, 0.692, 0.5, 0.25, 0.0],
        "partial": [0.9, 0.818, 0.692],
        "repeat": [1.0, 0.818, 0.818, 0.25, 0.0],
    },
}
CASES = [(path, name) for path, names in SCHEDULES.items() for name in names]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("path", "schedule"), CASES)
def test_gmm_off_equals_comfyui_lcm(path, schedule, dtype):
    # Whole loops with the same noise sampler, called at the same sigmas. Checked to fail with (failing cases of
    # 12): the flow row's A = 1 instead of 1 - s (6: the flow cases), c = g s (6: the VE cases), the noise sampler
    # called only between distinct sigmas (4: the "repeat" cases), also on the steps to 0 (8: the call records).
    sigmas = torch.tensor(SCHEDULES[path][schedule], dtype=dtype)
    model, sampling = (ve_model, EpsSampling()) if path == "ve" else (flow_model, ConstSampling())
    x = torch.randn(SHAPE, dtype=dtype, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    upstream, ours = SharedNoise(dtype), SharedNoise(dtype)
    expected = comfy_lcm(model, x, sigmas, sampling, upstream)
    got = sample_lcm_gmm(model, x, sigmas, path=path, gmm=None, noise_sampler=ours, disable=True)
    assert got.dtype == dtype
    assert_close(got, expected, kind="f64_loop" if dtype == torch.float64 else "f32_loop_upstream")
    assert ours.calls == upstream.calls


def test_callback_extra_args_and_seeded_noise():
    # callback as ComfyUI's (x, i, sigma, sigma_hat, denoised before each update); extra_args reach the model; a
    # seed (argument or extra_args["seed"], as ComfyUI passes it) gives the Philox stream: reproducible, and the
    # same sample whatever its batch (sample_offset).
    sigmas = torch.tensor(SCHEDULES["ve"]["karras-7"], dtype=torch.float64)
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    seen, kw = [], {}
    a = sample_lcm_gmm(
        lambda x, s, **extra: kw.update(extra) or ve_model(x, s), x, sigmas, extra_args={"seed": 9}, gmm=None,
        disable=True, callback=seen.append,
    )  # fmt: skip
    assert kw == {"seed": 9} and [d["i"] for d in seen] == list(range(7))
    assert all(d["sigma"] == d["sigma_hat"] == sigmas[d["i"]] for d in seen)
    assert all(torch.equal(d["denoised"], ve_model(d["x"], sigmas[d["i"]].expand(2))) for d in seen)
    assert_close(a, sample_lcm_gmm(ve_model, x, sigmas, seed=9, gmm=None, disable=True), kind="exact")
    alone = sample_lcm_gmm(ve_model, x[1:], sigmas, seed=9, gmm=None, disable=True, sample_offset=1)
    assert_close(alone, a[1:], kind="f64_loop")
    assert not is_close(a, sample_lcm_gmm(ve_model, x, sigmas, seed=10, gmm=None, disable=True), "distinct")


def test_gmm_changes_the_samples_and_a_noise_sampler_supplies_z():
    # With a GMM the mixture acts (the samples differ from the GMM-off run of the same seed); a noise sampler
    # supplies z, called where ComfyUI calls it, and the components come from the seed's stream.
    sigmas = torch.tensor(SCHEDULES["flow"]["shift-3"])
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    args = dict(path="flow", n_components=4, seed=4, disable=True)
    off = sample_lcm_gmm(flow_model, x, sigmas, gmm=None, **args)
    on = sample_lcm_gmm(flow_model, x, sigmas, gmm="ortho-lr", **args)
    assert torch.isfinite(on).all() and not is_close(on, off, "distinct")
    a, b = SharedNoise(torch.float32), SharedNoise(torch.float32)
    with_z = sample_lcm_gmm(flow_model, x, sigmas, gmm="ortho-lr", noise_sampler=a, **args)
    assert_close(with_z, sample_lcm_gmm(flow_model, x, sigmas, gmm="ortho-lr", noise_sampler=b, **args), kind="exact")
    assert len(a.calls) == 6 and not is_close(with_z, on, "distinct")


# ---- the mixture's moments ----------------------------------------------------------------------------------


def scale_for(variant: str, cs: list[float], gs: list[float], fill: float) -> float:
    """The GMM scale (D = 16, K = 4, seed 2, a set per step) at which the steps' largest g^2 max v_k / c^2 is
    ``fill`` (v_k grows with the scale squared): every step matched for fill < 1."""
    probe = dg.GMM.create(16, n_components=4, n_steps=len(cs), variant=variant, scale=1.0, seed=2, dtype=torch.float64)
    peaks = probe.var_offsets.reshape(len(cs), -1).amax(1).tolist()
    return math.sqrt(fill * min(c * c / (g * g * v) for c, g, v in zip(cs, gs, peaks, strict=True)))


@pytest.mark.parametrize("variant", ["ortho-lr", "rand"])
@pytest.mark.parametrize(("path", "t", "s"), [("ve", 10.0, 3.0), ("flow", 0.9, 0.5)])
def test_lcm_gmm_step_matches_the_lcm_moments(path, t, s, variant):
    # One LCM step of a denoiser that ignores x (output d), from one x_T repeated N times: the sample mean and
    # per-coordinate variance equal the Gaussian step's, A d and c^2 with (A, c) = (1, s) (VE) or (1 - s, s)
    # (flow), within Monte Carlo bounds, at a GMM scale where the kernel does not clip at the step's g (0.9 of the
    # limit); the mixture acts (the samples differ from the GMM-off run of the seed). Planted mutation, checked to
    # fail (4 of 4): the rows' g = 1 + s^2 on both paths (the square root left out on VE, the VE scale put on the
    # flow path): the kernel then clips and the variance exceeds c^2.
    n = 20000
    flow = path == "flow"
    a_s, c, g = (1 - s, s, 1.0) if flow else (1.0, s, math.sqrt(1 + s * s))
    gmm = dg.GMM.create(
        16, n_components=4, n_steps=1, variant=variant, scale=scale_for(variant, [c], [g], 0.9), seed=2,
        dtype=torch.float64,
    )  # fmt: skip
    assert matched_steps(gmm, [c], [g]) == [True]
    d = torch.randn(1, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2

    def model(x, sigma):
        return d.expand_as(x)

    x = torch.zeros(n, 1, 4, 4, dtype=torch.float64)
    runs = {
        name: sample_lcm_gmm(
            model, x, torch.tensor([t, s], dtype=torch.float64), path=path, gmm=mixture, final_step="gmm", seed=21,
            disable=True,
        ).reshape(n, -1)
        for name, mixture in (("gmm", gmm), ("off", None))
    }  # fmt: skip
    flat = runs["gmm"]
    assert_within(flat.mean(0), (a_s * d).reshape(-1), MC_SIGMAS * c / math.sqrt(n))
    var = c * c
    assert_within(flat.var(0), torch.full((16,), var, dtype=torch.float64), MC_SIGMAS_WIDE * var * math.sqrt(2 / n))
    assert not is_close(runs["gmm"], runs["off"], "distinct")


def test_gmm_steps_matched_reads_the_rows_noise_level_and_scale():
    # gmm_steps="matched" acts on the steps whose kernel does not clip at the row's c and g (matched_steps, decided
    # before the loop): the run equals the one with those steps listed, and differs from "all" (at this scale the
    # late, low-noise steps clip). Checked to fail with the plan given c without g (g = 1: more steps matched).
    sigmas = torch.tensor(SCHEDULES["ve"]["karras-7"], dtype=torch.float64)
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * sigmas[0]
    nexts = sigmas[1:].tolist()
    gmm = dg.GMM.create(32, n_components=4, n_steps=7, variant="ortho-lr", scale=1.5, seed=2, dtype=torch.float64)
    mask = matched_steps(gmm, nexts, [math.sqrt(1 + s * s) for s in nexts])
    assert any(mask) and not all(mask[:-1])

    def run(steps):
        return sample_lcm_gmm(ve_model, x, sigmas, gmm=gmm, gmm_steps=steps, final_step="gmm", seed=3, disable=True)

    matched = run("matched")
    assert_close(matched, run([i for i, m in enumerate(mask) if m]), kind="exact")
    assert not is_close(matched, run("all"), "distinct")


# ---- bad input ----------------------------------------------------------------------------------------------


def _never_called(x, sigma, **kwargs):
    raise AssertionError("the model was called before the arguments were checked")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(path="vp"), ValueError, r"path must be one of \('ve', 'flow'\)"),
        (dict(path="flow", sigmas=torch.tensor([1.5, 0.5, 0.0])), ValueError, r"times in \[0, 1\].*sigmas\[0\]"),
        (dict(path="flow", sigmas=torch.tensor([0.0, 0.0])), ValueError, r"starting above 0"),
        (dict(sigmas=torch.tensor([1.0, 2.0, 0.0])), ValueError, r"must not increase, got sigmas\[0\]"),
        (dict(sigmas=torch.tensor([2.0, math.nan])), ValueError, "finite"),
        (dict(sigmas=torch.tensor([2.0])), ValueError, "at least 2 entries"),
        (dict(sigmas=[2.0, 1.0, 0.0]), TypeError, "sigmas must be a 1-D tensor .*, got list"),
        (dict(sigmas=torch.tensor([2.0, 1.0, 0.0], dtype=torch.complex64)), TypeError, "sigmas must be real"),
        (dict(model=3), TypeError, "model must be callable"),
        (dict(extra_args=[("seed", 1)]), TypeError, "extra_args must be None or a dict"),
        (dict(callback=3), TypeError, "callback must be callable or None, got int"),
        (dict(noise_sampler="tree"), TypeError, "noise_sampler must be callable or None, got str"),
        (dict(gmm="vub"), ValueError, "GMM variant"),
        (dict(gmm=None, scale=math.nan), ValueError, "scale must be a finite number"),
        (dict(n_components=0), ValueError, "n_components must be an int"),
        (dict(gmm_steps="some"), ValueError, "gmm_steps must be one of"),
        (dict(gmm_steps=[5]), ValueError, "gmm_steps"),
        (dict(final_step="last"), ValueError, "final_step"),
        (dict(seed=1.5), ValueError, "seed"),
        (dict(sample_offset=-1), ValueError, "sample_offset must be in"),
        (dict(gmm=dg.GMM.create(16, n_components=2, n_steps=2)), ValueError, "built for dim=16"),
        (dict(x=torch.zeros(SHAPE, dtype=torch.int64)), TypeError, "x must have a floating dtype"),
        (dict(x=torch.tensor(1.0)), ValueError, "x must have a batch dimension"),
    ],
)
def test_bad_input_is_refused_before_any_work(kwargs, error, match):
    # Each argument checked with a message naming it, before the model is called (the model raises), as the other
    # k-diffusion twins refuse it. Checked to fail without the path check (1 case) and without check_flow_start
    # (2); the other rules are the shared ones of the k-diffusion twins.
    args = dict(model=_never_called, sigmas=torch.tensor([2.0, 1.0, 0.0]), x=torch.zeros(SHAPE)) | kwargs
    with pytest.raises(error, match=match):
        sample_lcm_gmm(disable=True, **args)


def test_a_bad_noise_sampler_draw_is_refused_naming_noise_sampler():
    x = torch.randn(SHAPE)
    with pytest.raises(TypeError, match=r"noise_sampler\(sigma, sigma_next\) must return a real tensor.*NoneType"):
        sample_lcm_gmm(ve_model, x, torch.tensor([2.0, 1.0, 0.0]), gmm=None, noise_sampler=lambda s, t: None)


# ---- the README's options table ------------------------------------------------------------------------------


def test_readme_options_table_holds_for_the_few_step_samplers(monkeypatch):
    # The defaults the README's GMM-options table gives these samplers are their signatures' (as
    # tests/test_gmm_options.py checks the others), and the table's keywords reach the tables' build. Checked to
    # fail with sample_res_multistep_ancestral_gmm's gmm default None, and with _start dropping the seed.
    import inspect

    from ddim_gmm_ext.k_diffusion import sample_res_multistep_ancestral_gmm, sample_res_multistep_gmm
    from tests.test_gmm_options import _table, _value, _variant_defaults

    table, variants = _table(), _variant_defaults()
    for f in (sample_lcm_gmm, sample_res_multistep_gmm, sample_res_multistep_ancestral_gmm):
        params = inspect.signature(f).parameters
        assert params["gmm"].default == variants[f.__name__], f.__name__
        for option, (keyword, default) in table.items():
            if option != "variant":
                assert params[keyword].default == _value(default), (f.__name__, keyword)
    builds = []
    create = dg.GMM.create
    monkeypatch.setattr(dg.GMM, "create", staticmethod(lambda *a, **k: builds.append(k) or create(*a, **k)))
    documented = {table["variant"][0]: "ortho", table["K"][0]: 3, table["s / sqrt(D)"][0]: 0.25,
                  table["last step"][0]: "gmm", table["where it acts"][0]: [0, 2], table["seed"][0]: 7}  # fmt: skip
    x, sigmas = torch.randn(2, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([8.0, 3.0, 1.0, 0.0])
    for f in (sample_lcm_gmm, sample_res_multistep_ancestral_gmm):
        builds.clear()
        assert torch.isfinite(f(lambda v, s: torch.tanh(v), x, sigmas, disable=True, **documented)).all()
        (k,) = builds
        assert (k["variant"], k["n_components"], k["scale_per_dim"], k["scale"], k["seed"]) == (
            "ortho",
            3,
            0.25,
            None,
            7,
        )
