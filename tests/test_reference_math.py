"""Oracles (properties that hold by the mathematics, not by agreement with our own code) on the reference and
the public API: moment matching, the eq. 8 constraint, VUB tables, the RFIM marginal, noise schedules, thin
SVD, and the random stream."""

import math

import pytest
import torch

import ddim_gmm_ext as dg
from ddim_gmm_ext import reference as ref
from tests.helpers import MC_SIGMAS

STEP_FNS = {"api": dg.ddim_step, "reference": ref.ddim_step}
N_MC = 200_000  # Monte Carlo samples: the standard error of a variance estimate is sqrt(2 / N) = 0.32 %
D = 12


def mc_bounds(n=N_MC, z=MC_SIGMAS):
    """|mean error| / std and relative variance error allowed at z standard errors."""
    return z / math.sqrt(n), z * math.sqrt(2.0 / n)


def matched_gmm(variant, c2, n_steps=1, uniform_priors=True, n_components=4, seed=3):
    """A GMM whose largest variance offset is 80 % of c^2: the offsets carry most of the noise, so a wrong
    variance table shows, and nothing is clipped."""
    kwargs = dict(
        n_components=n_components,
        n_steps=n_steps,
        variant=variant,
        uniform_priors=uniform_priors,
        seed=seed,
        dtype=torch.float64,
    )
    unit = dg.GMM.create(D, scale=1.0, **kwargs)
    return dg.GMM.create(D, scale=math.sqrt(0.8 * float(c2) / float(unit.var_offsets.max())), **kwargs)


