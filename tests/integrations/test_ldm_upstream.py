"""DDIMSampler against latent-diffusion / Stable Diffusion's DDIM update written here from its formulas:
the "quad" schedule, v-prediction (Stability-AI), dict conditioning with guidance, and the GMM options
(final_step, scale_per_dim, 64-bit seeds) with their checks before any model call.

Upstream's update at schedule index j (abar_t = alphas_cumprod[t_j], abar_prev = alphas_cumprod[t_{j-1}] or
alphas_cumprod[0] for j = 0, sigma = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev))):
    eps parameterisation: e = m,                                x0 = (x - sqrt(1 - abar_t) e) / sqrt(abar_t)
    v parameterisation:   e = sqrt(abar_t) m + sqrt(1 - abar_t) x, x0 = sqrt(abar_t) x - sqrt(1 - abar_t) m
    x0 parameterisation:  x0 = m, e = (x - sqrt(abar_t) x0) / sqrt(1 - abar_t)  (LatentDiffusion's "x0"; CompVis's
                          DDIM reads every output as eps, which is wrong for such a model)
    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) e + sigma z
with guidance m = m_u + w (m_c - m_u), the model called once on [uncond, cond] stacked along the batch.
"""

import math

import numpy as np
import pytest
import torch

import ddim_gmm_ext as dg
from ddim_gmm_ext.integrations.ldm import ddim_timesteps
from tests.helpers import assert_close

SHAPE = (2, 4, 4)
BATCH = 3
T = 1000


class HybridStandIn(torch.nn.Module):
    """A latent-diffusion model's interface to the sampler (alphas_cumprod, parameterization, apply_model) with
    a fixed function of (x, t, c) as its forward. c is None, a tensor [B, 3], or a hybrid model's dict
    {"c_concat": [tensor [B, 1, H, W]], "c_crossattn": [tensor [B, 3]]}."""

    def __init__(self, parameterization="eps", num_timesteps=T):
        super().__init__()
        self.parameterization = parameterization
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, num_timesteps, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())
        self.calls = []

    def apply_model(self, x, t, c):
        self.calls.append((int(t[0]), x.shape[0], c))
        out = torch.tanh(x) * (1 + t[:, None, None, None] / T)
        if isinstance(c, dict):
            out = out + c["c_concat"][0] * 0.5 + c["c_crossattn"][0][:, :1, None, None]
        elif c is not None:
            out = out + c[:, :1, None, None]
        return out


def _select(c, rows):
    """Conditioning of the samples in ``rows`` (tensors, dicts of lists of tensors)."""
    if isinstance(c, dict):
        return {k: [v[rows] for v in vs] for k, vs in c.items()}
    return None if c is None else c[rows]


def _upstream_loop(model, x_T, ts, eta, seed, cond=None, uncond=None, w=1.0):
    """Upstream's loop over the increasing timesteps ``ts`` (repeats kept, as upstream runs them) from the
    formulas in the module docstring, in float64 with float32 model calls; step i's noise is the Philox noise
    of (seed, sample, i), the sampler's documented stream. Guidance calls the model on the two halves apart
    (the stand-in is per-sample, so this equals upstream's stacked call)."""
    abar = model.alphas_cumprod.double()
    alphas = abar[list(ts)]
    alphas_prev = torch.cat([abar[:1], alphas[:-1]])
    sigmas = eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()
    x = x_T.double()
    for i, t in enumerate(reversed(list(ts))):
        j = len(ts) - 1 - i
        tb = torch.full((x.shape[0],), int(t))
        m = model.apply_model(x.float(), tb, cond).double()
        if uncond is not None:
            m_u = model.apply_model(x.float(), tb, uncond).double()
            m = m_u + w * (m - m_u)
        a, a_prev, sigma = alphas[j], alphas_prev[j], sigmas[j]
        if model.parameterization == "v":
            e, x0 = a.sqrt() * m + (1 - a).sqrt() * x, a.sqrt() * x - (1 - a).sqrt() * m
        elif model.parameterization == "x0":
            e, x0 = (x - a.sqrt() * m) / (1 - a).sqrt(), m
        else:
            e, x0 = m, (x - (1 - a).sqrt() * m) / a.sqrt()
        z = dg.reference.gaussian_noise(x.shape, seed, 0, i, torch.float64)
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * e + sigma * z
    return x


