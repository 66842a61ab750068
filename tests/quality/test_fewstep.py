"""The few-step study's samplers (ddim_gmm_ext.quality.fewstep): with the mixture off, whole LCM / TCD loops equal
the installed diffusers' LCMScheduler / TCDScheduler fed the same model and the same noise draws; the matched-scale
rule; the mixture and the matched-noise control plumbing.

Mutations these were checked against (each planted, seen to fail, reverted): TCD's s = floor((1 - gamma) t')
rounded instead (fails gamma 0.5, where (1 - gamma) t' = 10m - 0.5 on LCM's timesteps 20m - 1); LCM's boundary
term c_skip b_t dropped from B; LCM's re-noise std sqrt(1 - abar_t') replaced by b_t; TCD's sqrt(1 - r^2) replaced
by sqrt(1 - abar_t'); the largest matched scale returned one grid step too large (fails test_largest_matched_scale)."""

import pytest
import torch
from diffusers import LCMScheduler, TCDScheduler

from ddim_gmm_ext.gmm import GMM, matched_steps
from ddim_gmm_ext.quality import fewstep
from ddim_gmm_ext.quality.sampling import BETAS, MatchedNoise

D = 16


class ToyEps:
    """A fixed smooth epsilon model (float64) whose x0 prediction is bounded, tanh(x W + t / 1000), as a trained
    denoiser's is (an arbitrary eps would make x0_hat = (x - b_t eps) / a_t huge at t = 999 and the comparison
    ill-conditioned)."""

    def __init__(self):
        self.w = torch.randn(D, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64) / D**0.5
        self.abar = LCMScheduler(**BETAS).alphas_cumprod.double()

    def __call__(self, x, t):
        abar = self.abar[t.long()][:, None]
        x0 = torch.tanh(x @ self.w + t.to(x.dtype)[:, None] / 1000)
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()


def _stock_loop(scheduler, model, x, steps, gamma=None):
    """diffusers' loop; returns (output, the noise tensors it drew per step (None where it drew none)). Its
    abar table in float64 (diffusers keeps float32 scalars, which would round a float64 loop at 1e-7)."""
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(11)
    noises = []
    for t in scheduler.timesteps:
        state = generator.get_state()
        kwargs = {} if gamma is None else {"eta": gamma}
        x = scheduler.step(model(x, t.expand(len(x))), t, x, generator=generator, **kwargs).prev_sample
        drew = not torch.equal(state, generator.get_state())
        replay = torch.Generator()
        replay.set_state(state)
        noises.append(torch.randn(x.shape, generator=replay, dtype=x.dtype) if drew else None)
    return x, noises


def _ours(kind, scheduler, model, x, steps, noises, **options):
    table = fewstep.fewstep_table(kind, steps, scheduler.alphas_cumprod, **options)
    assert list(table.timesteps) == scheduler.timesteps.tolist()
    return fewstep.sample_fewstep(model, x, table, [None], seed=0, noises=noises)[0]


def _x_T(n=6):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 8])
@pytest.mark.parametrize("timestep_scaling", [10.0, 0.01])
def test_lcm_loop_equals_diffusers(steps, timestep_scaling):
    """With diffusers' boundary conditions (its default scaling 10, and a small one where they matter)."""
    model = ToyEps()
    stock = LCMScheduler(**BETAS, timestep_scaling=timestep_scaling)
    want, noises = _stock_loop(stock, model, _x_T(), steps)
    assert sum(n is not None for n in noises) == steps - 1
    got = _ours("lcm", stock, model, _x_T(), steps, noises, timestep_scaling=timestep_scaling)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("steps", [2, 4, 8])
def test_lcm_without_boundary_conditions_is_the_plain_x0(steps):
    """timestep_scaling None (the study's, for a model that is not distilled) is diffusers' loop in the limit
    c_skip -> 0, c_out -> 1 (a huge timestep_scaling)."""
    model = ToyEps()
    stock = LCMScheduler(**BETAS, timestep_scaling=1e12)
    want, noises = _stock_loop(stock, model, _x_T(), steps)
    got = _ours("lcm", stock, model, _x_T(), steps, noises, timestep_scaling=None)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 8])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.5, 1.0])
