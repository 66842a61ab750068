"""Sample-quality tooling: the metrics against known cases, the shipped digits networks (checksums, sizes,
a quality floor), `ddim-gmm train-digits`, the digits demo and `ddim-gmm eval` end to end on tiny settings,
and the eval's bad-input errors."""

import json
import math
import shutil

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from ddim_gmm_ext import cli  # noqa: E402
from ddim_gmm_ext.quality import digits, evaluate  # noqa: E402
from ddim_gmm_ext.quality.metrics import DigitsQuality, frechet_distance, knn_radii, precision_recall  # noqa: E402
from ddim_gmm_ext.quality.sampling import make_gmms, sample_ddim, samplers  # noqa: E402

SHIPPED = [net for net in digits.NETS if (digits.DATA_DIR / f"digits_{net}.json").exists()]


def zero_model(x, t):
    """A valid (if useless) model for --model module:callable."""
    return torch.zeros_like(x)


def wrong_shape_model(x, t):
    return x[:, :10]


@pytest.fixture(scope="module")
def quality():
    return DigitsQuality()


# -- metrics ------------------------------------------------------------------------------------------------


def test_frechet_distance_known_cases():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=gen, dtype=torch.float64)
    assert abs(frechet_distance(x, x)) < 1e-8
    # Two Gaussians with known moments: FD = |mu|^2 + sum (sigma_x - sigma_y)^2 for diagonal covariances.
    y = 2.0 * torch.randn(200_000, 16, generator=gen, dtype=torch.float64) + 0.5
    z = torch.randn(200_000, 16, generator=gen, dtype=torch.float64)
    assert frechet_distance(y, z) == pytest.approx(16 * 0.25 + 16 * 1.0, rel=0.02)
    noisy = [frechet_distance(x, x + s * torch.randn(x.shape, generator=gen, dtype=x.dtype)) for s in (0.1, 0.5, 1.0)]
    assert noisy[0] < noisy[1] < noisy[2]
    with pytest.raises(ValueError, match="x and y"):
        frechet_distance(x, x[:, :3])


def test_precision_recall_known_cases():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 8, generator=gen)
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)
    # Samples collapsed onto a tenth of the data: all precise, little recall.
    precision, recall = precision_recall(x, x[:30].repeat(10, 1))
    assert precision == 1.0 and recall < 0.3
    # Samples spread twice as wide: recall stays high, precision drops.
    precision, recall = precision_recall(x, 2.0 * torch.randn(300, 8, generator=gen))
    assert precision < 0.7 and recall > 0.8
    with pytest.raises(ValueError, match="k = 3"):
        precision_recall(x, x[:3])


