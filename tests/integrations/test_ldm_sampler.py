"""latent-diffusion style DDIMSampler against diffusers' DDIMScheduler / DDIMGMMScheduler on the same schedule."""

import pytest
import torch

import ddim_gmm_ext as dg
from tests.helpers import assert_close

SHAPE = (2, 4, 4)
BATCH = 3
STEPS = 4


class StandIn(torch.nn.Module):
    """The interface latent-diffusion's LatentDiffusion offers the sampler: alphas_cumprod, apply_model."""

    def __init__(self, parameterization="eps"):
        super().__init__()
        self.parameterization = parameterization
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())
        self.calls = []

    def apply_model(self, x, t, c):
        self.calls.append((x.shape[0], c))
        shift = 0.0 if c is None else c[:, :1, None, None]
        return torch.tanh(x) * (1 + t[:, None, None, None] / 1000) + shift


def _diffusers_run(model, x_T, eta, seed, cond=None, uncond=None, w=1.0, gmm=None):
    """The same sampling with diffusers' scheduler on latent-diffusion's schedule (timesteps 1 + k T // S,
    final alpha = alphas_cumprod[0]) and the Philox noise of each step as variance_noise."""
    from ddim_gmm_ext.diffusers import DDIMGMMScheduler

    betas = 1 - model.alphas_cumprod / torch.cat([torch.ones(1), model.alphas_cumprod[:-1]])
    s = DDIMGMMScheduler(
        trained_betas=betas.tolist(), clip_sample=False, set_alpha_to_one=False, steps_offset=1, seed=seed
    )
    s.alphas_cumprod = model.alphas_cumprod.clone()  # the exact cumprod, not the round trip through betas
    s.final_alpha_cumprod = model.alphas_cumprod[0]
    s.set_gmm_params(gmm_params=gmm)
    s.set_timesteps(STEPS)
    x = x_T
    for i, t in enumerate(s.timesteps):
        tb = t.expand(BATCH)
        m = model.apply_model(x, tb, cond)
        if uncond is not None:
            m_u = model.apply_model(x, tb, uncond)
            m = m_u + w * (m - m_u)
        z = dg.reference.gaussian_noise(x.shape, seed, 0, i) if gmm is None else None
        x = s.step(m, t, x, eta=eta, variance_noise=z).prev_sample
    return x


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_equals_diffusers_on_the_same_schedule(eta):
    pytest.importorskip("diffusers")
    model = StandIn()
    x_T = torch.randn(BATCH, *SHAPE)
    sampler = dg.DDIMSampler(model, seed=4)
    samples, inter = sampler.sample(steps=STEPS, batch_size=BATCH, shape=SHAPE, eta=eta, x_T=x_T, progress=False)
    assert_close(samples, _diffusers_run(model, x_T, eta, seed=4), kind="f32")
    # x_T, then (as latent-diffusion logs) the first step and every log_every_t-th schedule index, here the last
    assert len(inter["x_inter"]) == len(inter["pred_x0"]) == 3 and inter["x_inter"][0] is x_T


def test_guidance_in_one_call_and_gmm_equals_diffusers_gmm():
    pytest.importorskip("diffusers")
    model = StandIn()
    x_T = torch.randn(BATCH, *SHAPE)
    cond, uncond = torch.randn(BATCH, 3), torch.zeros(BATCH, 3)
    gmm = dg.GMM.create(32, n_components=3, n_steps=STEPS, variant="ortho-vub", scale=2.0, seed=1)
    sampler = dg.DDIMSampler(model, gmm=gmm, seed=2)
    samples, _ = sampler.sample(
        STEPS,
        BATCH,
        SHAPE,
        conditioning=cond,
        unconditional_conditioning=uncond,
        unconditional_guidance_scale=3.0,
        eta=0.5,
        x_T=x_T,
        progress=False,
    )
    assert [n for n, _ in model.calls] == [2 * BATCH] * STEPS
    assert torch.equal(model.calls[0][1], torch.cat([uncond, cond]))
    expected = _diffusers_run(model, x_T, 0.5, seed=2, cond=cond, uncond=uncond, w=3.0, gmm=gmm)
    assert_close(samples, expected, kind="f32")


def test_v_parameterization_schedule_and_callbacks(capsys):
    model = StandIn("v")
    steps, images = [], []
    sampler = dg.DDIMSampler(model, gmm="rand", n_components=2, seed=0)
    samples, _ = sampler.sample(
        S=STEPS, batch_size=BATCH, shape=SHAPE, callback=steps.append, img_callback=lambda x0, i: images.append(i)
    )
    assert steps == images == list(range(STEPS)) and torch.isfinite(samples).all()
    assert sampler.ddim_timesteps.tolist() == [1, 251, 501, 751]
    assert "DDIM-GMM Sampler" in capsys.readouterr().err
    sampler.sample(STEPS, BATCH, SHAPE, verbose=False)  # upstream shows its bar with verbose=False too
    assert "DDIM-GMM Sampler" in capsys.readouterr().err
    sampler.sample(STEPS, BATCH, SHAPE, progress=False)
    assert capsys.readouterr().err == ""