def test_tcd_loop_equals_diffusers(steps, gamma):
    model = ToyEps()
    stock = TCDScheduler(**BETAS)
    want, noises = _stock_loop(stock, model, _x_T(), steps, gamma=gamma)
    got = _ours("tcd", stock, model, _x_T(), steps, noises, gamma=gamma)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_timesteps_are_diffusers():
    for steps in (1, 2, 3, 4, 8, 13, 50):
        s = LCMScheduler(**BETAS)
        s.set_timesteps(steps)
        assert fewstep.fewstep_timesteps(steps) == s.timesteps.tolist()
    with pytest.raises(ValueError, match="steps must be in"):
        fewstep.fewstep_timesteps(51)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="kind must be"):
        fewstep.fewstep_table("ddim", 4)
    with pytest.raises(ValueError, match="gamma must be"):
        fewstep.fewstep_table("tcd", 4, gamma=1.5)
    with pytest.raises(ValueError, match="timestep_scaling"):
        fewstep.fewstep_table("lcm", 4, timestep_scaling=-1.0)


@pytest.mark.parametrize("kind", fewstep.KINDS)
@pytest.mark.parametrize("steps", [2, 4, 8])
@pytest.mark.parametrize("variant", ["ortho-vub", "ortho-lr"])
def test_largest_matched_scale(kind, steps, variant):
    """Matched on every re-noising step at s, clipped on some step at s + 0.01."""
    table = fewstep.fewstep_table(kind, steps)
    s = fewstep.largest_matched_scale(table, 8, 784, variant)
    acting = [i for i, g in enumerate(table.gmm_scales) if g != 0]
    for scale, want in ((s, True), (round(s + 0.01, 2), False)):
        gmm = GMM.create(784, n_components=8, n_steps=steps, variant=variant, seed=0, scale=scale)
        matched = matched_steps(gmm, table.noise_stds, table.gmm_scales)
        assert all(matched[i] for i in acting) is want, (scale, matched)


def test_mixture_and_control_act_only_where_it_renoises():
    """The GMM and its matched-noise control change the loop, the last (noise-free) step stays Gaussian, and the
    paired Gaussian entry is unchanged by sharing the batch with them."""
    model = ToyEps()
    table = fewstep.fewstep_table("lcm", 4)
    x = _x_T().float()
    gmm = GMM.create(D, n_components=4, n_steps=4, variant="ortho-lr", seed=0, scale=0.5)
    control = MatchedNoise(gmm, (True, True, True, False))
    model32 = lambda x, t: model(x.double(), t).float()  # noqa: E731
    alone = fewstep.sample_fewstep(model32, x, table, [None], seed=2)[0]
    base, mixed, noisy = fewstep.sample_fewstep(model32, x, table, [None, gmm, control], seed=2)
    torch.testing.assert_close(base, alone, rtol=0, atol=0)
    assert (mixed - base).abs().max() > 1e-3 and (noisy - base).abs().max() > 1e-3


class _Scorer:
    """A stand-in for the Inception scorer: the samples' mean and std as "fid" / "kid"; counts its calls."""

    reference = {"name": "stand-in", "n": 0, "sha256": ""}

    def __init__(self):
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return {"fid": float(x.std()), "kid": float(x.mean())}


def _model784(x, t):
    return 0.5 * x  # an eps model of the study's shape [B, 784]