def exact_start(alpha_prod_t, n=N_MC, seed=1):
    x0 = torch.linspace(-1, 1, D, dtype=torch.float64)
    eps = torch.randn(n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return x0, math.sqrt(alpha_prod_t) * x0 + math.sqrt(1 - alpha_prod_t) * eps, eps


@pytest.mark.parametrize("step_fn", STEP_FNS.values(), ids=STEP_FNS.keys())
@pytest.mark.parametrize("variant", ["rand", "ortho"])
@pytest.mark.parametrize("uniform_priors", [True, False])
def test_one_step_moment_matching(step_fn, variant, uniform_priors):
    """m = eps exactly; c^2 >= max v_k: E[x_s] = a_s x0 and Var[x_s[d]] = b_s^2 for every coordinate."""
    abar_t, abar_s = 0.3, 0.6
    gmm = matched_gmm(variant, ref.ddim_coefficients(abar_t, abar_s, 1.0)[4] ** 2, uniform_priors=uniform_priors)
    x0, x_t, eps = exact_start(abar_t)
    x_s = step_fn(eps, x_t, abar_t, abar_s, eta=1.0, gmm=gmm, seed=7).prev_sample
    mean_tol, var_tol = mc_bounds()
    b_s = math.sqrt(1 - abar_s)
    assert ((x_s.mean(0) - math.sqrt(abar_s) * x0).abs() <= mean_tol * b_s).all()
    assert ((x_s.var(0) / b_s**2 - 1).abs() <= var_tol).all()


def test_moment_matching_detects_a_broken_variance_table():
    """The oracle above fails when v_k is off: with v_k = 0 the variance exceeds b_s^2 by sum_k pi_k delta_k^2."""
    gmm = matched_gmm("ortho", ref.ddim_coefficients(0.3, 0.6, 1.0)[4] ** 2)
    broken = dg.GMM.from_params(gmm.priors, gmm.offsets, torch.zeros_like(gmm.var_offsets))
    x0, x_t, eps = exact_start(0.3)
    x_s = dg.ddim_step(eps, x_t, 0.3, 0.6, eta=1.0, gmm=broken, seed=7).prev_sample
    assert ((x_s.var(0) / 0.4 - 1).abs() > mc_bounds()[1]).any()


@pytest.mark.parametrize("variant", ["rand", "ortho"])
def test_chain_keeps_marginal_moments(variant):
    """Paper A.1 by induction: three GMM steps with the exact denoiser of a point mass x0 (prediction_type
    "sample", m = x0) keep E[x_s] = a_s x0, Var[x_s[d]] = b_s^2 after every step."""
    abars = [0.05, 0.2, 0.45, 0.7]
    c2 = min(ref.ddim_coefficients(t, s, 0.8)[4] ** 2 for t, s in zip(abars[:-1], abars[1:], strict=False))
    gmm = matched_gmm(variant, c2, n_steps=3, n_components=3, seed=11)
    x0, x, _ = exact_start(abars[0], n=100_000)
    mean_tol, var_tol = mc_bounds(100_000)
    for i, (abar_t, abar_s) in enumerate(zip(abars[:-1], abars[1:], strict=False)):
        x = dg.ddim_step(
            x0.expand_as(x), x, abar_t, abar_s, eta=0.8, gmm=gmm, step_index=i, seed=5, prediction_type="sample"
        ).prev_sample
        b_s = math.sqrt(1 - abar_s)
        assert ((x.mean(0) - math.sqrt(abar_s) * x0).abs() <= mean_tol * b_s).all(), i
        assert ((x.var(0) / b_s**2 - 1).abs() <= var_tol).all(), i


@pytest.mark.parametrize("variant", ["rand", "ortho", "ortho-vub", "ortho-vub*"])
@pytest.mark.parametrize("uniform_priors", [True, False])
def test_offsets_satisfy_eq8_exactly(variant, uniform_priors):
    gmm = dg.GMM.create(
        50,
        n_components=6,
        n_steps=4,
        scale=2.0,
        variant=variant,
        uniform_priors=uniform_priors,
        seed=2,
        dtype=torch.float64,
    )
    assert gmm.offsets.shape == ((1 if variant.endswith("*") else 4), 6, 50)
    torch.testing.assert_close(gmm.priors.sum(-1), torch.ones(gmm.priors.shape[0], dtype=torch.float64))
    assert (gmm.priors > 0).all()
    weighted = (gmm.priors[:, :, None] * gmm.offsets).sum(1)
    assert weighted.abs().max() < 1e-13


def test_rand_offsets_have_norm_close_to_scale():
    gmm = dg.GMM.create(4096, n_components=8, n_steps=2, scale=3.0, variant="rand", dtype=torch.float64)
    norms = gmm.offsets.norm(dim=-1)
    # re-centring after normalising moves each norm by A(s / sqrt(D))
    assert ((norms - 3.0).abs() < 3.0 * 4 / math.sqrt(4096)).all()


def test_ortho_offsets_are_centred_orthonormal_directions():
    gmm = dg.GMM.create(40, n_components=5, n_steps=3, scale=2.0, variant="ortho", dtype=torch.float64)
    U = ref.thin_svd(ref.offset_directions(3, 40, 5, seed=0))
    C = U - U.mean(-1, keepdim=True)
    torch.testing.assert_close(gmm.offsets, 2.0 * C.transpose(1, 2))


@pytest.mark.parametrize("uniform_priors", [True, False])
def test_diagonal_var_offsets_match_eq11(uniform_priors):
    gmm = dg.GMM.create(
        30, n_components=4, n_steps=2, scale=1.5, variant="rand", uniform_priors=uniform_priors, dtype=torch.float64
    )
    pi, delta = gmm.priors, gmm.offsets
    for s in range(2):
        for k in range(4):
            full = sum(pi[s, j] * torch.outer(delta[s, j], delta[s, j]) for j in range(4)) / (4 * pi[s, k])
            torch.testing.assert_close(gmm.var_offsets[s, k], full.diagonal())


def test_vub_tables():
    gmm = dg.GMM.create(64, n_components=8, n_steps=3, scale=2.0, variant="ortho-vub", dtype=torch.float64)
    assert gmm.var_offsets.shape == (3, 8, 8)
    torch.testing.assert_close(gmm.var_offsets, torch.full((3, 8, 8), 4.0 / 8, dtype=torch.float64))
    gmm = dg.GMM.create(
        64, n_components=5, n_steps=2, scale=2.0, variant="ortho-vub", uniform_priors=False, dtype=torch.float64
    )
    pi = gmm.priors
    for s in range(2):
        ascending = sorted(pi[s].tolist())
        for k in range(5):
            expected = torch.tensor([4.0 * p / (5 * pi[s, k]) for p in ascending], dtype=torch.float64)
            torch.testing.assert_close(gmm.var_offsets[s, k], expected)


def test_vub_bounds_eigenvalues_of_delta_k():
    """The VUB table bounds the eigenvalues of Delta_k = (1 / (K pi_k)) sum_l pi_l delta_l delta_l^T (eq. 34)."""
    gmm = dg.GMM.create(
        20, n_components=4, n_steps=1, scale=1.3, variant="ortho-vub", uniform_priors=False, seed=4, dtype=torch.float64
    )
    pi, delta, v = gmm.priors[0], gmm.offsets[0], gmm.var_offsets[0]
    for k in range(4):
        Delta = sum(pi[j] * torch.outer(delta[j], delta[j]) for j in range(4)) / (4 * pi[k])
        eig = torch.linalg.eigvalsh(Delta)[-4:]
        assert (eig <= v[k] + 1e-12).all()


def test_initialize_names_map_to_variants():
    args = dict(dim=32, n_components=4, n_steps=2, seed=1)
    assert dg.GMM().initialize(**args, orthonormal=False).variant == "rand"
    assert dg.GMM().initialize(**args, orthonormal=True).variant == "ortho"
    vub = dg.GMM().initialize(**args, orthonormal=True, upper_bound_vars=True)
    assert vub.variant == "ortho-vub"
    created = dg.GMM.create(**args, variant="ortho-vub")
    for a, b in ((vub.priors, created.priors), (vub.offsets, created.offsets), (vub.var_offsets, created.var_offsets)):
        assert torch.equal(a, b)
    shared = dg.GMM.create(**args, variant="ortho-vub*")
    assert shared.shared and shared.offsets.shape[0] == 1
    assert shared.set_index(0) == shared.set_index(1) == 0


# --- rectified flow -----------------------------------------------------------------------------------


@pytest.mark.parametrize("step_fn", [dg.rfim_step, ref.rfim_step], ids=["api", "reference"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_rfim_marginal(step_fn, eta):
    """x_t = (1 - t) x0 + t eps, m = v = eps - x0: E[x_s] = (1 - s) x0 and Var[x_s] = s^2 (paper eq. 18)."""
    t, s = 0.8, 0.45
    x0 = torch.linspace(-1, 1, D, dtype=torch.float64)
    eps = torch.randn(N_MC, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x_t = (1 - t) * x0 + t * eps
    x_s = step_fn(eps - x0, x_t, t, s, eta=eta, seed=9).prev_sample
    mean_tol, var_tol = mc_bounds()
    assert ((x_s.mean(0) - (1 - s) * x0).abs() <= mean_tol * s).all()
    assert ((x_s.var(0) / s**2 - 1).abs() <= var_tol).all()


def test_rfim_eta0_is_an_euler_step():
    x = torch.randn(3, 7, dtype=torch.float64)
    v = torch.randn(3, 7, dtype=torch.float64)
    out = dg.rfim_step(v, x, 0.7, 0.4, eta=0.0).prev_sample
    torch.testing.assert_close(out, x + (0.4 - 0.7) * v)


def test_rf_times():
    torch.testing.assert_close(ref.rf_times(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    shifted = ref.rf_times(4, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and (shifted[1:-1] > ref.rf_times(4)[1:-1]).all()


# --- noise schedules ----------------------------------------------------------------------------------


def test_ddim_noise_equals_ddim_eq16():
    abar_t, abar_s, eta = 0.2, 0.5, 0.7
    sigma = eta * math.sqrt((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s))
    assert float(ref.ddim_coefficients(abar_t, abar_s, eta)[4]) == pytest.approx(sigma, rel=1e-12)


def test_ddim_noise_on_ve_path_is_k_diffusion_sigma_up():
    sigma_from, sigma_to, eta = 3.0, 1.2, 0.8
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    assert float(ref.noise_std(1.0, sigma_from, 1.0, sigma_to, eta, "ddim")) == pytest.approx(sigma_up, rel=1e-12)


def test_gddim_lambda_interpolates_ddim_and_ddpm():
    a_t, b_t = ref.vp_coefficients(0.2)
    a_s, b_s = ref.vp_coefficients(0.5)
    assert float(ref.noise_std(a_t, b_t, a_s, b_s, 0.0, "gddim")) == 0.0
    ddpm = float(ref.noise_std(a_t, b_t, a_s, b_s, 1.0, "ddim"))
    assert float(ref.noise_std(a_t, b_t, a_s, b_s, 1.0, "gddim")) == pytest.approx(ddpm, rel=1e-12)
    r = float((a_t * b_s / (a_s * b_t)) ** 2)
    assert float(ref.noise_std(a_t, b_t, a_s, b_s, 0.5, "gddim")) == pytest.approx(
        float(b_s) * math.sqrt(1 - r**0.25), rel=1e-12
    )


def test_rfim_noise_is_eta_s():
    assert float(ref.noise_std(0.3, 0.7, 0.6, 0.4, 0.5, "rfim")) == pytest.approx(0.2)


# --- thin SVD reference -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 20, 4), (2, 9, 1), (1, 6, 5)])
def test_thin_svd_reference_matches_lapack_up_to_sign(shape):
    A = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    U = dg.thin_svd(A)
    U_lapack = torch.linalg.svd(A, full_matrices=False).U
    torch.testing.assert_close(U.abs(), U_lapack.abs())
    torch.testing.assert_close(U.transpose(1, 2) @ U, torch.eye(shape[2], dtype=torch.float64).expand(shape[0], -1, -1))
    peak = U.gather(1, U.abs().argmax(1, keepdim=True))
    assert (peak > 0).all()


# --- the random stream --------------------------------------------------------------------------------


def test_philox_known_answers():
    """Random123's known-answer vectors for philox4x32-10."""
    assert [int(w) for w in ref.philox4x32(0, 0, 0, 0, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    words = ref.philox4x32(0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, (0x299F31D0 << 32) | 0xA4093822)
    assert [int(w) for w in words] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_stream_normals_are_standard_normal():
    z = ref.gaussian_noise((64, 1000), seed=3, sample_offset=0, step_index=0, dtype=torch.float64).flatten()
    n = z.numel()
    assert abs(z.mean()) < MC_SIGMAS / math.sqrt(n)
    assert abs(z.var() - 1) < MC_SIGMAS * math.sqrt(2 / n)
    assert abs((z**4).mean() - 3) < MC_SIGMAS * math.sqrt(96 / n)
    # every lane of a Philox call is normal and lanes are uncorrelated
    lanes = z.reshape(-1, 4)
    corr = torch.corrcoef(lanes.T)
    assert (corr - torch.eye(4, dtype=torch.float64)).abs().max() < 5 / math.sqrt(lanes.shape[0])


def test_components_follow_priors():
    priors = torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=torch.float64)
    k = ref.draw_components(priors, 200_000, seed=1, sample_offset=0, step_index=2)
    counts = torch.bincount(k, minlength=4).double()
    assert counts[1] == 0
    expected = priors * k.numel()
    nz = expected > 0
    chi2 = (((counts - expected)[nz]) ** 2 / expected[nz]).sum()
    assert chi2 < 16.3  # chi-square, 2 degrees of freedom, p = 0.0003


@pytest.mark.parametrize("step_fn", STEP_FNS.values(), ids=STEP_FNS.keys())
def test_batch_invariance_and_overrides(step_fn):
    gmm = dg.GMM.create(24, n_components=4, n_steps=3, scale=0.5, variant="ortho")
    x = torch.randn(6, 2, 3, 4)
    m = torch.randn(6, 2, 3, 4)
    kwargs = dict(eta=1.0, gmm=gmm, step_index=1, seed=42)
    whole = step_fn(m, x, 0.3, 0.5, **kwargs)
    part = step_fn(m[2:5], x[2:5], 0.3, 0.5, sample_offset=2, **kwargs)
    assert torch.equal(whole.prev_sample[2:5], part.prev_sample)
    assert torch.equal(whole.components[2:5], part.components)
    again = step_fn(m, x, 0.3, 0.5, **kwargs)
    assert torch.equal(again.prev_sample, whole.prev_sample)
    assert not torch.equal(step_fn(m, x, 0.3, 0.5, **{**kwargs, "seed": 43}).prev_sample, whole.prev_sample)
    assert not torch.equal(step_fn(m, x, 0.3, 0.5, **{**kwargs, "step_index": 2}).prev_sample, whole.prev_sample)
    # explicit noise and components reproduce the internal draws, and override them
    z = ref.gaussian_noise(x.shape, 42, 0, 1)
    k = ref.draw_components(gmm.priors[1], 6, 42, 0, 1)
    assert torch.equal(k, whole.components)
    explicit = step_fn(m, x, 0.3, 0.5, noise=z, components=k, **kwargs)
    torch.testing.assert_close(explicit.prev_sample, whole.prev_sample)
    other = step_fn(m, x, 0.3, 0.5, noise=torch.zeros_like(x), components=torch.zeros(6, dtype=torch.long), **kwargs)
    assert torch.equal(other.components, torch.zeros(6, dtype=torch.long))
    assert not torch.allclose(other.prev_sample, whole.prev_sample)


def test_guidance_is_fused():
    x = torch.randn(3, 10, dtype=torch.float64)
    m_uncond, m_cond = torch.randn(3, 10, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64)
    guided = dg.ddim_step(torch.cat([m_uncond, m_cond]), x, 0.3, 0.5, guidance_scale=4.0).prev_sample
    combined = dg.ddim_step(m_uncond + 4.0 * (m_cond - m_uncond), x, 0.3, 0.5).prev_sample
    torch.testing.assert_close(guided, combined)


def test_empty_batch_and_inputs_untouched():
    gmm = dg.GMM.create(8, n_components=2, n_steps=1)
    out = dg.ddim_step(torch.empty(0, 8), torch.empty(0, 8), 0.3, 0.5, eta=1.0, gmm=gmm)
    assert out.prev_sample.shape == (0, 8) and out.components.shape == (0,)
    x, m = torch.randn(2, 8), torch.randn(2, 8)
    x0, m0 = x.clone(), m.clone()
    dg.ddim_step(m, x, 0.3, 0.5, eta=1.0, gmm=gmm, clip_sample_range=0.5)
    assert torch.equal(x, x0) and torch.equal(m, m0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_computes_in_float32(dtype):
    x, m = torch.randn(2, 8), torch.randn(2, 8)
    out = dg.ddim_step(m.to(dtype), x.to(dtype), 0.3, 0.5, eta=0.5, seed=1)
    expected = dg.ddim_step(m.to(dtype).float(), x.to(dtype).float(), 0.3, 0.5, eta=0.5, seed=1)
    assert out.prev_sample.dtype == dtype
    torch.testing.assert_close(out.prev_sample, expected.prev_sample.to(dtype))


@pytest.mark.parametrize("step_fn", STEP_FNS.values(), ids=STEP_FNS.keys())
def test_return_pred_original_false_drops_only_x0(step_fn):
    gmm = dg.GMM.create(20, n_components=3, n_steps=2, variant="rand")
    x, m = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    kwargs = dict(eta=1.0, gmm=gmm, step_index=1, seed=4, clip_sample_range=1.0)
    full = step_fn(m, x, 0.3, 0.5, **kwargs)
    lean = step_fn(m, x, 0.3, 0.5, return_pred_original=False, **kwargs)
    assert lean.pred_original_sample is None and full.pred_original_sample.shape == x.shape
    assert torch.equal(lean.prev_sample, full.prev_sample) and torch.equal(lean.components, full.components)
