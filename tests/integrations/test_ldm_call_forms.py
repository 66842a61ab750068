"""The call forms of latent-diffusion's / Stable Diffusion's own scripts on our DDIMSampler: constructor keywords,
img2img (make_schedule, stochastic_encode, decode), inpainting (mask, x0), temperature, noise dropout, the score
corrector, per-step guidance, schedule attributes with upstream's types; each against upstream's formulas
written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ddim_gmm_ext as dg
from tests.helpers import assert_close

SHAPE = (2, 4, 4)
B = 3


class StandIn(torch.nn.Module):
    """alphas_cumprod and apply_model as LatentDiffusion offers them, plus q_sample (counted)."""

    def __init__(self):
        super().__init__()
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())
        self.q_calls = []

    def apply_model(self, x, t, c):
        shift = 0.0 if c is None else c[:, :1, None, None]
        return torch.tanh(x) * (1 + t[:, None, None, None] / 1000) + shift

    def q_sample(self, x0, t):
        self.q_calls.append(int(t[0]))
        a = self.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        return a.sqrt() * x0  # noise-free, so the inpainting loop is deterministic


def _upstream_decode(model, x, sampler, t_start):
    """latent-diffusion's decode at eta 0 from its formulas: p_sample_ddim from index t_start - 1 down to 0."""
    ts = sampler.ddim_timesteps
    alphas = torch.as_tensor(model.alphas_cumprod.double()[ts])
    prev = torch.cat([model.alphas_cumprod.double()[:1], model.alphas_cumprod.double()[ts[:-1]]])
    x = x.double()
    for index in range(t_start - 1, -1, -1):
        t = torch.full((x.shape[0],), int(ts[index]))
        e = model.apply_model(x.float(), t, None).double()
        a_t, a_prev = alphas[index], prev[index]
        pred_x0 = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()
        x = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * e
    return x


def test_constructor_takes_upstream_keywords():
    model = StandIn()
    dg.DDIMSampler(model, schedule="linear", device=torch.device("cpu"), some_future_kwarg=1)
    with pytest.raises(ValueError, match="schedule must be 'linear'"):
        dg.DDIMSampler(model, schedule="cosine")


def test_schedule_attributes_have_upstream_types():
    sampler = dg.DDIMSampler(StandIn())
    sampler.make_schedule(ddim_num_steps=30, ddim_eta=0.5, verbose=False)
    assert isinstance(sampler.ddim_timesteps, np.ndarray) and sampler.ddim_timesteps.dtype == np.int64
    assert isinstance(sampler.ddim_alphas_prev, np.ndarray)
    for name in ("ddim_alphas", "ddim_sigmas", "ddim_sqrt_one_minus_alphas"):
        value = getattr(sampler, name)
        assert isinstance(value, torch.Tensor) and value.dtype == torch.float32 and len(value) == 31, name