def test_study_runs_resumes_and_summarises(tmp_path):
    """Every (seed, sampler, steps) cell scores the four arms; a rerun keeps the rows (no new scoring); the
    summary's comparisons are the paired tests of the rows, Holm-adjusted; another configuration is refused.
    Checked against: the resume filter removed (the rerun scores again)."""
    from ddim_gmm_ext.quality.metrics import paired_test

    config = fewstep.StudyConfig(samplers=(("lcm", None), ("tcd", 0.3)), steps=(2, 4), seeds=(0, 1, 2), samples=3)
    out = tmp_path / "f.json"
    scorer = _Scorer()
    fewstep.run_study(config, out, log=lambda line: None, model=_model784, scorer=scorer)
    assert scorer.calls == 3 * 2 * 2 * len(fewstep.ARMS)
    again = _Scorer()
    fewstep.run_study(config, out, log=lambda line: None, model=_model784, scorer=again)
    assert again.calls == 0
    import json

    payload = json.loads(out.read_text())
    assert [c["seeds"] for c in payload["summary"]["cells"]] == [[0, 1, 2]] * 4
    # a cell a seed has not finished (an arm missing) is summarised over the seeds that finished it
    partial = [
        r for r in payload["rows"] if (r["seed"], r["sampler"], r["steps"], r["arm"]) != (2, "LCM", 4, "control")
    ]
    cells = fewstep.summarise(partial, config)["cells"]
    assert [c["seeds"] for c in cells] == [[0, 1, 2], [0, 1], [0, 1, 2], [0, 1, 2]]
    assert fewstep.StudyConfig.from_dict(payload["config"]) == config
    assert all(c["matched_every_step"] and 0.98 < c["max_g2v_over_c2"] <= 1 for c in payload["cells"])
    by = {(r["seed"], r["sampler"], r["steps"], r["arm"]): r["fid"] for r in payload["rows"]}
    for c in payload["summary"]["comparisons"]:
        if c["metric"] == "fid":
            want = paired_test(
                *([by[(s, c["sampler"], c["steps"], arm)] for s in (0, 1, 2)] for arm in (c["a"], c["b"]))
            )
            assert c["mean"] == pytest.approx(want["mean"]) and c["p"] == pytest.approx(want["p"])
            assert c["p_holm"] >= c["p"]
    # the arms differ (the mixture and the control are not the Gaussian loop)
    assert by[(0, "LCM", 4, "GMM-ORTHO-LR")] != by[(0, "LCM", 4, "Gaussian")] != by[(0, "LCM", 4, "control")]
    assert "| LCM | 2 |" in fewstep.table_markdown(payload)
    # only_steps runs a subset of the cells; a later run completes the rest without redoing it
    part, rest = _Scorer(), _Scorer()
    fewstep.run_study(config, tmp_path / "g.json", log=lambda line: None, model=_model784, scorer=part, only_steps=(4,))
    fewstep.run_study(config, tmp_path / "g.json", log=lambda line: None, model=_model784, scorer=rest)
    assert part.calls == rest.calls == 3 * 2 * len(fewstep.ARMS)
    with pytest.raises(ValueError, match="another configuration"):
        fewstep.run_study(fewstep.StudyConfig(seeds=(0,), samples=3), out, model=_model784, scorer=_Scorer())


@pytest.mark.parametrize("kind", fewstep.KINDS)
def test_renoise_step_is_moment_matched_at_the_study_scale(kind):
    """Monte Carlo: one re-noising step of ORTHO-LR at the largest matched scale has the Gaussian step's mean and
    full covariance c^2 I (point-mass x0; 40,000 samples, D = 16, K = 4), while its offsets are visible (the
    component draw moves the sample). Checked against: the matched scale returned 1.5x too large (the kernel
    clips: the covariance is off by up to 0.34 in the offsets' span)."""
    from ddim_gmm_ext import step_from_table

    steps, K, n = 4, 4, 40_000
    table = fewstep.fewstep_table(kind, steps)
    s = fewstep.largest_matched_scale(table, K, D, "ortho-lr")
    gmm = GMM.create(D, n_components=K, n_steps=steps, variant="ortho-lr", seed=1, scale=s, dtype=torch.float64)
    i = 2  # the last re-noising step: the smallest c, where matching is tightest
    a_t, b_t, A, B, c, g = table.rows[i].tolist()
    assert g == 1 and c > 0
    x0 = torch.linspace(-0.8, 0.8, D, dtype=torch.float64)
    eps = torch.randn(n, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = a_t * x0 + b_t * eps
    out = step_from_table(eps, x, table.rows, i, gmm=gmm, seed=4)
    mean_want = A * x0 + B * eps  # per sample; the step adds zero-mean offsets + noise on top
    resid = out.prev_sample - mean_want
    se = c / n**0.5
    assert resid.mean(0).abs().max() < 5 * se
    cov = torch.cov(resid.T)
    tol = 5 * c * c * (2 / n) ** 0.5  # ~5 standard errors of a sample (co)variance
    torch.testing.assert_close(cov, c * c * torch.eye(D, dtype=torch.float64), rtol=0, atol=tol)
    assert len(torch.unique(out.components)) == K
