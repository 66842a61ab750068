"""The command line as people use it: every user error is one argparse-style line naming the flag, exit 2,
before any work; a model or a training run that goes non-finite exits 1 saying where."""

import json
import sys
import types

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from ddim_gmm_ext import cli  # noqa: E402


def _no_work(*_, **__):
    raise AssertionError("work started before the arguments were checked")


@pytest.mark.parametrize(
    "args, flag",
    [
        (["eval", "--out", "{file}"], "--out"),
        (["eval", "--out", "{missing}/sub"], "--out"),
        (["train-digits", "--net", "eps", "--out", "{file}"], "--out"),
        (["demo", "--png", "{missing}/x.png"], "--png"),
        (["demo", "--json", "{dir}"], "--json"),
        (["eval", "--seeds", "-1"], "--seeds"),
        (["eval", "--seeds", str(2**64)], "--seeds"),
        (["demo", "--seeds", "1.5"], "--seeds"),
        (["train-digits", "--net", "eps", "--seed", str(2**64)], "--seed"),
        (["eval", "--etas", "1.5"], "--etas"),
        (["demo", "--etas", "nan"], "--etas"),
        (["eval", "--components", "64"], "--components"),
        (["demo", "--components", "100"], "--components"),
        (["demo", "--model", "analytic", "--sigma0", "0"], "--sigma0"),
        (["demo", "--model", "analytic", "--sigma0", "nan"], "--sigma0"),
        (["demo", "--steps", "1001"], "--steps"),
        (["eval", "--steps", "1001"], "steps"),
        # 1000 steps reach t = 1000 with the leading timesteps + 1: a traceback from the schedule before (checked
        # to fail with the old bound of 1000)
        (["demo", "--steps", "1000"], "--steps"),
        (["eval", "--steps", "1000"], "steps"),
        (["sample", "--steps", "1000", "--out", "{dir}/s.npz"], "--steps"),
        (["train-digits", "--net", "eps", "--lr", "inf"], "--lr"),
        (["train-digits", "--net", "eps", "--lr", "-1"], "--lr"),
        (["eval", "--final-step", "last"], "--final-step"),
        (["eval", "--precision-floor", "2"], "--precision-floor"),
        (["demo", "--png", "x.png", "--model", "analytic"], "--png"),
        # a folder nobody can create files in (even root): the eval ran for minutes before this was checked
        (["eval", "--out", "/proc/ddim_gmm_out"], "--out"),
        (["demo", "--json", "/proc/ddim_gmm.json"], "--json"),
        # each a traceback (exit 1) or a 37 GB allocation before: checked to fail with the old
        # _nonnegative_float / _positive_float / unbounded --upsample
        (["eval", "--scales", "1e300"], "--scales"),
        (["demo", "--scales", "1e7"], "--scales"),
        (["demo", "--model", "analytic", "--scale-per-dim", "--scales", "2e5"], "--scales"),  # s = 1.6e6
        (["demo", "--model", "analytic", "--sigma0", "1e-300"], "--sigma0"),
        (["demo", "--model", "analytic", "--sigma0", "1e300"], "--sigma0"),
        (["demo", "--model", "analytic", "--upsample", "200"], "--upsample"),
        (["demo", "--model", "analytic", "--upsample", "2", "--components", "256"], "--components"),
        (["demo", "--upsample", "2"], "--upsample"),
        (["demo", "--final-step", "gmm"], "--final-step"),
        (["eval", "--model", "int_model:eps"], "--model"),
    ],
)
def test_user_errors_exit_2_naming_the_flag_before_any_work(args, flag, tmp_path, monkeypatch, capsys):
    """Checked to fail with _eta unbounded above (the --etas 1.5 row then reaches the work)."""
    from ddim_gmm_ext.quality import demo, digits, evaluate

    (tmp_path / "file").write_text("")
    paths = {"file": tmp_path / "file", "missing": tmp_path / "missing", "dir": tmp_path}
    args = [a.format(**paths) for a in args]
    for module, name in ((evaluate, "run"), (digits, "train"), (demo, "run_analytic"), (demo, "run_digits")):
        monkeypatch.setattr(module, name, _no_work)
    int_model = types.ModuleType("int_model")  # returns int64: failed inside the first step with a traceback
    int_model.eps = lambda x, t: torch.zeros(x.shape, dtype=torch.int64)
    monkeypatch.setitem(sys.modules, "int_model", int_model)
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"ddim-gmm {args[0]}: error:") and flag in err[-1], err