def test_bad_input():
    model = StandIn()
    with pytest.raises(TypeError, match="apply_model"):
        dg.DDIMSampler(object())
    with pytest.raises(ValueError, match="gmm=False"):
        dg.DDIMSampler(model, gmm_params=dg.GMM.create(32, n_components=2, n_steps=STEPS))
    sampler = dg.DDIMSampler(model, gmm=dg.GMM.create(32, n_components=2, n_steps=2))
    with pytest.raises(ValueError, match="parameter sets for 2 steps"):
        sampler.sample(STEPS, BATCH, SHAPE, progress=False)
    with pytest.raises(ValueError, match="ddim_eta"):
        sampler.make_schedule(STEPS, ddim_eta=1.5)
    with pytest.raises(ValueError, match="once"):
        sampler.sample(STEPS, BATCH, SHAPE, S=STEPS)
    with pytest.raises(ValueError, match="x_T must have shape"):
        dg.DDIMSampler(model).sample(STEPS, BATCH, SHAPE, x_T=torch.zeros(1, *SHAPE), progress=False)
    with pytest.raises(ValueError, match="ddim_discretize"):
        sampler.make_schedule(STEPS, ddim_discretize="cubic")


# ---- latent-diffusion's own schedule, step counts that do not divide 1000 --------------------------------


def _upstream_uniform(S: int, T: int = 1000) -> list[int]:
    """latent-diffusion's "uniform" DDIM timesteps, derived from its rule: every c-th train step from 0 with
    c = T // S, shifted by one; the timestep T it can produce is not a train timestep (clamped to T - 1)."""
    c = T // S
    out, t = [], 0
    while t < T:
        out.append(min(t + 1, T - 1))
        t += c
    return sorted(set(out))


def test_uniform_schedule_for_every_step_count():
    # Checked to fail with the old rule that ran exactly S steps (31 timesteps for S = 30, 7 -> 8, 3 -> 4).
    from ddim_gmm_ext.integrations.ldm import ddim_timesteps

    for S in range(1, 1001):
        assert ddim_timesteps("uniform", S, 1000).tolist() == _upstream_uniform(S), S
    assert len(ddim_timesteps("uniform", 30, 1000)) == 31 and len(ddim_timesteps("uniform", 7, 1000)) == 8


def _upstream_loop(model, x_T, S, eta, seed):
    """latent-diffusion's p_sample_ddim loop from its formulas (eps parameterisation), every timestep of its
    schedule, with our Philox noise of step i as its noise draw."""
    abar = model.alphas_cumprod.double()
    ts = _upstream_uniform(S)
    alphas = abar[ts]
    alphas_prev = torch.cat([abar[:1], abar[ts[:-1]]])
    sigmas = eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()
    x = x_T.double()
    n = len(ts)
    for i, t in enumerate(reversed(ts)):
        index = n - 1 - i
        e = model.apply_model(x.float(), torch.full((x.shape[0],), t), None).double()
        a_t, a_prev, sigma = alphas[index], alphas_prev[index], sigmas[index]
        pred_x0 = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()
        dir_xt = (1 - a_prev - sigma**2).sqrt() * e
        z = dg.reference.gaussian_noise(x.shape, seed, 0, i, torch.float64)
        x = a_prev.sqrt() * pred_x0 + dir_xt + sigma * z
    return x


@pytest.mark.parametrize("S", [7, 30, 50, 250])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_whole_loop_equals_upstream_schedule(S, eta):
    # Checked to fail (relative difference 0.16 at S = 30) with the old loop that paired S model calls with
    # the coefficients of the wrong timesteps.
    model = StandIn()
    x_T = torch.randn(BATCH, *SHAPE, generator=torch.Generator().manual_seed(S))
    samples, _ = dg.DDIMSampler(model, seed=9).sample(S=S, batch_size=BATCH, shape=SHAPE, eta=eta, x_T=x_T,
                                                      progress=False)  # fmt: skip
    assert len(model.calls) == len(_upstream_uniform(S))
    assert_close(samples.double(), _upstream_loop(model, x_T, S, eta, seed=9), kind="f32_vs_f64_loop")


@pytest.mark.parametrize("S", [3, 600, 1000])
def test_step_counts_upstream_cannot_index_run(S):
    model = StandIn()
    samples, _ = dg.DDIMSampler(model, gmm="ortho", n_components=2, seed=0).sample(
        S=S if S != 1000 else 1000, batch_size=1, shape=SHAPE, progress=False
    )
    assert torch.isfinite(samples).all()


def test_log_every_t_and_parameterization_are_checked_before_sampling():
    model = StandIn()
    sampler = dg.DDIMSampler(model)
    with pytest.raises(ValueError, match="log_every_t must be an int >= 1, got 0"):
        sampler.sample(S=5, batch_size=1, shape=SHAPE, log_every_t=0, progress=False)
    model.parameterization = "flow"
    with pytest.raises(ValueError, match=r"model.parameterization must be one of \('eps', 'x0', 'v'\)"):
        sampler.sample(S=5, batch_size=1, shape=SHAPE, progress=False)
    assert model.calls == []  # refused before any model call
