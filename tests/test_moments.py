"""Moment matching of every GMM variant, per coordinate AND inside the offsets' span, one step and a chain.

With the exact noise as model output (x0 fixed, eps random, so x_t is an exact forward sample), a step of a
moment-matched kernel must give E[x_s] = a_s x0 and Cov[x_s] = b_s^2 I. What each variant achieves
(measured here, D = 64, K = 4, s = 1, eta = 1, 20000 samples):

    variant     per-coordinate variance   second moment in the offsets' span
    rand        exact                     too large (offsets' covariance not removed off the diagonal)
    ortho       exact                     too large (as rand)
    ortho-vub   too small on the first K coordinates (the bounds are taken there, not in the span)
    ortho-lr    exact                     exact

The assertions pin exactly that: the exact ones to Monte Carlo tolerance, the others to a deviation beyond
it, so a change in either direction is seen.
"""

from __future__ import annotations

import math

import pytest
import torch

import ddim_gmm_ext as dg
from ddim_gmm_ext import reference as R
from tests.helpers import MC_SIGMAS_WIDE, assert_close

D, K, N = 64, 4, 20000
A_T, B_T, A_S, B_S = 0.6, 0.8, 0.8, 0.6
TOL = MC_SIGMAS_WIDE * math.sqrt(2 / N)  # relative, ~6 sigma of a variance estimate


def _step(gmm, x0, eps, step=0, seed=1, rows=None):
    rows = rows if rows is not None else torch.tensor([R.coefficient_row(A_T, B_T, A_S, B_S, B_S)] * gmm.n_steps,
                                                      dtype=torch.float64)  # fmt: skip
    return dg.step_from_table(eps, A_T * x0 + B_T * eps, rows, step, gmm=gmm, seed=seed).prev_sample


def _moments(variant, drop_var=False, wrong_basis=False):
    gmm = dg.GMM.create(D, n_components=K, n_steps=2, variant=variant, seed=3, dtype=torch.float64)
    if drop_var:  # planted mutation: the variance offsets dropped
        gmm.var_offsets = torch.zeros_like(gmm.var_offsets)
        gmm._cache = {}
    if wrong_basis:  # planted mutation: another orthonormal basis of the same size
        q = torch.linalg.qr(torch.randn(2, D, K - 1, dtype=torch.float64)).Q
        gmm.basis = q.transpose(1, 2).contiguous()
        gmm._cache = {}
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, D, generator=g, dtype=torch.float64).expand(N, D)
    eps = torch.randn(N, D, generator=g, dtype=torch.float64)
    centred = _step(gmm, x0, eps) - A_S * x0
    span = torch.linalg.qr(gmm.offsets[0].T).Q[:, : K - 1]  # orthonormal basis of the offsets' span
    in_span = centred @ span
    per_coord = centred.var(0) / B_S**2
    span_cov = (in_span.T @ in_span / N) / B_S**2
    return centred.mean(0), per_coord, span_cov


def _exact_per_coordinate(per_coord):
    return (per_coord - 1).abs().max().item() < TOL


def _exact_in_span(span_cov):
    return (span_cov - torch.eye(K - 1, dtype=torch.float64)).abs().max().item() < TOL


@pytest.mark.parametrize("variant", ["rand", "ortho", "ortho-vub", "ortho-lr"])
def test_one_step_moments(variant):
    mean, per_coord, span_cov = _moments(variant)
    assert mean.abs().max() < MC_SIGMAS_WIDE * B_S / math.sqrt(N)  # sum_k pi_k delta_k = 0
    if variant in ("rand", "ortho", "ortho-lr"):
        assert _exact_per_coordinate(per_coord), per_coord
    if variant == "ortho-lr":
        assert _exact_in_span(span_cov), span_cov
    if variant in ("rand", "ortho"):
        assert span_cov.diagonal().max() > 1 + 2 * TOL, span_cov  # the known excess in the span
    if variant == "ortho-vub":
        assert per_coord[:K].min() < 1 - 2 * TOL, per_coord[:K]  # the bounds taken on coordinates 0..K-1


