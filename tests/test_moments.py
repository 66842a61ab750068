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

D, K, N = 64, 4, 20000
A_T, B_T, A_S, B_S = 0.6, 0.8, 0.8, 0.6
TOL = 6 * math.sqrt(2 / N)  # relative, ~6 sigma of a variance estimate


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
    assert mean.abs().max() < 6 * B_S / math.sqrt(N)  # sum_k pi_k delta_k = 0
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
