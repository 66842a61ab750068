"""sample_ddim_gmm (k-diffusion conventions) against VP DDIM(-GMM) runs of the same eps model; ComfyUI node."""

import importlib
import sys
import types

import pytest
import torch

import ddim_gmm_ext as dg
from ddim_gmm_ext.k_diffusion import sample_ddim_gmm
from tests.helpers import assert_close

SHAPE = (3, 2, 4, 4)
STEPS = 5
T = 1000


def _eps_model(x_vp, t):
    """An eps prediction of the VP sample at integer timesteps t [B]."""
    return torch.tanh(x_vp) * (1 + t.to(x_vp.dtype)[:, None, None, None] / T)


def _schedule():
    """Inference timesteps (diffusers 'leading', final abar = 1) and their abar, float64."""
    abar = dg.reference.alphas_cumprod(dg.reference.make_betas()).double()
    ts, _ = dg.reference.ddim_timesteps(STEPS, T)
    ab = torch.cat([abar[torch.from_numpy(ts)], torch.ones(1, dtype=torch.float64)])
    return torch.from_numpy(ts), ab


def _vp_run(x_T, eta, gmm, seed, final_step="gaussian"):
    """Plain loop of dg.ddim_step on the VP path (no GMM on the last step for final_step="gaussian"); returns
    the samples after each step."""
    ts, ab = _schedule()
    x, xs = x_T, []
    for i in range(STEPS):
        eps = _eps_model(x, ts[i].expand(x.shape[0]))
        step_gmm = None if final_step == "gaussian" and i == STEPS - 1 else gmm
        x = dg.ddim_step(eps, x, ab[i], ab[i + 1], eta=eta, gmm=step_gmm, step_index=i, seed=seed).prev_sample
        xs.append(x)
    return xs


def _ve_denoiser():
    """k-diffusion's view of the eps model (as CompVisDenoiser): x0 = x - sigma eps(x / sqrt(1 + sigma^2), t)."""
    ts, ab = _schedule()
    sigmas = ((1 - ab) / ab).sqrt()  # last one 0

    def model(x, sigma):
        i = (sigmas[None, :-1] - sigma[:, None].double()).abs().argmin(1)
        s = sigma.to(x.dtype)[:, None, None, None]
        return x - s * _eps_model(x / (1 + s**2).sqrt(), ts[i])

    return model, sigmas