@pytest.mark.parametrize("variant", ["rand", "ortho", "ortho-lr"])
def test_dropping_the_variance_offsets_is_seen(variant):
    # The planted mutation of the assertions above: without variance offsets the moments are too large.
    _, per_coord, span_cov = _moments(variant, drop_var=True)
    assert not (_exact_per_coordinate(per_coord) and _exact_in_span(span_cov))


def test_the_wrong_basis_is_seen():
    _, per_coord, span_cov = _moments("ortho-lr", wrong_basis=True)
    assert not _exact_in_span(span_cov)


def test_ortho_lr_chain_keeps_the_forward_marginals():
    # A 4-step chain of exact-noise steps: every intermediate x_s has the forward marginal's mean and
    # covariance (per coordinate and in the span), not only the first.
    # scale 0.5: every eigenvalue (0.0625) below every step's c^2 (>= 0.19), so nothing is clipped
    gmm = dg.GMM.create(D, n_components=K, n_steps=4, scale=0.5, variant="ortho-lr", seed=5, dtype=torch.float64)
    abar = torch.tensor([0.2, 0.35, 0.5, 0.65, 0.8], dtype=torch.float64)
    rows = torch.tensor(
        [R.coefficient_row(*R.ddim_coefficients(abar[i], abar[i + 1], 1.0)) for i in range(4)], dtype=torch.float64
    )
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, D, generator=g, dtype=torch.float64).expand(N, D)
    x = abar[0].sqrt() * x0 + (1 - abar[0]).sqrt() * torch.randn(N, D, generator=g, dtype=torch.float64)
    for i in range(4):
        eps = (x - abar[i].sqrt() * x0) / (1 - abar[i]).sqrt()  # the exact noise of x
        x = dg.step_from_table(eps, x, rows, i, gmm=gmm, seed=2).prev_sample
        centred = (x - abar[i + 1].sqrt() * x0) / (1 - abar[i + 1]).sqrt()
        assert (centred.var(0) - 1).abs().max() < TOL
        cov = (centred @ torch.linalg.qr(gmm.offsets[i].T).Q[:, : K - 1]).T
        cov = cov @ cov.T / N
        assert (cov - torch.eye(K - 1, dtype=torch.float64)).abs().max() < TOL, (i, cov)


# -- Closed form from the tables (float64) and Monte Carlo against it ------------------------------------------
# With exact noise, a step gives Y = x_s - a_s x0 = B eps_hat + g delta_k + n_k, n_k ~ N(0, N_k), so
#     Cov[Y_s] = (B / b_t)^2 Cov[Y_t] + sum_k pi_k (delta_k delta_k^T + N_k)                       (*)
# with N_k = diag(max(c^2 - v_k, 0)), or c^2 I - W^T diag(min(v_k, c^2)) W with a basis W. The closed form pins
# every variant's moments to 1e-12 (not just "deviates"), and the sampled step must agree with it.
# Measured (D = 16, K = 4, s = 1, c^2 = 0.3025, b_s^2 = 0.36, uniform priors, seed 3), ratios to the target:
#   rand       per-coordinate 1.000, in-span eigenvalues 1.41-2.21
#   ortho      per-coordinate 1.000, in-span 1.50-1.56
#   ortho-vub  per-coordinate 0.41-0.58 on 0..K-1 and 1.02-1.19 elsewhere, in-span 1.17-1.67
#   ortho-lr   1.000 per coordinate and in the span
# 4-step chain (s = 0.5): rand / ortho in-span 1.26-1.53, ortho-vub per-coordinate 0.50-1.22 and in-span
# 1.27-1.44, ortho-lr 1.000 everywhere (the full covariance is b_s^2 I after every step).
# Planted mutations, each checked to fail: var_offsets zeroed (every variant, closed form and sampled), the
# basis of another step (ortho-lr), the offsets not added in the step (sampled: in-span off by > 0.3).