def test_img2img_encode_then_decode_equals_upstream():
    # Checked to fail with decode's index running upwards (the schedule walked in the wrong direction).
    model = StandIn()
    sampler = dg.DDIMSampler(model, seed=0)
    sampler.make_schedule(ddim_num_steps=20, ddim_eta=0.0, verbose=False)
    x0 = torch.randn(B, *SHAPE, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(B, *SHAPE, generator=torch.Generator().manual_seed(1))
    t_enc = 12
    z = sampler.stochastic_encode(x0, torch.tensor([t_enc] * B), noise=noise)
    a = model.alphas_cumprod.double()[sampler.ddim_timesteps[t_enc]]
    assert_close(z.double(), a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double(), kind="f32_formula")
    steps = []
    out = sampler.decode(z, None, t_enc, callback=steps.append)
    assert steps == list(range(t_enc))
    assert_close(out.double(), _upstream_decode(model, z, sampler, t_enc), kind="f32_loop")


def test_inpainting_resets_the_known_region_before_every_step():
    # mask = 1 where x0 is known: upstream sets x = q_sample(x0, t) * mask + (1 - mask) * x before each step.
    # With mask = 0 nothing changes; with mask = 1 the sample follows x0's noised trajectory.
    model = StandIn()
    x_T = torch.randn(B, *SHAPE, generator=torch.Generator().manual_seed(2))
    x0 = torch.randn(B, *SHAPE, generator=torch.Generator().manual_seed(3))
    sampler = dg.DDIMSampler(model, seed=1)
    plain, _ = sampler.sample(S=10, batch_size=B, shape=SHAPE, x_T=x_T, progress=False)
    none, _ = sampler.sample(S=10, batch_size=B, shape=SHAPE, x_T=x_T, mask=torch.zeros(1, *SHAPE), x0=x0,
                             progress=False)  # fmt: skip
    torch.testing.assert_close(none, plain)
    model.q_calls.clear()
    known, _ = sampler.sample(S=10, batch_size=B, shape=SHAPE, x_T=x_T, mask=torch.ones(1, *SHAPE), x0=x0,
                              progress=False)  # fmt: skip
    assert model.q_calls == list(np.flip(sampler.ddim_timesteps))
    assert not torch.allclose(known, plain)
    with pytest.raises(ValueError, match="mask and x0 go together"):
        sampler.sample(S=10, batch_size=B, shape=SHAPE, mask=torch.ones(1, *SHAPE), progress=False)


@pytest.mark.parametrize(("temperature", "dropout"), [(0.0, 0.0), (1.0, 1.0)])
def test_temperature_and_noise_dropout_remove_the_noise(temperature, dropout):
    # Temperature 0 (or dropout of every element) leaves only the mean: two seeds give the same samples at
    # eta 1, where the default noise makes them differ. Checked to fail with the options ignored.
    x_T = torch.randn(B, *SHAPE, generator=torch.Generator().manual_seed(4))

    def run(seed, **kw):
        return dg.DDIMSampler(StandIn(), seed=seed).sample(S=8, batch_size=B, shape=SHAPE, eta=1.0, x_T=x_T,
                                                           progress=False, **kw)[0]  # fmt: skip

    assert not torch.allclose(run(1), run(2))
    kw = dict(temperature=temperature, noise_dropout=dropout)
    torch.testing.assert_close(run(1, **kw), run(2, **kw))


def test_score_corrector_sees_the_guided_eps():
    calls = []

    class Corrector:
        def modify_score(self, model, e_t, x, t, c, **kwargs):
            calls.append((e_t.shape[0], kwargs))
            return torch.zeros_like(e_t)  # eps = 0: x0_hat = x / sqrt(abar_t)

    model = StandIn()
    x_T = torch.randn(B, *SHAPE, generator=torch.Generator().manual_seed(5))
    c, uc = torch.ones(B, 1), torch.zeros(B, 1)
    out, _ = dg.DDIMSampler(model).sample(S=5, batch_size=B, shape=SHAPE, x_T=x_T, conditioning=c,
                                          unconditional_conditioning=uc, unconditional_guidance_scale=3.0,
                                          score_corrector=Corrector(), corrector_kwargs={"k": 1},
                                          progress=False)  # fmt: skip
    assert len(calls) == 5 and all(n == B and kw == {"k": 1} for n, kw in calls)  # guided: [B], not [2B]
    # with eps = 0 at every step, DDIM at eta 0 maps x_t to sqrt(abar_prev / abar_t) x_t: the end is x_T scaled
    sampler = dg.DDIMSampler(model)
    sampler.make_schedule(5)
    ratio = (model.alphas_cumprod.double()[0] / model.alphas_cumprod.double()[sampler.ddim_timesteps[-1]]).sqrt()
    assert_close(out.double(), ratio * x_T.double(), kind="f32")


def test_ucg_schedule_is_a_guidance_scale_per_step():
    model = StandIn()
    x_T = torch.randn(B, *SHAPE, generator=torch.Generator().manual_seed(6))
    c, uc = torch.ones(B, 1), torch.zeros(B, 1)
    sampler = dg.DDIMSampler(model)
    common = dict(S=7, batch_size=B, shape=SHAPE, x_T=x_T, conditioning=c, unconditional_conditioning=uc,
                  progress=False)  # fmt: skip
    fixed, _ = sampler.sample(unconditional_guidance_scale=2.5, **common)
    scheduled, _ = sampler.sample(ucg_schedule=[2.5] * 8, **common)
    torch.testing.assert_close(scheduled, fixed)
    with pytest.raises(ValueError, match="ucg_schedule must hold one guidance scale per step run"):
        sampler.sample(ucg_schedule=[2.5] * 7, **common)


def test_dynamic_threshold_is_stable_diffusions_norm_thresholding():
    # x0_hat scaled per sample to rms <= value, eps kept (upstream's p_sample_ddim with dynamic_threshold).
    # Checked to fail with the eps re-derived from the thresholded x0 (the shift by a_t (x0_thr - x0) dropped).
    model = StandIn()
    sampler = dg.DDIMSampler(model)
    x_T = 3 * torch.randn(B, *SHAPE, generator=torch.Generator().manual_seed(7))
    out, _ = sampler.sample(S=6, batch_size=B, shape=SHAPE, x_T=x_T, dynamic_threshold=0.5, progress=False)
    ts = sampler.ddim_timesteps
    abar = model.alphas_cumprod.double()
    alphas, prev = abar[ts], torch.cat([abar[:1], abar[ts[:-1]]])
    x = x_T.double()
    for index in range(len(ts) - 1, -1, -1):
        e = model.apply_model(x.float(), torch.full((B,), int(ts[index])), None).double()
        pred_x0 = (x - (1 - alphas[index]).sqrt() * e) / alphas[index].sqrt()
        rms = pred_x0.pow(2).flatten(1).mean(1).sqrt().clamp(min=0.5).reshape(-1, 1, 1, 1)
        pred_x0 = pred_x0 * (0.5 / rms)
        x = prev[index].sqrt() * pred_x0 + (1 - prev[index]).sqrt() * e
    assert_close(out.double(), x, kind="f32_loop")


def test_partial_timesteps_run_upstreams_subset():
    # timesteps=5 on a 10-step schedule runs the first int(5 / 10 * 10) - 1 = 4 positions, from x_T.
    model = StandIn()
    sampler = dg.DDIMSampler(model)
    x_T = torch.randn(B, *SHAPE, generator=torch.Generator().manual_seed(8))
    seen = []
    out, _ = sampler.sample(S=10, batch_size=B, shape=SHAPE, x_T=x_T, timesteps=5, callback=seen.append,
                            progress=False)  # fmt: skip
    assert seen == [0, 1, 2, 3]
    assert_close(out.double(), _upstream_decode(model, x_T, sampler, 4), kind="f32_loop")


def test_unsupported_arguments_say_so():
    sampler = dg.DDIMSampler(StandIn())
    with pytest.raises(NotImplementedError, match="quantize_x0"):
        sampler.sample(S=5, batch_size=1, shape=SHAPE, quantize_x0=True, progress=False)
    sampler.sample(S=5, batch_size=1, shape=SHAPE, normals_sequence=None, progress=False)  # accepted, unused


def test_original_steps_walk_every_train_timestep():
    # decode(use_original_steps=True) steps t_start - 1 .. 0 on the train schedule (index = the timestep,
    # previous abar = alphas_cumprod[t - 1]), as upstream; checked against its formulas at eta 0.
    model = StandIn()
    sampler = dg.DDIMSampler(model)
    sampler.make_schedule(ddim_num_steps=10, ddim_eta=0.0, verbose=False)
    x = torch.randn(B, *SHAPE, generator=torch.Generator().manual_seed(9))
    out = sampler.decode(x, None, 25, use_original_steps=True)
    abar = model.alphas_cumprod.double()
    y = x.double()
    for t in range(24, -1, -1):
        e = model.apply_model(y.float(), torch.full((B,), t), None).double()
        a_t, a_prev = abar[t], (abar[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64))
        y = a_prev.sqrt() * (y - (1 - a_t).sqrt() * e) / a_t.sqrt() + (1 - a_prev).sqrt() * e
    assert_close(out.double(), y, kind="f32_loop")
    seen = []
    sampler.ddim_sampling(None, (B, *SHAPE), x_T=x, ddim_use_original_steps=True, timesteps=12, callback=seen.append)
    assert seen == list(range(12))