@pytest.mark.parametrize("final_step", ["gaussian", "gmm"])
@pytest.mark.parametrize("eta", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("gmm", [None, "ortho", "rand"])
def test_ve_run_equals_vp_run(eta, gmm, final_step):
    """x_VE = x_VP / sqrt(abar) after every step, with the same Philox noise and components."""
    model, sigmas = _ve_denoiser()
    _, ab = _schedule()
    x_T = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tables = (
        None
        if gmm is None
        else dg.GMM.create(32, n_components=3, n_steps=STEPS, variant=gmm, seed=1, dtype=torch.float64)
    )
    expected = _vp_run(x_T, eta, tables, seed=7, final_step=final_step)
    seen = []
    out = sample_ddim_gmm(
        model,
        x_T / ab[0].sqrt(),
        sigmas,
        eta=eta,
        gmm=tables,
        seed=7,
        disable=True,
        callback=lambda d: seen.append(d),
        final_step=final_step,
    )
    ve_after = [d["x"] for d in seen[1:]] + [out]
    for i in range(STEPS):
        assert_close(ve_after[i], expected[i] / ab[i + 1].sqrt(), kind="f64_loop_ve")
    assert [d["i"] for d in seen] == list(range(STEPS))
    assert all(d["sigma"] == d["sigma_hat"] == sigmas[d["i"]] for d in seen)


def test_eta_zero_without_gmm_is_euler():
    model, sigmas = _ve_denoiser()
    x = torch.randn(SHAPE, dtype=torch.float64)
    expected = x
    for i in range(STEPS):
        d = (expected - model(expected, sigmas[i].expand(SHAPE[0]))) / sigmas[i]
        expected = expected + d * (sigmas[i + 1] - sigmas[i])
    torch.testing.assert_close(sample_ddim_gmm(model, x, sigmas, gmm=None, disable=True), expected)


def test_noise_sampler_s_noise_and_extra_args():
    """noise_sampler is called only when the next sigma is > 0; s_noise scales the noise it returns."""
    calls = []
    model, sigmas = _ve_denoiser()

    def sampler(sigma, sigma_next):
        calls.append(float(sigma_next))
        return torch.ones(SHAPE, dtype=torch.float64)

    x = torch.randn(SHAPE, dtype=torch.float64)
    a = sample_ddim_gmm(model, x, sigmas, eta=1.0, noise_sampler=sampler, s_noise=0.0, gmm=None, disable=True)
    b = sample_ddim_gmm(
        model, x, sigmas, eta=1.0, noise_sampler=lambda s, sn: torch.zeros_like(x), gmm=None, disable=True
    )
    assert len(calls) == STEPS - 1 and all(c > 0 for c in calls)
    torch.testing.assert_close(a, b)
    seen = {}
    sample_ddim_gmm(lambda x, s, **kw: seen.update(kw) or model(x, s), x, sigmas, extra_args={"seed": 3}, disable=True)
    assert seen == {"seed": 3}


def test_progress_bar(capsys):
    model, sigmas = _ve_denoiser()
    x = torch.randn(SHAPE, dtype=torch.float64)
    sample_ddim_gmm(model, x, sigmas, disable=False)
    assert "DDIM-GMM" in capsys.readouterr().err
    sample_ddim_gmm(model, x, sigmas, disable=True)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(sigmas=torch.tensor([1.0, 2.0, 0.0])), ValueError, r"must not increase, got sigmas\[0\] = 1.0"),
        (dict(sigmas=torch.tensor([2.0, float("nan")])), ValueError, "finite"),
        (dict(sigmas=torch.tensor([0.0])), ValueError, "at least 2 entries"),
        (dict(eta=2.0), ValueError, "eta must be"),
        (dict(s_noise=-1.0), ValueError, "s_noise"),
        (dict(s_noise=float("nan")), ValueError, "s_noise"),
        # unused with the GMM off, still checked, as the schedulers check gmm_scale with gmm_variant=None
        # (checked to fail without the check_gmm_options call for gmm=None)
        (dict(gmm=None, scale=float("nan")), ValueError, "scale must be a finite number"),
        (dict(gmm=None, n_components=0), ValueError, "n_components must be an int"),
        (dict(gmm="vub"), ValueError, "GMM variant"),
        (dict(gmm=dg.GMM.create(16, n_components=2, n_steps=2)), ValueError, "built for dim=16"),
        (dict(gmm=dg.GMM.create(32, n_components=2, n_steps=1)), ValueError, "parameter sets for 1 steps"),
        (dict(seed=1.5), ValueError, "seed"),
        (dict(x=3), TypeError, "x must be a torch.Tensor"),
        (dict(x=torch.zeros(())), ValueError, "x must have a batch dimension"),
        (dict(x=torch.zeros(SHAPE, dtype=torch.int64)), TypeError, "x must have a floating dtype"),
        # used first inside the loop, where they failed naming nothing: checked to fail (5 of 5) without
        # check_loop_arguments (the sigmas case: with the old ValueError of _check_sigmas)
        (dict(model=None), TypeError, "model must be callable"),
        (dict(extra_args="seed"), TypeError, "extra_args must be None or a dict"),
        (dict(callback=print, noise_sampler=3), TypeError, "noise_sampler must be callable or None, got int"),
        (dict(callback=[]), TypeError, "callback must be callable or None, got list"),
        (dict(sigmas=(2.0, 1.0, 0.0)), TypeError, "sigmas must be a 1-D tensor .*, got tuple"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = dict(model=lambda x, s: x, sigmas=torch.tensor([2.0, 1.0, 0.0]), x=torch.zeros(SHAPE), eta=0.5)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        sample_ddim_gmm(disable=True, **args)


def test_comfy_node_only_inside_comfyui(monkeypatch):
    import ddim_gmm_ext.comfy as node

    assert node.NODE_CLASS_MAPPINGS == {}
    made = []
    comfy = types.ModuleType("comfy")
    comfy.samplers = types.ModuleType("comfy.samplers")
    comfy.samplers.KSAMPLER = lambda fn, extra_options: made.append((fn, extra_options)) or "sampler"
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.samplers", comfy.samplers)
    try:
        importlib.reload(node)
        cls = node.NODE_CLASS_MAPPINGS["SamplerDDIMGMM"]
        assert "variant" in cls.INPUT_TYPES()["required"]
        assert cls().get_sampler(eta=0.5, s_noise=1.0, variant="off", n_components=4, scale=2.0) == ("sampler",)
        assert made[0][0] is node.sample_ddim_gmm_any and made[0][1]["gmm"] is None and made[0][1]["eta"] == 0.5
    finally:
        monkeypatch.undo()
        importlib.reload(node)
    assert node.NODE_CLASS_MAPPINGS == {}


# ---- against k-diffusion's own samplers, on the schedules they run -----------------------------------------


def _schedules():
    """(name, sigmas): Karras with 7 steps (not dividing 1000), the high half of a split schedule (ends above
    0: a partial denoise), and a schedule with a repeated sigma."""
    from tests.integrations.kdiffusion_upstream import load_sampling

    K = load_sampling()
    karras = K.get_sigmas_karras(7, 0.03, 14.6, device="cpu").double()
    return [
        ("karras-7", karras),
        ("split-high", karras[:4]),
        ("repeated", torch.cat([karras[:3], karras[2:]])),
    ]


class _SharedNoise:
    """One noise sequence for both samplers: the n-th call returns the n-th draw of a seeded generator."""

    def __init__(self, shape):
        self.gen, self.shape = torch.Generator().manual_seed(5), shape

    def __call__(self, sigma, sigma_next):
        return torch.randn(self.shape, generator=self.gen, dtype=torch.float64)


@pytest.mark.parametrize("case", range(3))
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_equals_k_diffusion_samplers(case, eta):
    # GMM off: eta 0 is k-diffusion's sample_euler, eta 1 its sample_euler_ancestral (same noise sampler).
    # Checked to fail when a repeated sigma is stepped as a DDIM step with GMM offsets, and with the old
    # check that refused schedules not ending in 0.
    from tests.integrations.kdiffusion_upstream import load_sampling

    K = load_sampling()
    name, sigmas = _schedules()[case]
    model, _ = _ve_denoiser()
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(case)) * sigmas[0]
    if eta == 0:
        expected = K.sample_euler(model, x, sigmas, disable=True)
        ours = sample_ddim_gmm(model, x, sigmas, gmm=None, disable=True)
    else:
        expected = K.sample_euler_ancestral(model, x, sigmas, disable=True, noise_sampler=_SharedNoise(SHAPE))
        ours = sample_ddim_gmm(model, x, sigmas, eta=1.0, gmm=None, disable=True, noise_sampler=_SharedNoise(SHAPE))
    assert_close(ours, expected, kind="f64_loop_ve")


def test_gmm_runs_on_partial_schedules():
    model, _ = _ve_denoiser()
    sigmas = torch.tensor([14.6, 5.0, 5.0, 2.0, 0.5], dtype=torch.float64)  # repeated, ends above 0
    x = torch.randn(SHAPE, dtype=torch.float64) * sigmas[0]
    out = sample_ddim_gmm(model, x, sigmas, eta=0.5, gmm="ortho", n_components=3, seed=2**64 - 1, disable=True)
    assert torch.isfinite(out).all()