def test_eval_with_a_model_that_turns_nan_exits_1_naming_the_step(tmp_path, monkeypatch, capsys):
    """A model finite at t = 999 (the load check passes) but NaN for t < 500. Checked to fail with the
    sampling loop's check_finite call removed (eval then writes NaN metrics and exits 0)."""
    module = types.ModuleType("nan_late_model")
    module.eps = lambda x, t: torch.where(t[:, None] < 500, torch.nan, 0.1 * x)
    monkeypatch.setitem(sys.modules, "nan_late_model", module)
    code = cli.main(
        ["eval", "--model", "nan_late_model:eps", "--steps", "3", "--etas", "0", "--variants", "ortho",
         "--scales", "1", "--samples", "8", "--seeds", "0", "--out", str(tmp_path / "o"), "--no-progress"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "non-finite at step 1" in err and "samples [0, 1" in err, err
    assert not (tmp_path / "o" / "results.json").exists()


def test_train_with_infinite_loss_exits_1_naming_the_step(tmp_path, monkeypatch, capsys):
    """A huge finite learning rate diverges; training stops at the first non-finite loss instead of writing NaN
    weights. Checked to fail with check_finite_loss removed from train_denoiser."""
    code = cli.main(
        ["train-digits", "--net", "eps", "--iters", "200", "--batch", "16", "--lr", "1e30", "--out", str(tmp_path),
         "--no-progress"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "non-finite" in err and "optimiser step" in err, err
    assert not (tmp_path / "digits_eps.pt").exists()


def test_analytic_demo_takes_k_below_its_own_dimension(monkeypatch):
    # D = 64 u^2: --upsample 2 --components 100 is valid (D = 256); it was refused naming D = 64. Checked to fail
    # with K bounded by 64 in the option's type.
    from ddim_gmm_ext.quality import demo

    seen = []
    monkeypatch.setattr(demo, "analytic_demo", lambda args: seen.append(args) or 0)
    assert cli.main(["demo", "--model", "analytic", "--upsample", "2", "--components", "100"]) == 0
    assert seen[0].components == 100 and seen[0].upsample == 2 and seen[0].final_step == "gaussian"


# -- damaged inputs, bounds: parser errors before any work or any file (the Fashion-MNIST files are synthesised:
# the CI step without Debian's package runs these too) ---------------------------------------------------------


def _write_idx(path, magic, shape, body=None):
    import gzip

    import numpy as np

    header = np.array([magic, *shape], dtype=">u4").tobytes()
    body = np.zeros(shape, dtype=np.uint8).tobytes() if body is None else body
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header + body)


@pytest.fixture
def fashion_dir(tmp_path, monkeypatch):
    """A complete, valid Fashion-MNIST folder (zeros) that DDIM_GMM_FASHION_DIR points at."""
    from ddim_gmm_ext.quality import fashion

    folder = tmp_path / "fashion"
    folder.mkdir()
    for split, (images, labels) in fashion.FILES.items():
        n = fashion.SIZES[split]
        _write_idx(folder / images, 0x803, (n, 28, 28))
        _write_idx(folder / labels, 0x801, (n,))
    monkeypatch.setenv("DDIM_GMM_FASHION_DIR", str(folder))
    return folder


def _damage(path, how):
    import gzip

    raw = path.read_bytes()
    if how == "not gzip":  # BadGzipFile
        path.write_bytes(b"not a gzip file at all")
    elif how == "cut off":  # EOFError
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "empty":  # IndexError on the header
        path.write_bytes(gzip.compress(b""))
    elif how == "short":  # reshape ValueError naming nothing
        path.write_bytes(gzip.compress(gzip.decompress(raw)[:-7]))
    elif how == "label 10":  # IndexError in the classifier's loss
        data = bytearray(gzip.decompress(raw))
        data[-1] = 10
        path.write_bytes(gzip.compress(bytes(data)))


def _parser_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"ddim-gmm {argv[0]}: error:"), err
    return err


@pytest.mark.parametrize(
    "split, how",
    [("test", "not gzip"), ("test", "cut off"), ("train", "empty"), ("train", "short"), ("test", "label 10")],
)
def test_damaged_fashion_data_is_a_parser_error_before_out_is_created(fashion_dir, split, how, tmp_path, capsys):
    """Each damage was a traceback (BadGzipFile, EOFError, IndexError, ValueError) and the test split was read
    only after training, into an --out and a log created first. Checked to fail with _read_idx's try / length /
    label checks removed, with train-fashion checking only the train split, and with the data check moved after
    --out's mkdir."""
    from ddim_gmm_ext.quality import evaluate, fashion

    images, labels = fashion.FILES[split]
    damaged = fashion_dir / (labels if how == "label 10" else images)
    _damage(damaged, how)
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fashion, "train", _no_work)
        patch.setattr(evaluate, "run", _no_work)
        err = _parser_error(capsys, ["train-fashion", "--net", "classifier", "--out", str(out)])
        assert str(damaged) in err and "dataset-fashion-mnist" in err, err
        assert not out.exists()
        if split == "test":
            err = _parser_error(capsys, ["eval", "--model", "fashion", "--out", str(out)])
            assert str(damaged) in err, err


def _checkpoint(path, how):
    if how == "empty":  # EOFError
        path.write_bytes(b"")
    elif how == "text":  # UnpicklingError / KeyError from the unpickler
        path.write_bytes(b"hello\n")
    elif how == "cut off":  # RuntimeError from the zip reader
        torch.save({"net": "eps", "model": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif how == "a list":  # loads, then IndexError / TypeError on state["net"]
        torch.save([1, 2], path)


@pytest.mark.parametrize("how", ["empty", "text", "cut off", "a list"])
def test_damaged_checkpoint_is_a_parser_error_naming_it_before_any_file(how, fashion_dir, tmp_path, capsys):
    """--resume (and --model fashion:X.ckpt) on a damaged checkpoint was a traceback after the log was opened.
    Checked to fail with read_checkpoint's key check removed (the list) and with load_torch_file's except clause
    narrowed to ValueError (the others)."""
    from ddim_gmm_ext.quality import fashion

    out = tmp_path / "run"
    out.mkdir()
    ckpt = fashion.checkpoint_path(out, "eps")
    _checkpoint(ckpt, how)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fashion, "train", _no_work)
        err = _parser_error(capsys, ["train-fashion", "--resume", "--out", str(out)])
    assert "--resume" in err and str(ckpt) in err and "checkpoint" in err, err
    assert sorted(p.name for p in out.iterdir()) == [ckpt.name]  # no log
    err = _parser_error(capsys, ["sample", "--model", f"fashion:{ckpt}", "--out", str(tmp_path / "s.npz")])
    assert "--model" in err and str(ckpt) in err, err


def test_resume_with_other_options_is_refused_before_the_log_and_the_data(tmp_path, capsys, monkeypatch):
    """Checked to fail with the CLI's resume_state call removed (fashion.train raised it after opening the log)."""
    from ddim_gmm_ext.quality import fashion

    gen = torch.Generator().manual_seed(0)
    data = (torch.rand(8, 1, 28, 28, generator=gen) * 2 - 1, torch.arange(8))
    fashion.train("classifier", tmp_path, 2, 4, 1e-3, 0, ckpt_every=1, progress=False, data=data)
    monkeypatch.setenv("DDIM_GMM_FASHION_DIR", str(tmp_path / "none"))  # the data would be refused next
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ["train-fashion", "--net", "classifier", "--resume", "--iters", "4", "--batch", "4", "--out", str(tmp_path)]
    err = _parser_error(capsys, argv)  # the checkpoint matches: the (absent) data is refused next
    assert "Fashion-MNIST not found" in err, err
    err = _parser_error(capsys, [*argv[:-2], "--seed", "1", "--out", str(tmp_path)])
    assert "--resume" in err and "seed = 0, not 1" in err, err
    err = _parser_error(capsys, [*argv[:4], "--iters", "1", "--batch", "4", "--out", str(tmp_path)])
    assert "beyond --iters 1" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_sample_without_a_gmm_takes_any_dimension(tmp_path, monkeypatch, capsys):
    """`sample --dim 4` with the GMM off was refused for K = 8 >= D. Checked to fail with the K check applied
    whatever the variant."""
    module = types.ModuleType("small_model")
    module.eps = lambda x, t: 0.1 * x
    monkeypatch.setitem(sys.modules, "small_model", module)
    out = tmp_path / "s.npz"
    assert cli.main(["sample", "--model", "small_model:eps", "--dim", "4", "--samples", "3", "--steps", "2",
                     "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    from ddim_gmm_ext.quality import generate

    samples, config = generate.read(out)
    assert samples.shape == (3, 4) and config["variant"] is None
    err = _parser_error(capsys, ["sample", "--model", "small_model:eps", "--dim", "4", "--variant", "ortho",
                                 "--out", str(out)])  # fmt: skip
    assert "--components" in err and "D = 4" in err, err


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["sample", "--samples", str(10**12), "--out", "{tmp}/s.npz"], "--samples"),
        (["sample", "--model", "small_model:eps", "--dim", str(10**15), "--samples", "1", "--out", "{tmp}/s.npz"],
         "--dim"),
        (["eval", "--samples", str(10**12)], "--samples"),
        (["train-fashion", "--batch", str(10**9), "--out", "{tmp}/o"], "--batch"),
    ],
)  # fmt: skip
def test_sizes_beyond_the_machines_memory_are_parser_errors(argv, flag, tmp_path, monkeypatch, capsys):
    """No machine has these petabytes: each was an allocator traceback after the model loaded. Checked to fail
    with _check_samples_memory / the --batch _check_memory call removed."""
    from ddim_gmm_ext.quality import evaluate, fashion

    module = types.ModuleType("small_model")
    module.eps = _no_work  # the memory check comes before the model is loaded
    monkeypatch.setitem(sys.modules, "small_model", module)
    monkeypatch.setattr(evaluate, "run", _no_work)
    monkeypatch.setattr(fashion, "train", _no_work)
    err = _parser_error(capsys, [a.format(tmp=tmp_path) for a in argv])
    assert flag in err and "GiB" in err and "memory" in err, err
    assert not (tmp_path / "o").exists()


def test_the_memory_bounds_follow_the_measured_bytes(monkeypatch, capsys, tmp_path):
    """With 1 GiB of memory the eps batch bound is 128 (8 MiB an image) and the sample bound 2^30 / 24 values.
    Checked to fail with TRAIN_BYTES_PER_IMAGE["eps"] halved."""
    from ddim_gmm_ext.quality import fashion

    monkeypatch.setattr(cli, "_memory", lambda: 1 << 30)
    seen = []
    monkeypatch.setattr(fashion, "train", lambda *a, **k: seen.append(a[3]) or {"ok": True})
    monkeypatch.setattr(cli, "_fashion_data_check", lambda *a: None)
    assert cli.main(["train-fashion", "--batch", "128", "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    assert seen == [128]
    err = _parser_error(capsys, ["train-fashion", "--batch", "129", "--out", str(tmp_path / "b")])
    assert "--batch" in err and "129 images" in err, err
    limit = (1 << 30) // cli.SAMPLE_BYTES_PER_VALUE // 784
    err = _parser_error(capsys, ["sample", "--samples", str(limit + 1), "--out", str(tmp_path / "s.npz")])
    assert "--samples" in err, err


def test_eval_reference_above_the_test_set_is_a_parser_error(monkeypatch, capsys, tmp_path):
    """It was silently capped at the 10,000 test images. Checked to fail with the --reference bound removed."""
    from ddim_gmm_ext.quality import evaluate

    monkeypatch.setattr(evaluate, "run", _no_work)
    err = _parser_error(capsys, ["eval", "--model", "fashion", "--reference", "10001", "--out", str(tmp_path / "o")])
    assert "--reference" in err and "10000" in err, err


def test_damaged_manifest_or_weights_of_a_model_folder_are_parser_errors(tmp_path, capsys):
    """--model fashion:FOLDER whose manifest is not JSON (the message named no file), or whose weights match the
    manifest's sha256 but are not a torch file (UnpicklingError traceback). Checked to fail with
    shipped_manifest's plain json.loads and with verified_weights' plain torch.load."""
    from ddim_gmm_ext.quality import digits

    folder = tmp_path / "model"
    folder.mkdir()
    manifest = folder / "fashion_eps.json"
    manifest.write_text("{not json")
    argv = ["sample", "--model", f"fashion:{folder}", "--out", str(tmp_path / "s.npz")]
    err = _parser_error(capsys, argv)
    assert str(manifest) in err and "manifest" in err, err
    weights = folder / "fashion_eps.pt"
    weights.write_bytes(b"not a torch file")
    manifest.write_text(json.dumps({"file": weights.name, "sha256": digits.sha256(weights), "architecture": {}}))
    err = _parser_error(capsys, argv)
    assert str(weights) in err and "not a readable weights file" in err, err
    assert not (tmp_path / "s.npz").exists()