def test_knn_radii_in_chunks_and_cached():
    """The chunked radii are the k-th nearest other point's distance (checked against the whole distance matrix;
    fails with the self-distance index k - 1 in ``knn_radii``), and precomputed reference radii give the same
    precision / recall as computing them in the call."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(301, 8, generator=gen, dtype=torch.float64)
    whole = torch.cdist(x, x).kthvalue(4, dim=1).values
    for chunk in (1, 7, 1024):
        torch.testing.assert_close(knn_radii(x, 3, chunk=chunk), whole, rtol=1e-12, atol=1e-12)
    fake = 1.3 * torch.randn(200, 8, generator=gen)
    assert precision_recall(x, fake, 3, knn_radii(x, 3)) == precision_recall(x, fake, 3)
    with pytest.raises(ValueError, match=r"real_radii must be \[301\]"):
        precision_recall(x, fake, 3, knn_radii(x, 3)[:5])


def test_digits_quality_of_real_and_noise(quality):
    real = quality.real
    perfect = quality(real)
    assert abs(perfect["fd"]) < 1e-6 and perfect["precision"] == 1.0 and perfect["recall"] == 1.0
    noise = quality(torch.rand(500, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert noise["fd"] > 50 * quality(real[:500])["fd"] and noise["precision"] < 0.1
    # Diverged samples count as misses and make the FD infinite instead of stopping a sweep.
    diverged = real[:400].clone()
    diverged[:100, 3] = float("nan")
    assert quality(diverged) == {"fd": math.inf, "precision": 0.75, "recall": quality(real[100:400])["recall"]}
    assert quality(torch.full((10, 64), float("inf")))["fd"] == math.inf


# -- shipped networks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("net", SHIPPED)
def test_shipped_weights_match_manifest(net, tmp_path):
    info = digits.manifest(net)
    weights = digits.DATA_DIR / info["file"]
    assert digits.sha256(weights) == info["sha256"]
    assert weights.stat().st_size < 3 * 2**20
    model = digits.load(net)
    assert digits.n_parameters(model) == info["parameters"]
    for key in ("command", "seed", "final_loss", "date"):
        assert key in info
    # A modified copy is refused.
    shutil.copy(digits.DATA_DIR / f"digits_{net}.json", tmp_path)
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    (tmp_path / info["file"]).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        digits.load(net, tmp_path)


def test_all_networks_are_shipped():
    assert set(SHIPPED) == set(digits.NETS)
    assert digits.manifest("classifier")["heldout_accuracy"] > 0.95


def test_shipped_eps_model_makes_digits(quality):
    """10-step DDIM samples of the shipped model: most land on the digits manifold."""
    x_T = torch.randn(300, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (x0,) = sample_ddim(digits.load("eps"), x_T, 10, 0.0, [None], seed=0)
    metrics = quality(x0)
    assert metrics["precision"] > 0.6 and metrics["recall"] > 0.5, metrics


@pytest.mark.parametrize("net", ["eps", "flow", "classifier"])
def test_training_is_seeded(net, tmp_path):
    """The same seed gives the same weights; another seed does not."""
    runs = [
        digits.train(net, tmp_path / str(i), iters=3, batch=8, lr=1e-3, seed=seed, progress=False)
        for i, seed in enumerate([5, 5, 6])
    ]
    assert runs[0]["final_loss"] == runs[1]["final_loss"] != runs[2]["final_loss"]
    weights = [torch.load(tmp_path / str(i) / f"digits_{net}.pt", weights_only=True) for i in range(3)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_train_digits_writes_a_loadable_manifest(tmp_path, capsys):
    for net in ("eps", "classifier"):
        assert (
            cli.main(
                ["train-digits", "--net", net, "--iters", "3", "--batch", "8", "--out", str(tmp_path), "--no-progress"]
            )
            == 0
        )
        info = json.loads((tmp_path / f"digits_{net}.json").read_text())
        assert info["command"].startswith(f"ddim-gmm train-digits --net {net} --iters 3")
        model = digits.load(net, tmp_path)
        out = model(torch.zeros(2, 64), torch.zeros(2)) if net == "eps" else model(torch.zeros(2, 64))
        assert out.shape == ((2, 64) if net == "eps" else (2, 10))


# -- demo and eval ------------------------------------------------------------------------------------------


def test_digits_demo_runs_end_to_end(tmp_path, capsys, monkeypatch):
    """The four rows with the spread over seeds, the paired differences and the clip fractions; the control is
    DDIM plus the matched noise of the seed's tables at the mixture's steps; the speed line, or why it is
    skipped."""
    from ddim_gmm_ext.gmm import gmm_step_mask
    from ddim_gmm_ext.quality import demo
    from ddim_gmm_ext.quality.sampling import MatchedNoise, ddim_noise_stds

    assert demo.DEMO_DEFAULTS["digits"]["steps"] == [5] and demo.DEMO_DEFAULTS["digits"]["etas"] == [1.0]
    png, out = tmp_path / "demo.png", tmp_path / "demo.json"
    monkeypatch.setattr(demo, "SPEED_CALLS", 3)
    argv = ["demo", "--samples", "40", "--steps", "3", "--seeds", "0", "1", "--png", str(png), "--json", str(out)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    labels = list(demo.ROWS)
    assert all(label in text for label in labels) and "dFD vs DDIM" in text and "±" in text
    assert "DDIMScheduler.step" in text
    assert png.stat().st_size > 1000
    result = json.loads(out.read_text())
    assert [r["sampler"] for r in result["rows"]] == labels * 2 and [r["seed"] for r in result["rows"]] == [0] * 4 + [
        1
    ] * 4
    summary = {e["sampler"]: e for e in result["summary"]}
    assert summary[demo.DDIM_ROW]["fd_diff"] == 0 and summary[demo.GMM_ROW]["seeds"] == 2
    clips = {r["sampler"]: r["clip_fraction"] for r in result["rows"][4:]}
    assert clips[demo.DDIM_ROW] is None and clips[demo.CONTROL_ROW] is None and clips[demo.MATCHED_ROW] == 0
    # the control row, rebuilt from its definition (seed 1): DDIM plus matched noise where the mixture acts
    # (mutation checked: the control built with every step acting, the last one included, differs)
    model, sampler = evaluate.load_model("digits"), next(samplers([1.0], ("ortho-lr",), None))
    (gmm,) = make_gmms([sampler], 64, 8, 3, 1)
    acts = tuple(gmm_step_mask("all", gmm, ddim_noise_stds(3, 1.0), [1.0, 1.0, 0.0]))
    with torch.no_grad():
        (x0,) = sample_ddim(model, evaluate.sweep_initial_noise(40, 64, 1), 3, 1.0, [MatchedNoise(gmm, acts)], 1)
    control = DigitsQuality()(x0)
    assert result["rows"][6]["fd"] == pytest.approx(control["fd"], rel=1e-6)
    monkeypatch.setattr(demo, "step_speed", lambda eta: None)  # a .[demo] install has no diffusers
    assert cli.main([*argv[:-2], "--seeds", "0"]) == 0
    assert "diffusers is not installed" in capsys.readouterr().out
    for args, message in (
        (["--steps", "5", "10"], "one value of --steps"),
        (["--sigma0", "0.2"], "--sigma0"),
        (["--components", "64"], "--components"),
    ):
        with pytest.raises(SystemExit) as info:
            cli.main(["demo", *args])
        assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("family", ["ddim", "rfim"])
def test_eval_quick_writes_its_files(tmp_path, family):
    args = [
        "eval",
        "--family",
        family,
        "--quick",
        "--samples",
        "16",
        "--steps",
        "2",
        "--etas",
        "0",
        "0.2",
        "--scales",
        "1",
        "--variants",
        "rand",
        "ortho-vub*",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    assert cli.main(args) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    # seeds x etas x (baseline + 2 variants at one scale + their per-step matched-noise controls)
    assert len(result["rows"]) == 2 * 2 * 5
    assert (tmp_path / "results.csv").read_text().count("\n") == 1 + 20
    assert all(e["seeds"] == 2 and "fd_diff_std" in e for e in result["summary"])
    table = (tmp_path / "table.md").read_text()
    assert "(1)" in table and "Paired differences" in table
    assert (tmp_path / "quality.png").stat().st_size > 1000


def test_eval_accepts_a_module_callable(tmp_path):
    assert (
        cli.main(
            [
                "eval",
                "--model",
                f"{__name__}:zero_model",
                "--quick",
                "--samples",
                "8",
                "--steps",
                "1",
                "--etas",
                "0",
                "--scales",
                "1",
                "--out",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "results.json").read_text())["config"]["model"] == f"{__name__}:zero_model"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no_such_module_xyz:f"], "cannot be imported"),
        (["--model", "torch"], "module:callable"),
        (["--model", f"{__name__}:wrong_shape_model"], r"shape \[2, 64\]"),
        (["--model", "torch:zeros_like"], "fails on"),
        (["--variants", "ortho", "bogus"], "unknown \\['bogus'\\]"),
        (["--components", "64"], "components"),
    ],
)
def test_eval_rejects_bad_input_before_sampling(args, message, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "run", lambda *a, **k: pytest.fail("sampling started"))
    with pytest.raises(SystemExit) as info:
        cli.main(["eval", "--quick", *args])
    assert info.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err)


@pytest.mark.parametrize("args", [["--steps", "0"], ["--scales", "-1"], ["--etas", "-0.5"]])
def test_eval_rejects_bad_numbers(args, capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", *args])
    assert f"argument {args[0]}: must be" in capsys.readouterr().err


def test_paired_samplers_share_noise_and_tables():
    """Every sampler of a seed starts from the same x_T; with s = 0 the GMM samplers equal DDIM exactly."""
    sampler_list = list(samplers([0.0], ["ortho-vub", "rand"]))
    gmms = make_gmms(sampler_list, 64, 8, 3, seed=0)
    x_T = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    xs = sample_ddim(zero_model, x_T, 3, 1.0, gmms, seed=0)
    for x in xs[1:]:
        torch.testing.assert_close(x, xs[0])


@pytest.mark.parametrize("family", ["ddim", "rfim"])
def test_final_step_gaussian_drops_only_the_last_mixture(family):
    """One step: "gaussian" gives DDIM / RFIM exactly, "gmm" does not; the per-coordinate scale gives the same
    GMM as s = scale_per_dim * sqrt(D). Checked to fail when step_gmm ignores final_step (returns gmm always)."""
    from ddim_gmm_ext.quality.sampling import sample_rfim

    sample = sample_ddim if family == "ddim" else sample_rfim
    eta = 1.0 if family == "ddim" else 0.5
    sampler_list = list(samplers([1.0], ["ortho-vub"]))
    x_T = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    for steps in (1, 3):
        gmms = make_gmms(sampler_list, 64, 8, steps, seed=0)
        base, gauss = sample(zero_model, x_T, steps, eta, gmms, seed=0, final_step="gaussian")
        _, mixed = sample(zero_model, x_T, steps, eta, gmms, seed=0, final_step="gmm")
        assert not torch.allclose(gauss, mixed)
        if steps == 1:
            torch.testing.assert_close(gauss, base)
    per_dim = make_gmms(list(samplers([1.0 / 8], ["ortho-vub"], per_dim=True)), 64, 8, 3, seed=0, per_dim=True)
    _, x_per_dim = sample(zero_model, x_T, 3, eta, per_dim, seed=0, final_step="gmm")
    torch.testing.assert_close(x_per_dim, mixed)
    with pytest.raises(ValueError, match="final_step"):
        sample(zero_model, x_T, 1, eta, gmms, seed=0, final_step="last")


def test_matched_output_noise_has_the_last_step_offsets_second_moment():
    """At eta = 0 a one-step GMM sampler's output differs from DDIM's by exactly the drawn offset; the control's
    added noise has the same mean square per coordinate. Checked to fail with the priors' weighting dropped
    (sum_k delta_k^2: K times too large) and with the variance used as the std."""
    from ddim_gmm_ext.quality.sampling import matched_output_noise

    sampler_list = list(samplers([2.0], ["ortho", "rand"]))
    gmms = make_gmms(sampler_list, 64, 8, 1, seed=3)
    x_T = torch.randn(4000, 64, generator=torch.Generator().manual_seed(0))
    xs = sample_ddim(zero_model, x_T, 1, 0.0, gmms, seed=3, final_step="gmm")
    for x_gmm, gmm in zip(xs[1:], gmms[1:], strict=True):
        added = ((x_gmm - xs[0]) ** 2).mean()
        control = ((matched_output_noise(xs[0], gmm, 1, seed=3) - xs[0]) ** 2).mean()
        assert abs(control / added - 1) < 0.05, (float(control), float(added))


def test_eval_with_controls_and_precision_floor(tmp_path):
    """A control row per GMM sampler (at s = 0 it is DDIM); a floor of 1.0 refuses settings that lose precision."""
    sweep = evaluate.Sweep(
        steps=(3,),
        etas=(1.0,),
        variants=("ortho-vub",),
        scales=(0.0, 3.0),
        samples=60,
        seeds=(0, 1),
        final_step="gmm",
        precision_floor=1.0,
    )
    result = evaluate.run(zero_model, sweep, DigitsQuality(), progress=False)
    names = {r["sampler"] for r in result["rows"]}
    assert "DDIM+noise~GMM-ORTHO-VUB s=3" in names and len(names) == 5
    zero = [r for r in result["rows"] if r["sampler"] == "DDIM+noise~GMM-ORTHO-VUB s=0"]
    base = [r for r in result["rows"] if r["sampler"] == "DDIM"]
    assert [r["fd"] for r in zero] == pytest.approx([r["fd"] for r in base])
    base_p = next(e["precision"] for e in result["summary"] if e["scale"] is None)
    gmm_best = [e for e in result["best"] if not e["variant"].startswith(evaluate.CONTROL_PREFIX)]
    assert gmm_best and all(e["precision"] >= base_p for e in gmm_best)
    assert "±" in evaluate.table_markdown(result, sweep, "zero")


def _summary_entry(variant, scale, fd, precision=0.8):
    return {
        "steps": 5,
        "eta": 1.0,
        "sampler": f"{variant} s={scale}",
        "variant": variant,
        "scale": scale,
        "fd": fd,
        "precision": precision,
    }


def test_best_scales_reports_each_control_at_its_gmms_scale():
    """The matched-noise control is the GMM's added variance: it is reported at the s chosen for its GMM (here
    s = 1), not at its own best s (3, lower FD), and left out where every s of the GMM is refused (ortho-lr:
    precision under the floor). Mutation checked: choosing controls like any variant fails both asserts."""
    summary = [
        _summary_entry("DDIM", None, 10.0),
        _summary_entry("rand", 1, 8.0),
        _summary_entry("rand", 3, 9.0),
        _summary_entry("noise~rand", 1, 8.5),
        _summary_entry("noise~rand", 3, 7.0),
        _summary_entry("ortho-lr", 1, 5.0, precision=0.5),
        _summary_entry("noise~ortho-lr", 1, 6.0),
    ]
    best = {e["variant"]: e["scale"] for e in evaluate.best_scales(summary, precision_floor=0.9)}
    assert best == {"DDIM": None, "rand": 1, "noise~rand": 1}
