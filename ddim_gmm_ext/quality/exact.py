"""The exact (empirical-optimal) denoiser of a training set {x_n}, n = 1..N: the posterior mean of x0 under the
empirical distribution (1/N) sum_n delta(x0 - x_n) on the VP path x_t = a_t x0 + b_t eps,

    E[x0 | x_t] = sum_n w_n x_n,   w = softmax_n(-|x_t - a_t x_n|^2 / (2 b_t^2)),

and its epsilon form eps_hat = (x_t - a_t E[x0 | x_t]) / b_t. It is the minimiser of the denoising loss on that
training set: a network trained to zero loss on it is this function. Sampled with it, a sampler's error is
discretisation alone (no model error), so DDIM's few-step vs many-step gap is the room a better kernel can take.
With many steps it returns training images (it memorises): score its samples against held-out images and report
their distance to the nearest training image (:func:`nearest_distances`).

The logits are computed in float64 (at t = 0, 2 b^2 = 0.003 while |x_t|^2 is ~ D / 2: float32 would lose the
differences between training images), in chunks of the training set with a running log-sum-exp, so memory stays
[batch, chunk] whatever N.
"""

from __future__ import annotations

import hashlib
import math

import torch


class ExactDenoiser:
    """The exact denoiser of ``images`` [N, D] (data scale) on the paper's schedule; ``chunk`` training images per
    matrix product. :meth:`eps_model` is an epsilon model for :mod:`ddim_gmm_ext.quality.sampling`."""

    def __init__(self, images: torch.Tensor, chunk: int = 4096, name: str = "exact"):
        if images.dim() != 2 or len(images) < 1:
            raise ValueError(f"images must be [N, D] with N >= 1, got {tuple(images.shape)}")
        if not torch.isfinite(images).all():
            raise ValueError("images must be finite")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.images = images.detach().double().contiguous()
        self.sq_norms = (self.images**2).sum(1)
        self.chunk, self.name = chunk, name

    @property
    def dim(self) -> int:
        return self.images.shape[1]

    def identity(self) -> dict:
        """The training set's size and sha256 (of its float64 bytes): which empirical distribution this is."""
        digest = hashlib.sha256(self.images.numpy().tobytes()).hexdigest()
        return {"name": self.name, "n_train": len(self.images), "dim": self.dim, "sha256": digest}

    def x0(self, x: torch.Tensor, alpha_prod) -> torch.Tensor:
        """E[x0 | x_t = x] [B, D] float64 at abar_t = ``alpha_prod`` (0 < abar_t <= 1)."""
        alpha_prod = float(alpha_prod)
        if not 0.0 < alpha_prod < 1.0:
            raise ValueError(f"alpha_prod must be in (0, 1), got {alpha_prod}")
        a, b2 = math.sqrt(alpha_prod), 1.0 - alpha_prod
        x = x.reshape(len(x), -1).double()
        if x.shape[1] != self.dim:
            raise ValueError(f"x must be [B, {self.dim}], got {tuple(x.shape)}")
        x_sq = (x**2).sum(1, keepdim=True)
        top = torch.full((len(x),), -math.inf, dtype=torch.float64)
        total = torch.zeros(len(x), dtype=torch.float64)
        acc = torch.zeros_like(x)
        for j in range(0, len(self.images), self.chunk):
            xn, sq = self.images[j : j + self.chunk], self.sq_norms[j : j + self.chunk]
            # -|x - a x_n|^2 / (2 b^2), expanded (one matrix product); float64 keeps the cancellation harmless
            logits = (2 * a * (x @ xn.T) - x_sq - (a * a) * sq) / (2 * b2)
            new_top = torch.maximum(top, logits.max(1).values)
            rescale = torch.exp(top - new_top)
            p = torch.exp(logits - new_top[:, None])
            total = total * rescale + p.sum(1)
            acc = acc * rescale[:, None] + p @ xn
            top = new_top
        return acc / total[:, None]

    def eps(self, x: torch.Tensor, alpha_prod) -> torch.Tensor:
        """eps_hat = (x - a E[x0 | x]) / b in x's dtype and shape."""
        a, b = math.sqrt(float(alpha_prod)), math.sqrt(1.0 - float(alpha_prod))
        flat = x.reshape(len(x), -1).double()
        return ((flat - a * self.x0(flat, alpha_prod)) / b).to(x.dtype).reshape(x.shape)

    def eps_model(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """:meth:`eps` as an epsilon model of the paper's schedule: x [B, D], t [B] int64 training timesteps,
        one value per batch (as the loops of :mod:`ddim_gmm_ext.quality.sampling` call it)."""
        from .sampling import training_alphas_cumprod

        if len(t) and (t != t[0]).any():
            raise ValueError("the exact denoiser takes one timestep per batch")
        return self.eps(x, float(training_alphas_cumprod()[int(t[0])]))

    __call__ = eps_model


def nearest_distances(samples: torch.Tensor, images: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Euclidean distance [n] of each sample to its nearest row of ``images`` (float64): how far a sample is
    from the training set (0: a copy of a training image)."""
    x = samples.reshape(len(samples), -1).double()
    best = torch.full((len(x),), math.inf, dtype=torch.float64)
    for j in range(0, len(images), chunk):
        best = torch.minimum(best, torch.cdist(x, images[j : j + chunk].double()).min(1).values)
    return best


def load(spec: str, chunk: int = 4096) -> ExactDenoiser:
    """The model "exact-fashion" (Fashion-MNIST's 60,000 training images), "exact-fashion:N" (the first N of them) or
    "exact-digits" (scikit-learn's 1797 digits)."""
    name, _, count = spec.partition(":")
    if name == "exact-fashion":
        from . import fashion

        images = fashion.load_images("train").flatten(1)
    elif name == "exact-digits":
        from .analytic import load_digits_scaled

        images = load_digits_scaled(torch.float64)
    else:
        raise ValueError(f"exact model must be 'exact-fashion[:N]' or 'exact-digits[:N]', got {spec!r}")
    if count:
        if not count.isdigit() or not 1 <= int(count) <= len(images):
            raise ValueError(f"{spec!r}: N must be an integer in [1, {len(images)}], got {count!r}")
        images = images[: int(count)]
    return ExactDenoiser(images, chunk, name=spec)
