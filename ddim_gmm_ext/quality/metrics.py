"""Sample-quality metrics on feature vectors: the Frechet distance (FID's formula; "digits-FD" on the
penultimate features of the shipped digits classifier) and k-NN precision / recall (Kynkaanniemi et al.,
NeurIPS 2019).

A Frechet distance compares only means and covariances, so it rewards added spread: samples pushed off the
data manifold can lower it while fewer of them look like digits. Precision (the fraction of samples inside
the real data's k-NN manifold) and recall (the fraction of real data inside the samples' manifold) separate
fidelity from coverage; report all three together.
"""

from __future__ import annotations

import math
from typing import cast

import torch


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """||mu_x - mu_y||^2 + tr(S_x + S_y - 2 (S_x S_y)^(1/2)) of two feature sets [n, F] and [m, F], computed
    in float64; tr (S_x S_y)^(1/2) is the sum of the square roots of the (non-negative) eigenvalues of the
    symmetric S_x^(1/2) S_y S_x^(1/2)."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be [n, F] and [m, F], got {tuple(x.shape)} and {tuple(y.shape)}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError("x and y need at least 2 rows each for a covariance")
    x, y = x.double(), y.double()
    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x, s_y = torch.cov(x.T), torch.cov(y.T)
    w, v = torch.linalg.eigh(s_x)
    sqrt_s_x = (v * w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(sqrt_s_x @ s_y @ sqrt_s_x).clamp(min=0).sqrt().sum()
    return float(((mu_x - mu_y) ** 2).sum() + s_x.trace() + s_y.trace() - 2 * cross)


def knn_radii(x: torch.Tensor, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """Distance of each row of x [n, F] to its k-th nearest other row, [n], in float64. Rows are taken
    ``chunk`` at a time (a [chunk, n] distance block instead of [n, n]: 10,000 reference images would need 800 MB)
    and the k + 1 smallest kept by ``topk`` (the 1st smallest is the point itself)."""
    if len(x) <= k:
        raise ValueError(f"need more than k = {k} points for k-NN radii, got {len(x)}")
    x = x.double()
    blocks = [
        torch.cdist(x[i : i + chunk], x).topk(k + 1, dim=1, largest=False).values[:, k] for i in range(0, len(x), chunk)
    ]
    return torch.cat(blocks)


def _fraction_covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of ``points`` inside at least one ball (centre, radius)."""
    return float((torch.cdist(points, centres) <= radii[None]).any(dim=1).double().mean())


def precision_recall(
    real: torch.Tensor, fake: torch.Tensor, k: int = 3, real_radii: torch.Tensor | None = None
) -> tuple[float, float]:
    """(precision, recall) of generated features ``fake`` [m, F] against ``real`` [n, F]: precision is the
    fraction of fake points within the k-NN radius of some real point, recall the fraction of real points
    within the k-NN radius of some fake point (k = 3 as in Kynkaanniemi et al.). Computed in float64.
    ``real_radii``: ``knn_radii(real, k)`` computed once for a fixed reference set (the costly part of a call
    with 10,000 reference images)."""
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake must be [n, F] and [m, F], got {tuple(real.shape)} and {tuple(fake.shape)}")
    if real_radii is not None and real_radii.shape != (len(real),):
        raise ValueError(f"real_radii must be [{len(real)}] (knn_radii of real), got {tuple(real_radii.shape)}")
    real, fake = real.double(), fake.double()
    precision = _fraction_covered(fake, real, knn_radii(real, k) if real_radii is None else real_radii.double())
    recall = _fraction_covered(real, fake, knn_radii(fake, k))
    return precision, recall


class DigitsQuality:
    """digits-FD, precision and recall of samples [n, 64] (data scale [-1, 1]) against the 1797 real digits,
    on the penultimate features of the shipped digits classifier."""

    def __init__(self, k: int = 3):
        from . import digits
        from .analytic import load_digits_scaled

        self.k = k
        self.classifier = cast(digits.DigitsClassifier, digits.load("classifier"))
        self.real = load_digits_scaled(torch.float32)
        self.real_features = self.features(self.real)
        self.real_radii = knn_radii(self.real_features, k)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.classifier.features(x.float()).double()

    def __call__(self, samples: torch.Tensor) -> dict:
        """{"fd", "precision", "recall"} of ``samples`` [n, 64]. Samples with non-finite values (a diverged
        sampler) count as outside the data manifold and make the FD infinite: a sweep is not stopped by them."""
        finite = torch.isfinite(samples).all(dim=1)
        f = self.features(samples[finite])
        if len(f) <= self.k:
            return {"fd": math.inf, "precision": 0.0, "recall": 0.0}
        precision, recall = precision_recall(self.real_features, f, self.k, self.real_radii)
        fd = frechet_distance(f, self.real_features) if finite.all() else math.inf
        return {"fd": fd, "precision": precision * len(f) / len(samples), "recall": recall}


def paired_test(a, b) -> dict:
    """Paired difference a - b over seeds (the same seed: same x_T and step noise) with the two-sided paired
    t-test: {"mean", "sd", "se" (sd / sqrt(n)), "n", "t", "p"}. n = 1 gives sd, se, t and p as None (no test)."""
    diffs = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    if n == 0:
        raise ValueError("paired_test needs at least one pair")
    mean = math.fsum(diffs) / n
    if n == 1:
        return {"mean": mean, "sd": None, "se": None, "n": 1, "t": None, "p": None}
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    se = sd / math.sqrt(n)
    if se == 0:
        t, p = (0.0, 1.0) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
    else:
        from scipy import stats

        t = mean / se
        p = float(2 * stats.t.sf(abs(t), n - 1))
    return {"mean": mean, "sd": sd, "se": se, "n": n, "t": t, "p": p}


def holm(pvalues) -> list:
    """Holm-Bonferroni adjusted p-values (step-down; monotone, capped at 1) of a family of tests, in the input
    order; None entries (no test) stay None and do not count in the family."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(tested)
    adjusted: list = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted
