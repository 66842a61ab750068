"""The command line as people use it: every user error is one argparse-style line naming the flag, exit 2,
before any work; a model or a training run that goes non-finite exits 1 saying where."""

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
        (["train-digits", "--net", "eps", "--lr", "inf"], "--lr"),
        (["train-digits", "--net", "eps", "--lr", "-1"], "--lr"),
        (["eval", "--final-step", "last"], "--final-step"),
        (["eval", "--precision-floor", "2"], "--precision-floor"),
        (["demo", "--png", "x.png", "--model", "analytic"], "--png"),
        # a folder nobody can create files in (even root): the eval ran for minutes before this was checked
        (["eval", "--out", "/proc/ddim_gmm_out"], "--out"),
        (["demo", "--json", "/proc/ddim_gmm.json"], "--json"),
        # issue 22 item 14, each a traceback (exit 1) or a 37 GB allocation before: checked to fail with the old
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