def _run(model, S, eta, seed=5, discretize="uniform", **kwargs):
    x_T = torch.randn(BATCH, *SHAPE, generator=torch.Generator().manual_seed(S))
    sampler = dg.DDIMSampler(model, seed=seed)
    samples, _ = sampler.sample(
        S=S, batch_size=BATCH, shape=SHAPE, eta=eta, x_T=x_T, ddim_discretize=discretize, progress=False, **kwargs
    )
    return samples, x_T, sampler


# ---- "quad" schedule -----------------------------------------------------------------------------------


def _upstream_quad(S: int, T: int = T) -> list[int]:
    """Upstream's "quad" timesteps with repeats: 1 + floor(u_k^2), u_k = k sqrt(0.8 T) / (S - 1) evenly spaced
    from 0 to sqrt(0.8 T) inclusive (the last point exactly sqrt(0.8 T))."""
    stop = math.sqrt(0.8 * T)
    if S == 1:
        return [1]
    return [1 + int((k * (stop / (S - 1))) ** 2 if k < S - 1 else stop**2) for k in range(S)]


def test_quad_schedule_for_every_step_count():
    # Repeats (every S >= 30 on T = 1000) are identity steps upstream (abar_prev = abar_t, sigma = 0); the
    # sampler runs each distinct timestep once. Checked to fail with the quad rule using sqrt(T) for sqrt(0.8 T).
    for S in range(1, 1001):
        assert ddim_timesteps("quad", S, T).tolist() == sorted(set(_upstream_quad(S))), S
    assert ddim_timesteps("quad", 20, T).tolist() == _upstream_quad(20)  # no repeats: exactly upstream's S


@pytest.mark.parametrize(("S", "eta"), [(20, 0.0), (20, 1.0), (50, 0.0), (200, 0.0)])
def test_quad_whole_loop_equals_upstream(S, eta):
    # S = 50 and 200 have repeated timesteps that upstream runs as identity steps: skipping them gives the same
    # sample. Checked to fail when the sampler's loop runs the coefficients in increasing instead of decreasing
    # time (the schedule index j = n - 1 - i replaced by i).
    model = HybridStandIn()
    samples, x_T, _ = _run(model, S, eta, discretize="quad")
    assert len(model.calls) == len(set(_upstream_quad(S)))
    expected = _upstream_loop(model, x_T, _upstream_quad(S), eta, seed=5)
    assert_close(samples.double(), expected, kind="f32_vs_f64_loop")


# ---- v-prediction and dict conditioning ------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize(("parameterization", "S"), [("v", 7), ("v", 50), ("x0", 30)])
def test_v_and_x0_parameterizations_whole_loop_equal_upstream(parameterization, S, eta):
    # Checked to fail when the v (or x0) parameterisation is read as eps (prediction_type "epsilon").
    model = HybridStandIn(parameterization)
    cond, uncond = torch.randn(BATCH, 3), torch.zeros(BATCH, 3)
    samples, x_T, sampler = _run(
        model, S, eta, conditioning=cond, unconditional_conditioning=uncond, unconditional_guidance_scale=4.0
    )
    ts = sampler.ddim_timesteps.tolist()
    assert [n for _, n, _ in model.calls] == [2 * BATCH] * len(ts)
    expected = _upstream_loop(model, x_T, ts, eta, seed=5, cond=cond, uncond=uncond, w=4.0)
    assert_close(samples.double(), expected, kind="f32_vs_f64_loop")


