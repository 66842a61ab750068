"""The Inception-FID study harness: clean sampler outputs (the last step returns x0_hat), the exact denoiser of a
training set, KID, the paired tests and Holm's correction, the low-rank matched-noise control, the choice of s
with its edge flag, and one tiny stage end to end. Each oracle test names the planted mutation it was checked to
fail under."""

import json
import math

import pytest
import torch

from ddim_gmm_ext.gmm import GMM
from ddim_gmm_ext.quality import exact, fashion, study
from ddim_gmm_ext.quality.fid import InceptionScorer, _poly_kernel_sum, kid, kid_within, uint8_sha256
from ddim_gmm_ext.quality.metrics import frechet_distance, holm, paired_test
from ddim_gmm_ext.quality.sampling import (
    LowRankNoise,
    _add_control_noise,
    sample_ddim,
    training_alphas_cumprod,
    vp_schedule,
)

needs_data = pytest.mark.skipif(not fashion.available(), reason=f"Fashion-MNIST is absent: `{fashion.APT_COMMAND}`")


def _constant_x0_model(target: torch.Tensor):
    """An eps model whose x0_hat is ``target`` [D] at every x and t: eps = (x - a_t target) / b_t."""
    abar = training_alphas_cumprod()

    def model(x, t):
        a, b = abar[int(t[0])].sqrt(), (1 - abar[int(t[0])]).sqrt()
        return ((x.double() - a * target.double()) / b).to(x.dtype)

    return model


@pytest.mark.parametrize("steps, eta", [(7, 0.0), (13, 1.0), (999, 0.0)])
def test_last_step_returns_x0_hat(steps, eta):
    # Mutation checked: vp_schedule ending at abar[0] whatever final_alpha (the old end) fails: the output keeps
    # noise of std b_0 ~ 0.039 around target; so does going to 1 only where the previous timestep is < 0 (999
    # steps: ratio 1, the last step is t = 1 -> 0).
    target = torch.linspace(-1, 1, 16)
    x_T = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    (clean,) = sample_ddim(_constant_x0_model(target), x_T, steps, eta, [None], seed=1)
    torch.testing.assert_close(clean, target.expand(64, 16), atol=1e-5, rtol=0)
    assert vp_schedule(steps)[-1][2] == 1.0
    (old,) = sample_ddim(_constant_x0_model(target), x_T, steps, eta, [None], seed=1, final_alpha="abar0")
    assert float(vp_schedule(steps, "abar0")[-1][2]) == float(training_alphas_cumprod()[0])
    assert (old - target).abs().max() > 1e-3  # latent-diffusion's end keeps part of the noise
    with pytest.raises(ValueError, match="final_alpha"):
        sample_ddim(_constant_x0_model(target), x_T, steps, eta, [None], seed=1, final_alpha="zero")
    with pytest.raises(ValueError, match=r"steps must be in \[1, 999\]"):
        vp_schedule(1000)


def _posterior_mean_bruteforce(images: torch.Tensor, x: torch.Tensor, abar: float) -> torch.Tensor:
    """E[x0 | x_t = x] of the empirical distribution, term by term in float64 (no expansion, no chunks)."""
    a, b = math.sqrt(abar), math.sqrt(1 - abar)
    out = torch.empty(len(x), images.shape[1], dtype=torch.float64)
    for i, xi in enumerate(x.double()):
        logits = torch.stack([-((xi - a * xn) ** 2).sum() / (2 * b * b) for xn in images.double()])
        out[i] = (torch.softmax(logits, 0)[:, None] * images.double()).sum(0)
    return out


@pytest.mark.parametrize("abar", [0.9985, 0.7, 0.05])
@pytest.mark.parametrize("chunk", [2, 100])
def test_exact_denoiser_matches_bruteforce_posterior(abar, chunk):
    # Mutation checked: dropping the a_t scaling of x_n in the logits (|x - x_n|^2) fails at abar 0.7 and 0.05;
    # a running log-sum-exp without the rescale of the accumulator fails with chunk = 2.
    g = torch.Generator().manual_seed(3)
    images = torch.rand(7, 5, generator=g, dtype=torch.float64) * 2 - 1
    x = math.sqrt(abar) * images[torch.tensor([0, 3, 6, 2])] + math.sqrt(1 - abar) * torch.randn(4, 5, generator=g)
    model = exact.ExactDenoiser(images, chunk=chunk)
    torch.testing.assert_close(model.x0(x, abar), _posterior_mean_bruteforce(images, x, abar), rtol=1e-10, atol=1e-12)
    eps = model.eps(x.float(), abar)
    expected = (x - math.sqrt(abar) * _posterior_mean_bruteforce(images, x, abar)) / math.sqrt(1 - abar)
    torch.testing.assert_close(eps.double(), expected, rtol=1e-5, atol=1e-5)


def test_exact_denoiser_identity_and_errors():
    images = torch.zeros(3, 4)
    assert exact.ExactDenoiser(images).identity()["n_train"] == 3
    assert exact.ExactDenoiser(images).identity()["sha256"] != exact.ExactDenoiser(images + 0.5).identity()["sha256"]
    with pytest.raises(ValueError, match="images"):
        exact.ExactDenoiser(torch.zeros(4))
    with pytest.raises(ValueError, match="N must be"):
        exact.load("exact-digits:0")
    with pytest.raises(ValueError, match="exact model"):
        exact.load("exact-cifar")
    with pytest.raises(ValueError, match="one timestep"):
        exact.ExactDenoiser(images).eps_model(torch.zeros(2, 4), torch.tensor([3, 4]))


def test_kid_is_torchmetrics_poly_mmd_and_unbiased():
    # Mutation checked: keeping the kernel's diagonal in the within-set sums (biased MMD) fails both checks; so
    # does a chunked kernel sum that drops the last partial chunk (range(0, len(a) - chunk + 1, chunk)).
    poly_mmd = pytest.importorskip("torchmetrics.image.kid").poly_mmd  # the fid extra (not on the GPU image)

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 8, generator=g, dtype=torch.float64), torch.randn(40, 8, generator=g, dtype=torch.float64)
    assert kid(a, b + 0.2) == pytest.approx(float(poly_mmd(a, b + 0.2)), rel=1e-12)
    # unequal sizes: the explicit unbiased estimator, and ~0 for two samples of one distribution
    c = torch.randn(25, 8, generator=g, dtype=torch.float64)

    def k(u, v):
        return (u @ v.T / 8 + 1) ** 3

    kxx, kyy, kxy = k(a, a), k(c, c), k(a, c)
    expected = (kxx.sum() - kxx.trace()) / (40 * 39) + (kyy.sum() - kyy.trace()) / (25 * 24) - 2 * kxy.mean()
    assert kid(a, c) == pytest.approx(float(expected), rel=1e-10)
    assert _poly_kernel_sum(a, c, 3, 1.0, chunk=7) == pytest.approx(float(kxy.sum()), rel=1e-12)
    assert kid(a, c, real_within=kid_within(a)) == kid(a, c)
    many = torch.randn(4000, 8, generator=g, dtype=torch.float64)
    assert abs(kid(many[:2000], many[2000:])) < 0.01


def test_paired_test_is_scipy_ttest_rel_and_holm():
    # Mutations checked: a one-sided p (stats.t.sf without the factor 2) and Holm without the running maximum
    # (not monotone) each fail.
    from scipy import stats

    a, b = [3.1, 2.0, 4.4, 5.0, 1.2], [2.0, 2.5, 3.0, 3.9, 0.1]
    result = paired_test(a, b)
    reference = stats.ttest_rel(a, b)
    assert result["t"] == pytest.approx(float(reference.statistic)) and result["p"] == pytest.approx(reference.pvalue)
    assert result["se"] == pytest.approx(result["sd"] / math.sqrt(5))
    assert paired_test([1.0], [0.5])["p"] is None
    assert holm([0.01, 0.04, 0.03, None, 0.005]) == pytest.approx([0.03, 0.06, 0.06, None, 0.02])
    assert holm([0.04, 0.001]) == pytest.approx([0.04, 0.002])


def test_low_rank_control_rank_norm_and_shards():
    # Mutation checked: full-rank white noise of the same total variance (z [N, D] / sqrt(D / r)) fails the rank
    # check; a basis drawn per sample shard (sample_offset passed to the basis draw) fails the shard check.
    gmm = GMM.create(48, n_components=5, n_steps=3, variant="ortho-lr", seed=2, scale=2.0)
    entry = LowRankNoise(gmm, (True, True, False))
    x = torch.zeros(3000, 48)
    y = _add_control_noise(x, entry, 1, seed=4)
    priors, offsets, _, _ = gmm.tables(x)
    i = gmm.set_index(1)
    rank = int(torch.linalg.matrix_rank(offsets[i].double()))
    assert int(torch.linalg.matrix_rank(y.double(), rtol=1e-4)) == rank
    total = float((priors[i][:, None] * offsets[i] ** 2).sum())
    assert float((y.double() ** 2).sum(1).mean()) == pytest.approx(total, rel=0.06)
    # the span is random, not the offsets': its projection on the offsets' span is a fraction of it
    q, _ = torch.linalg.qr(offsets[i].double().T)
    assert float(((y.double() @ q) ** 2).sum(1).mean()) < 0.5 * total
    shard = _add_control_noise(x[1000:2000], entry, 1, seed=4, sample_offset=1000)
    torch.testing.assert_close(shard, y[1000:2000])
    assert torch.equal(_add_control_noise(x, entry, 2, seed=4), x)  # not where the GMM does not act


def _rows(fids: dict, phase="select", seeds=(5, 6)):
    return [
        {"phase": phase, "seed": seed, "steps": 10, "eta": 0.0, "variant": v, "scale": s, "fid": f + seed * 0.01}
        for (v, s), f in fids.items()
        for seed in seeds
    ]


def test_chosen_scale_and_edge_flag():
    # Mutation checked: choosing by the largest FID, or never flagging the edge, fails.
    stage = study.Stage("t", "exact-fashion", steps=(10,), etas=(0.0,), variants=("rand",), scales=(0, 0.1, 1, 10))
    inside = {("DDIM", None): 50.0, ("rand", 0.1): 49.0, ("rand", 1): 48.0, ("rand", 10): 60.0}
    choice = study.chosen_scales(_rows(inside), stage, 10, 0.0)["rand"]
    assert choice["scale"] == 1 and choice["edge"] is None
    assert choice["selection_fid"]["0"] == pytest.approx(50.055)  # s = 0 is DDIM (mean over seeds 5, 6)
    upper = {**inside, ("rand", 10): 40.0}
    assert study.chosen_scales(_rows(upper), stage, 10, 0.0)["rand"] == {
        **study.chosen_scales(_rows(upper), stage, 10, 0.0)["rand"],
        "scale": 10,
        "edge": "upper",
    }
    ddim_best = {**inside, ("rand", 0.1): 55.0, ("rand", 1): 56.0}
    assert study.chosen_scales(_rows(ddim_best), stage, 10, 0.0)["rand"]["edge"] == "lower"


class _TinyFeatures(torch.nn.Module):
    """A fixed random feature network on uint8 images [B, 1, 28, 28] (stands in for the Inception in tests)."""

    num_features = 6

    def __init__(self):
        super().__init__()
        self.proj = torch.randn(784, 6, generator=torch.Generator().manual_seed(0)) / 28

    def forward(self, images):
        return (images.float().flatten(1) / 127.5 - 1) @ self.proj


def test_inception_scorer_fid_kid_and_reference_identity():
    # Mutation checked: scoring the reference against itself for FID (real=True on the samples' update) fails.
    pytest.importorskip("torchmetrics")  # the fid extra (not on the GPU image)
    g = torch.Generator().manual_seed(1)
    reference = torch.rand(60, 784, generator=g) * 2 - 1
    samples = torch.rand(50, 784, generator=g) * 2 - 1.2
    scorer = InceptionScorer(reference, "test set [0, 60)", inception=_TinyFeatures())
    assert scorer.reference == {"name": "test set [0, 60)", "n": 60, "sha256": uint8_sha256(reference)}
    out = scorer(samples)
    f_real, f_fake = scorer.features(reference), scorer.features(samples)
    assert out["fid"] == pytest.approx(frechet_distance(f_fake, f_real), rel=1e-6)
    assert out["kid"] == pytest.approx(kid(f_real, f_fake))
    changed = reference.clone()
    changed[3, 5] = -changed[3, 5]
    assert uint8_sha256(changed) != scorer.reference["sha256"]
    assert scorer(samples.clone().fill_(math.nan))["fid"] == math.inf


@needs_data
def test_tiny_stage_end_to_end(tmp_path):
    # One stage (exact denoiser of 300 training images, 2 etas, one variant, 3 scales) records what the issue
    # asks per results file and is resumable; the stage's s is chosen on the selection seeds only.
    pytest.importorskip("torchmetrics")
    stage = study.Stage(
        "tiny",
        "exact-fashion:300",
        steps=(3, 6),
        etas=(0.0, 1.0),
        variants=("ortho-lr",),
        scales=(0.0, 1.0, 3.0),
        samples=12,
        seeds=(0, 1),
        select_seeds=(2,),
        reference=40,
        model_batch=6,
    )
    path = tmp_path / "tiny.json"
    summary = study.run_stage(stage, path, log=lambda _: None, inception=_TinyFeatures())
    payload = json.loads(path.read_text())
    assert payload["model"]["n_train"] == 300 and len(payload["model"]["sha256"]) == 64
    assert payload["reference"]["n"] == 40 and payload["reference"]["name"].startswith("Fashion-MNIST test")
    assert payload["stage"]["scales"] == [0.0, 1.0, 3.0] and payload["stage"]["seeds"] == [0, 1]
    assert "selection_rule" in payload and "paired t-test" in payload["statistics"]
    # the floor is drawn from the exact model's own training set, as its samples are
    assert payload["memorisation"]["train_floor"]["subset"].endswith("of the model's 300 training images")
    assert {r["seed"] for r in payload["rows"] if r["phase"] == "select"} == {2}
    for cell in summary["cells"]:
        choice = cell["variants"]["ortho-lr"]
        assert choice["scale"] in (0.0, 1.0, 3.0) and choice["edge"] in (None, "lower", "upper")
        if choice["scale"] and cell["eta"] == 0.0:
            assert "lowrank" in choice and "noise" in choice
    assert {c["metric"] for c in summary["comparisons"]} == {"fid", "kid"}
    assert all(c["p_holm"] is None or c["p_holm"] >= c["p"] for c in summary["comparisons"])
    assert set(summary["best_gaussian_eta"]) == {3, 6}
    rows = len(payload["rows"])
    study.run_stage(stage, path, log=lambda _: None, inception=_TinyFeatures())  # resumed: nothing re-run
    assert len(json.loads(path.read_text())["rows"]) == rows
