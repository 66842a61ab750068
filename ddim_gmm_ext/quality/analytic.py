"""A data set whose exact denoiser is analytic: scikit-learn's 1797 8x8 digits, scaled to [-1, 1], as a
mixture of narrow isotropic Gaussians around the data points,

    p(x0) = (1 / N) sum_i N(x0; mu_i, sigma0^2 I).

On the VP path x_t = a x0 + b eps every component stays Gaussian, x_t | i ~ N(a mu_i, v I) with
v = a^2 sigma0^2 + b^2, so the posterior-mean noise (the ideal epsilon-prediction network) is

    eps_hat(x_t) = E[eps | x_t] = (b / v) (x_t - a sum_i w_i(x_t) mu_i),   w = softmax_i(-|x_t - a mu_i|^2 / 2v),

and the exact log-density of a sample is a log-sum-exp over the N components. Sampler quality is measured
against this ground truth without training anything.
"""

from __future__ import annotations

import math

import torch


def load_digits_scaled(dtype=torch.float64) -> torch.Tensor:
    """[1797, 64] digits from scikit-learn (shipped with it, no download), scaled from [0, 16] to [-1, 1]."""
    from sklearn.datasets import load_digits

    return torch.as_tensor(load_digits().data, dtype=dtype) / 8.0 - 1.0


class DigitsMixture:
    """The mixture above; ``eps`` is the exact epsilon "model", ``nll`` the exact negative log-likelihood."""

    def __init__(self, sigma0: float = 0.1, upsample: int = 1):
        """``upsample`` u > 1: each digit upsampled (nearest neighbour) to 8u x 8u, D = 64 u^2, the same data
        at a larger dimension (u = 4: D = 1024), to see whether a per-coordinate scale transfers across D."""
        if isinstance(upsample, bool) or not isinstance(upsample, int) or upsample < 1:
            raise ValueError(f"upsample must be an int >= 1, got {upsample!r}")
        self.sigma0 = sigma0
        digits = load_digits_scaled(torch.float64)
        if upsample > 1:
            images = digits.reshape(-1, 1, 8, 8).repeat_interleave(upsample, 2).repeat_interleave(upsample, 3)
            digits = images.flatten(1).contiguous()
        self._means = {torch.float64: digits}

    @property
    def dim(self) -> int:
        return self._means[torch.float64].shape[1]

    def means(self, dtype) -> torch.Tensor:
        if dtype not in self._means:
            self._means[dtype] = self._means[torch.float64].to(dtype)
        return self._means[dtype]

    def _sq_dists(self, x: torch.Tensor, a) -> torch.Tensor:
        """|x - a mu_i|^2, [B, N]."""
        mu = self.means(x.dtype)
        return (x**2).sum(-1, keepdim=True) - 2 * a * x @ mu.T + a**2 * (mu**2).sum(-1)

    def eps(self, x: torch.Tensor, alpha_prod) -> torch.Tensor:
        """Exact E[eps | x_t] at abar_t = alpha_prod for x [B, 64], in x's dtype."""
        a, b = math.sqrt(alpha_prod), math.sqrt(1 - alpha_prod)
        v = a**2 * self.sigma0**2 + b**2
        w = torch.softmax(-self._sq_dists(x, a) / (2 * v), dim=-1)
        return (b / v) * (x - a * w @ self.means(x.dtype))

    def eps_model(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """:meth:`eps` as an epsilon model of the paper's schedule: x [B, 64], t [B] int64 training timesteps,
        one value for the whole batch (as the loops of :mod:`ddim_gmm_ext.quality.sampling` call it)."""
        from .sampling import training_alphas_cumprod

        if (t != t[0]).any():
            raise ValueError("the analytic eps model takes one timestep per batch")
        return self.eps(x, float(training_alphas_cumprod()[t[0]]))

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """-log p(x) in nats per sample, [B], computed in float64."""
        x = x.double()
        log_comp = -self._sq_dists(x, 1.0) / (2 * self.sigma0**2)
        log_norm = math.log(len(self._means[torch.float64])) + 0.5 * self.dim * math.log(2 * math.pi * self.sigma0**2)
        return log_norm - torch.logsumexp(log_comp, dim=-1)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n fresh samples [n, 64] float64."""
        mu = self._means[torch.float64]
        i = torch.randint(0, mu.shape[0], (n,), generator=generator)
        return mu[i] + self.sigma0 * torch.randn(n, self.dim, generator=generator, dtype=torch.float64)


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two equal-size point sets [n, D]: the root mean, over random unit
    directions, of the squared 1-D W2 distance between the sorted projections."""
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    theta = torch.randn(x.shape[1], n_projections, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, py = (x @ theta).sort(0).values, (y @ theta).sort(0).values
    return float(((px - py) ** 2).mean().sqrt())