def test_dict_conditioning_with_guidance_equals_upstream():
    # Checked to fail when the stacked conditioning puts the conditional half first (the guidance then
    # extrapolates away from the condition).
    model = HybridStandIn()
    g = torch.Generator().manual_seed(3)
    cond = {"c_concat": [torch.randn(BATCH, 1, 4, 4, generator=g)], "c_crossattn": [torch.randn(BATCH, 3, generator=g)]}
    uncond = {"c_concat": [cond["c_concat"][0]], "c_crossattn": [torch.zeros(BATCH, 3)]}
    samples, x_T, sampler = _run(
        model, 30, 1.0, conditioning=cond, unconditional_conditioning=uncond, unconditional_guidance_scale=7.5
    )
    ts = sampler.ddim_timesteps.tolist()
    assert len(ts) == 31 and len(model.calls) == 31  # 1000 // 30 = 33: 31 timesteps, as upstream
    _, n, c_in = model.calls[0]
    assert n == 2 * BATCH and set(c_in) == {"c_concat", "c_crossattn"}
    for k in c_in:  # upstream's layout: each list element is [uncond; cond] along the batch
        assert len(c_in[k]) == 1 and torch.equal(c_in[k][0], torch.cat([uncond[k][0], cond[k][0]]))
    model.calls.clear()
    expected = _upstream_loop(model, x_T, ts, 1.0, seed=5, cond=cond, uncond=uncond, w=7.5)
    assert_close(samples.double(), expected, kind="f32_vs_f64_loop")


# ---- step counts at the edges -----------------------------------------------------------------------------


@pytest.mark.parametrize(("S", "num_timesteps"), [(1, T), (10, 10), (3, 10), (7, 10)])
def test_edge_step_counts_equal_upstream(S, num_timesteps):
    # S = 1 is one step from timestep 1 to alphas_cumprod[0] (checked to fail before the one-step schedule was
    # stacked as a table: a TypeError); S = T on a 10-step model runs 1..9 (upstream would index timestep 10).
    model = HybridStandIn(num_timesteps=num_timesteps)
    samples, x_T, sampler = _run(model, S, 1.0)
    ts = sampler.ddim_timesteps.tolist()
    c = num_timesteps // S
    assert ts == sorted({min(1 + k, num_timesteps - 1) for k in range(0, num_timesteps, c)})
    assert_close(samples.double(), _upstream_loop(model, x_T, ts, 1.0, seed=5), kind="f32_vs_f64_loop")


# ---- GMM options -------------------------------------------------------------------------------------------


def _reference_gmm_loop(model, x_T, ts, eta, seed, gmm, gaussian_last):
    """The DDIM-GMM loop from the package's pure-torch reference step: parameter set i at step i, and (with
    ``gaussian_last``) no mixture on the last step, the paper's Gaussian final step."""
    abar = model.alphas_cumprod.double()
    alphas = abar[list(ts)]
    alphas_prev = torch.cat([abar[:1], alphas[:-1]])
    x = x_T
    n = len(ts)
    for i, t in enumerate(reversed(list(ts))):
        j = n - 1 - i
        m = model.apply_model(x, torch.full((x.shape[0],), int(t)), None)
        use = None if gaussian_last and i == n - 1 else gmm
        x = dg.reference.ddim_step(m, x, alphas[j], alphas_prev[j], eta=eta, gmm=use, step_index=i, seed=seed)
        x = x.prev_sample
    return x


@pytest.mark.parametrize("variant", ["ortho", "ortho-lr", "rand"])
@pytest.mark.parametrize("final_step", ["gaussian", "gmm"])
def test_final_step_equals_reference_loop(final_step, variant):
    # Checked to fail (the "gaussian" case) when the sampler passes the GMM on every step, and (the "gmm" case)
    # when it never passes it on the last.
    model = HybridStandIn()
    S, D = 30, math.prod(SHAPE)
    gmm = dg.GMM.create(D, n_components=3, n_steps=31, variant=variant, scale=3.0, seed=1)
    x_T = torch.randn(BATCH, *SHAPE, generator=torch.Generator().manual_seed(0))
    sampler = dg.DDIMSampler(model, gmm=gmm, seed=7, final_step=final_step)
    samples, _ = sampler.sample(S=S, batch_size=BATCH, shape=SHAPE, eta=1.0, x_T=x_T, progress=False)
    ts = sampler.ddim_timesteps.tolist()
    both = [_reference_gmm_loop(model, x_T, ts, 1.0, 7, gmm, gaussian_last=g) for g in (True, False)]
    expected, other = both if final_step == "gaussian" else both[::-1]
    assert_close(samples, expected, kind="f32_loop_upstream")
    assert (samples - other).abs().max() > 1e-3  # the last step's offsets are visible at this scale


