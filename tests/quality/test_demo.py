"""The analytic digits model (exact denoiser, exact density), its metrics, and the `ddim-gmm demo` job."""

import json
import math

import pytest
import torch

pytest.importorskip("sklearn")

from ddim_gmm_ext import cli  # noqa: E402
from ddim_gmm_ext.quality.analytic import DigitsMixture, sliced_wasserstein  # noqa: E402
from ddim_gmm_ext.quality.sampling import GMM_VARIANTS, sample_ddim  # noqa: E402


@pytest.fixture(scope="module")
def mixture():
    return DigitsMixture(sigma0=0.1)


def log_marginal(mixture, x, abar):
    """log p_t(x) of the noised mixture, by brute force: components N(a mu_i, (a^2 sigma0^2 + b^2) I)."""
    a, b2 = math.sqrt(abar), 1 - abar
    v = abar * mixture.sigma0**2 + b2
    mu = mixture.means(torch.float64)
    d2 = ((x[:, None, :] - a * mu[None]) ** 2).sum(-1)
    return torch.logsumexp(-d2 / (2 * v), -1) - 0.5 * mixture.dim * math.log(2 * math.pi * v) - math.log(len(mu))


@pytest.mark.parametrize("abar", [0.02, 0.5, 0.97])
def test_eps_is_the_exact_score(mixture, abar):
    """Tweedie: E[eps | x_t] = -b grad log p_t(x_t)."""
    x = torch.randn(5, 64, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(log_marginal(mixture, x, abar).sum(), x)
    torch.testing.assert_close(mixture.eps(x.detach(), abar), -math.sqrt(1 - abar) * grad)


def test_nll_is_the_exact_density(mixture):
    x = mixture.sample(7, torch.Generator().manual_seed(0))
    torch.testing.assert_close(mixture.nll(x), -log_marginal(mixture, x, 1.0))


def test_sliced_wasserstein_properties(mixture):
    gen = torch.Generator().manual_seed(1)
    x, y = mixture.sample(400, gen), mixture.sample(400, gen)
    assert sliced_wasserstein(x, x) == 0.0
    near = sliced_wasserstein(x, y)
    assert sliced_wasserstein(x, y + 0.3 * torch.randn(y.shape, generator=gen, dtype=y.dtype)) > 1.5 * near
    assert sliced_wasserstein(x, y + 0.5) > 0.45  # a shift of 0.5 in every coordinate projects to >= 0.5 |sum theta|
    with pytest.raises(ValueError, match="same shape"):
        sliced_wasserstein(x, y[:10])


def test_ddim_sampling_recovers_the_mixture(mixture):
    """With the exact denoiser, 20-step DDIM samples land near the data: far lower NLL than noise."""
    x_T = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    (x0,) = sample_ddim(mixture.eps_model, x_T, 20, 0.0, [None], seed=0)
    assert mixture.nll(x0).mean() < mixture.nll(x_T.double()).mean() - 1000


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo.json"
    args = [
        "demo",
        "--model",
        "analytic",
        "--seeds",
        "0",
        "1",
        "--samples",
        "24",
        "--steps",
        "2",
        "3",
        "--scales",
        "1",
        "--json",
        str(out),
    ]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    for name in ["DDIM", "GMM-RAND s=1", "GMM-ORTHO s=1", "GMM-ORTHO-VUB s=1", "GMM-ORTHO-VUB* s=1", "SW@3", "NLL@2"]:
        assert name in text
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * (1 + len(GMM_VARIANTS)) * 2  # etas x samplers (DDIM + variants) x steps
    assert all(len(r["sw"]) == 2 and all(math.isfinite(v) for v in r["sw"] + r["nll"]) for r in rows)


def test_demo_rejects_bad_arguments(capsys):
    for args in (["--steps", "0"], ["--scales", "-1"], ["--png", "x.png"]):
        with pytest.raises(SystemExit) as info:
            cli.main(["demo", "--model", "analytic", *args])
        assert info.value.code == 2 and args[0] in capsys.readouterr().err


def test_upsampled_mixture_is_the_same_data_at_a_larger_dimension():
    # Each digit pixel repeated u x u times: D = 64 u^2, and pooling the upsampled means gives the digits back.
    small, big = DigitsMixture(), DigitsMixture(upsample=4)
    assert big.dim == 1024
    pooled = torch.nn.functional.avg_pool2d(big.means(torch.float64).reshape(-1, 1, 32, 32), 4).flatten(1)
    torch.testing.assert_close(pooled, small.means(torch.float64))
    with pytest.raises(ValueError, match="upsample must be an int >= 1"):
        DigitsMixture(upsample=0)