CD, CK = 16, 4
C_STEP = (0.6, 0.8, 0.8, 0.6, 0.55)  # a_t, b_t, a_s, b_s, c; c^2 = 0.3025 >= s^2 / K: ORTHO-LR unclipped
C_ABAR = (0.1, 0.3, 0.5, 0.7, 0.85)  # chain, DDIM eta = 1, s = 0.5
MC_TOL = 0.03  # 1e5 samples: a variance ratio has std sqrt(2 / N) = 0.0045, in-span eigenvalues ~0.013


def _span(offsets):
    """Q [K - 1, D]: orthonormal rows spanning the offsets [K, D]."""
    U, S, _ = torch.linalg.svd(offsets.double().T, full_matrices=False)
    return U[:, 1e-9 * S.max() < S].T


def _closed_form_step(cov, b_t, B, c, priors, offsets, var_offsets, basis):
    """(*) for one step: the covariance of Y_s from that of Y_t."""
    if basis is None:
        v = torch.zeros(offsets.shape, dtype=torch.float64)
        v[:, : var_offsets.shape[1]] = var_offsets
        N_k = torch.diag_embed((c**2 - v).clamp(min=0))
    else:
        N_k = c**2 * torch.eye(offsets.shape[1], dtype=torch.float64) - torch.einsum(
            "ri,kr,rj->kij", basis, var_offsets.clamp(max=c**2), basis
        )
    mix = torch.einsum("k,kij->ij", priors, offsets[:, :, None] * offsets[:, None, :] + N_k)
    return (B / b_t) ** 2 * cov + mix


def _tables(gmm, i):
    return tuple(None if t is None else t[i] for t in gmm.tables(torch.empty((), dtype=torch.float64)))


def _ratios(cov, target, Q):
    return cov.diagonal() / target, torch.linalg.eigvalsh(Q @ cov @ Q.T) / target


def _chain():
    for i, (ab_t, ab_s) in enumerate(zip(C_ABAR[:-1], C_ABAR[1:], strict=True)):
        c = ((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)) ** 0.5
        yield i, ab_t**0.5, (1 - ab_t) ** 0.5, ab_s**0.5, (1 - ab_s) ** 0.5, c


def _gmm(variant, n_steps=1, scale=1.0):
    return dg.GMM.create(CD, CK, n_steps, scale, variant, seed=3, dtype=torch.float64)


def _closed_form(gmm, chain):
    """(per-coordinate ratios, in-span ratios, covariance) of one step (chain=False) or the 4-step chain."""
    if not chain:
        a_t, b_t, a_s, b_s, c = C_STEP
        cov = _closed_form_step(b_t**2 * torch.eye(CD, dtype=torch.float64), b_t, (b_s**2 - c**2) ** 0.5, c,
                                *_tables(gmm, 0))  # fmt: skip
        return (*_ratios(cov, b_s**2, _span(_tables(gmm, 0)[1])), cov)
    cov = (1 - C_ABAR[0]) * torch.eye(CD, dtype=torch.float64)
    for i, _a_t, b_t, _a_s, b_s, c in _chain():
        cov = _closed_form_step(cov, b_t, (b_s**2 - c**2) ** 0.5, c, *_tables(gmm, i))
    return (*_ratios(cov, 1 - C_ABAR[-1], _span(_tables(gmm, 3)[1])), cov)


def _sampled(gmm, chain, n=100_000):
    gen = torch.Generator().manual_seed(11)
    x0 = torch.randn(CD, generator=gen, dtype=torch.float64)
    steps = list(_chain()) if chain else [(0, *C_STEP)]
    a_0, b_0 = steps[0][1], steps[0][2]
    x = a_0 * x0 + b_0 * torch.randn(n, CD, generator=gen, dtype=torch.float64)
    rows = torch.tensor([R.coefficient_row(*s[1:]) for s in steps], dtype=torch.float64)
    for i, a_t, b_t, *_ in steps:
        x = R.step_from_table((x - a_t * x0) / b_t, x, rows, i, gmm=gmm, seed=5).prev_sample
    a_s, b_s = steps[-1][3], steps[-1][4]
    Y = x - a_s * x0
    assert Y.mean(0).abs().max() < MC_SIGMAS_WIDE * b_s / n**0.5  # sum_k pi_k delta_k = 0
    cov = torch.cov(Y.T)
    return _ratios(cov, b_s**2, _span(_tables(gmm, len(steps) - 1)[1]))


@pytest.mark.parametrize("chain", [False, True])
@pytest.mark.parametrize("variant", ["rand", "ortho", "ortho-vub", "ortho-lr"])
def test_closed_form_moments(variant, chain):
    gmm = _gmm(variant, n_steps=4 if chain else 1, scale=0.5 if chain else 1.0)
    per_coord, in_span, cov = _closed_form(gmm, chain)
    one = torch.ones_like(per_coord)
    if variant == "ortho-lr":  # exact in every direction: Cov = b_s^2 I
        target = (1 - C_ABAR[-1]) if chain else C_STEP[3] ** 2
        assert_close(cov, target * torch.eye(CD, dtype=torch.float64), kind="f64_moments")
    elif variant == "ortho-vub":  # the bounds taken on coordinates 0..K-1, none elsewhere
        assert per_coord[:CK].max() < 0.95 and per_coord[CK:].min() > 1.0
        assert (in_span - 1).abs().max() > 0.1
    else:  # the diagonal: exact per coordinate, an excess in the span
        assert_close(per_coord, one, kind="f64_moments")
        assert in_span.min() > 1.1


@pytest.mark.parametrize("chain", [False, True])
@pytest.mark.parametrize("variant", ["rand", "ortho", "ortho-vub", "ortho-lr"])
def test_sampled_moments_equal_the_closed_form(variant, chain):
    gmm = _gmm(variant, n_steps=4 if chain else 1, scale=0.5 if chain else 1.0)
    per_coord, in_span, _ = _closed_form(gmm, chain)
    got_coord, got_span = _sampled(gmm, chain)
    assert (got_coord - per_coord).abs().max() < MC_TOL, (got_coord, per_coord)
    assert (got_span - in_span).abs().max() < MC_TOL, (got_span, in_span)


def test_closed_form_sees_the_planted_mutations():
    for variant in ("rand", "ortho", "ortho-vub", "ortho-lr"):
        gmm = _gmm(variant)
        gmm.var_offsets, gmm._cache = torch.zeros_like(gmm.var_offsets), {}
        per_coord, in_span, _ = _closed_form(gmm, chain=False)
        assert max((per_coord - 1).abs().max(), (in_span - 1).abs().max()) > 0.05, variant
    gmm = _gmm("ortho-lr")
    gmm.basis, gmm._cache = _gmm("ortho-lr", n_steps=2).basis[1:].clone(), {}
    assert (_closed_form(gmm, chain=False)[1] - 1).abs().max() > 0.05


@pytest.mark.parametrize("variant", ["rand", "ortho", "ortho-vub", "ortho-lr"])
def test_one_component_is_the_gaussian_kernel(variant):
    """K = 1: the only centred offset is 0, so offsets AND variance offsets are 0 (ORTHO-VUB's bound s^2 used to
    stay, taking s^2 of noise away with no offset to put it back; checked to fail without the K = 1 guard)."""
    gmm = dg.GMM.create(2, 1, 3, 1.0, variant, seed=4)
    for t in (gmm.offsets, gmm.var_offsets):
        assert torch.equal(t, torch.zeros_like(t)), variant