def test_scale_per_dim_is_the_paper_scale_over_sqrt_dim():
    # Checked to fail when the sampler does not pass scale_per_dim on (the tables then use s = 1).
    model = HybridStandIn()
    D = math.prod(SHAPE)
    x_T = torch.randn(BATCH, *SHAPE, generator=torch.Generator().manual_seed(0))
    run = {}
    for name, kw in {"per_dim": {"scale_per_dim": 0.5}, "paper": {"scale": 0.5 * math.sqrt(D)}, "default": {}}.items():
        sampler = dg.DDIMSampler(model, gmm="ortho", n_components=2, seed=3, **kw)
        run[name] = sampler.sample(S=10, batch_size=BATCH, shape=SHAPE, eta=1.0, x_T=x_T, progress=False)[0]
    assert_close(run["per_dim"], run["paper"], kind="f32")
    assert (run["per_dim"] - run["default"]).abs().max() > 1e-3


@pytest.mark.parametrize("seed", [2**63 - 1, 2**63, 2**64 - 1])
def test_seeds_over_the_full_unsigned_range(seed):
    # The noise is the Philox stream keyed by the 64-bit seed: checked to fail when the seed is folded into
    # [0, 2**63) (seed % 2**63) before it reaches the op.
    model = HybridStandIn()
    samples, x_T, sampler = _run(model, 7, 1.0, seed=seed)
    expected = _upstream_loop(model, x_T, sampler.ddim_timesteps.tolist(), 1.0, seed=seed)
    assert_close(samples.double(), expected, kind="f32_vs_f64_loop")


# ---- bad input: refused before any model call, naming the argument ------------------------------------------


@pytest.mark.parametrize("w", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_guidance_scale_refused_before_sampling(w):
    model = HybridStandIn()
    with pytest.raises(ValueError, match="unconditional_guidance_scale must be a finite number"):
        dg.DDIMSampler(model).sample(
            S=5,
            batch_size=1,
            shape=SHAPE,
            conditioning=torch.zeros(1, 3),
            unconditional_conditioning=torch.zeros(1, 3),
            unconditional_guidance_scale=w,
            progress=False,
        )
    assert model.calls == []


def test_gmm_options_refused_before_sampling():
    model = HybridStandIn()
    with pytest.raises(ValueError, match="final_step must be one of"):
        dg.DDIMSampler(model, gmm="ortho-vub", final_step="last")
    with pytest.raises(ValueError, match="pass scale or scale_per_dim, not both"):
        dg.DDIMSampler(model, gmm="ortho-vub", scale=2.0, scale_per_dim=0.1)
    with pytest.raises(ValueError, match=r"seed must be None or an int in \[0, 2\*\*64\)"):
        dg.DDIMSampler(model, gmm="ortho-vub", seed=2**64)
    for kw, message in [({"scale_per_dim": -1.0}, "scale_per_dim must be"), ({"scale": math.nan}, "scale must be")]:
        with pytest.raises(ValueError, match=message):
            dg.DDIMSampler(model, gmm="ortho", **kw).sample(S=5, batch_size=1, shape=SHAPE, progress=False)
    assert model.calls == []
    assert np.issubdtype(ddim_timesteps("quad", 5, T).dtype, np.integer)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"batch_size": 0}, ValueError, "batch_size must be an int >= 1"),
        ({"batch_size": 1.5}, ValueError, "batch_size must be an int >= 1"),
        ({"shape": (2, -4)}, ValueError, "shape must be a tuple of ints >= 1"),
        ({"shape": 32}, ValueError, "shape must be a tuple of ints >= 1"),
        ({"x_T": torch.zeros(1, *SHAPE, dtype=torch.long)}, TypeError, "x_T must be a floating-point tensor"),
        ({"x_T": torch.zeros(2, *SHAPE)}, ValueError, "x_T must have shape"),
        ({"x_T": torch.full((1, *SHAPE), math.nan)}, ValueError, "x_T has non-finite values"),
        ({"eta": 2.0}, ValueError, "^eta must be a number in"),  # upstream's name, not ddim_eta
        ({"sample_offset": -1}, ValueError, "sample_offset must be in"),
        (
            {"sample_offset": 2**32 - 1, "batch_size": 2},
            ValueError,
            "sample_offset \\+ batch_size must be <= 2\\*\\*32",
        ),
    ],
)
def test_bad_request_refused_before_any_model_call(kwargs, error, message):
    # Checked to fail with the checks removed: IndexError / RuntimeError from torch for the sizes, a NaN
    # sample for the NaN x_T, and the step's own errors after the first model call for x_T's dtype and offsets.
    model = HybridStandIn()
    request = {"S": 5, "batch_size": 1, "shape": SHAPE, "progress": False} | kwargs
    with pytest.raises(error, match=message):
        dg.DDIMSampler(model).sample(**request)
    assert model.calls == []


def test_gmm_tables_sized_to_the_steps_run():
    # S = 30 runs 31 steps: the tables built per call hold 31 parameter sets, set i at step i (final_step "gmm"
    # uses the last one). Checked to fail when the sampler sizes the tables for the requested S (step 30 then
    # has no parameter set).
    model = HybridStandIn()
    D = math.prod(SHAPE)
    x_T = torch.randn(BATCH, *SHAPE, generator=torch.Generator().manual_seed(0))
    built = dg.DDIMSampler(model, gmm="ortho", n_components=3, scale=2.0, seed=11, final_step="gmm")
    samples, _ = built.sample(S=30, batch_size=BATCH, shape=SHAPE, eta=1.0, x_T=x_T, progress=False)
    gmm = dg.GMM.create(D, n_components=3, n_steps=31, variant="ortho", scale=2.0, uniform_priors=True, seed=11)
    given = dg.DDIMSampler(model, gmm=gmm, seed=11, final_step="gmm")
    expected, _ = given.sample(S=30, batch_size=BATCH, shape=SHAPE, eta=1.0, x_T=x_T, progress=False)
    assert_close(samples, expected, kind="f32_tables")
    short = dg.GMM.create(D, n_components=3, n_steps=30, variant="ortho", seed=11)
    with pytest.raises(ValueError, match="parameter sets for 30 steps but sampling takes 31: build it with n_steps=31"):
        dg.DDIMSampler(model, gmm=short).sample(S=30, batch_size=1, shape=SHAPE, progress=False)


def test_built_tables_are_reused_across_calls(monkeypatch):
    # Checked to fail (3 builds instead of 2) when every sample() call rebuilds its tables, and (1 build) when
    # the reuse key leaves out the options.
    model = HybridStandIn()
    builds = []
    create = dg.GMM.create
    monkeypatch.setattr(dg.GMM, "create", staticmethod(lambda *a, **k: builds.append(a) or create(*a, **k)))
    sampler = dg.DDIMSampler(model, gmm="ortho", n_components=2, seed=4, final_step="gmm")
    x_T = torch.randn(BATCH, *SHAPE, generator=torch.Generator().manual_seed(0))
    first = sampler.sample(S=10, batch_size=BATCH, shape=SHAPE, eta=1.0, x_T=x_T, progress=False)[0]
    again = sampler.sample(S=10, batch_size=1, shape=SHAPE, eta=1.0, x_T=x_T[:1], progress=False)[0]
    assert_close(again, first[:1], kind="exact")  # same tables, same per-sample noise stream
    sampler.scale = 3.0  # a changed option builds new tables
    changed = sampler.sample(S=10, batch_size=BATCH, shape=SHAPE, eta=1.0, x_T=x_T, progress=False)[0]
    assert len(builds) == 2 and (changed - first).abs().max() > 1e-3