# -- GMM tables: bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "scale", "dtype"), [("ortho-vub", 1e20, torch.float32), ("rand", 1e200, torch.float64)]
)
def test_overflowing_scale_is_refused(variant, scale, dtype):
    # Checked to fail without the finiteness check (the tables then hold inf).
    with pytest.raises(ValueError, match="too large: the GMM tables overflow"):
        dg.GMM.create(CD, CK, 2, scale, variant, dtype=dtype)


def _lr_tables():
    gmm = _gmm("ortho-lr", n_steps=2)
    return {"priors": gmm.priors, "offsets": gmm.offsets, "var_offsets": gmm.var_offsets, "basis": gmm.basis}


def test_from_params_keeps_the_basis():
    t = _lr_tables()
    gmm = dg.GMM.from_params(**t)
    assert torch.equal(gmm.basis, t["basis"]) and torch.equal(gmm.var_offsets, t["var_offsets"])


@pytest.mark.parametrize("name", ["offsets", "var_offsets"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_from_params_non_finite_refused(name, bad):
    t = {k: v.clone() for k, v in _lr_tables().items()}
    t[name][0, 0, 0] = bad
    before = {k: v.clone() for k, v in t.items()}
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        dg.GMM.from_params(**t)
    for k in t:  # not modified
        assert_close(t[k], before[k], kind="exact", equal_nan=True)


def test_from_params_negative_var_offsets_refused():
    t = {k: v.clone() for k, v in _lr_tables().items()}
    t["var_offsets"][1, 2, 0] = -1e-3
    with pytest.raises(ValueError, match="var_offsets must be >= 0"):
        dg.GMM.from_params(**t)


def test_from_params_bad_basis_refused():
    t = _lr_tables()
    with pytest.raises(ValueError, match="basis must have shape"):
        dg.GMM.from_params(**{**t, "basis": t["basis"][:, :1]})
    for bad in (2 * t["basis"], torch.full_like(t["basis"], float("nan"))):
        with pytest.raises(ValueError, match="basis rows must be orthonormal"):
            dg.GMM.from_params(**{**t, "basis": bad})


def test_ortho_lr_needs_fewer_components_than_dim():
    with pytest.raises(ValueError, match=r"n_components \(8\) must be < dim \(8\)"):
        dg.GMM.create(8, 8, 2, variant="ortho-lr")


@pytest.mark.parametrize("uniform", [True, False])
def test_low_rank_moments_match_lapacks_svd_of_the_weighted_offsets(uniform):
    # Oracle: LAPACK's SVD of P = diag(sqrt(pi)) offsets: the same eigenvalues lam_i = sigma_i^2 and the same
    # projector on their span (rows within a repeated eigenvalue are any orthonormal basis of its eigenspace;
    # uniform priors repeat it K - 1 times). Checked: the runtime's tables (GMM, from a K x K Gram matrix) and
    # the specification's (reference.low_rank_moments).
    # Mutation checked: dividing the runtime's rows by lam instead of sqrt(lam) (_gmm_tables._low_rank) fails the
    # projector.
    K = 5
    gmm = dg.GMM.create(64, n_components=K, n_steps=3, variant="ortho-lr", uniform_priors=uniform, seed=2,
                        dtype=torch.float64)  # fmt: skip
    _, sv, vh = torch.linalg.svd(gmm.offsets * gmm.priors[:, :, None].sqrt(), full_matrices=False)
    lam = (sv[:, : K - 1] ** 2)[:, None, :].expand_as(gmm.var_offsets)
    projector = vh[:, : K - 1].transpose(1, 2) @ vh[:, : K - 1]
    eye = torch.eye(K - 1, dtype=torch.float64).expand(3, -1, -1)
    for var, basis in ((gmm.var_offsets, gmm.basis), R.low_rank_moments(gmm.offsets, gmm.priors)):
        assert_close(var * (K * gmm.priors)[:, :, None], lam, kind="f64_svd")
        assert_close(basis.transpose(1, 2) @ basis, projector, kind="f64_svd")
        assert_close(basis @ basis.transpose(1, 2), eye, kind="f64_svd")
