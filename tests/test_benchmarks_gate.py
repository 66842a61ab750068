"""The benchmark regression gate's comparison (benchmarks/gate.py) on fake results: the baseline and margin a
set of runs gives, a planted regression failing and naming its case, a ratio within the spread passing, missing
and new cases, what a refresh reports as moved, and the results files. Nothing here is timed."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def gate(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gate

    return gate


def _summary(median, q1=None, q3=None, rounds=50, name="case", group="scheduler"):
    q1 = median * 0.99 if q1 is None else q1
    q3 = median * 1.01 if q3 is None else q3
    return {"case": name, "group": group, "rounds": rounds, "ratio": {"median": median, "q1": q1, "q3": q3},
            "ours_us": 10.0, "upstream_us": 10.0 * median}  # fmt: skip


def _run(ratios: dict, load=0.5):
    return {
        "date": "2026-12-06 20:00:00 UTC",
        "commit": "0" * 40,
        "dirty": False,
        "machine": {"cpu_model": "AMD EPYC", "cpu_count": 2, "torch_threads": 1, "processor": "x86_64"},
        "versions": {"python": "3.11", "torch": "2.13.0", "diffusers": "0.42.1", "ddim_gmm_ext": "0"},
        "load": {"before": [load, load, load], "after": [load, load, load], "note": ""},
        "duration_s": 1.0,
        "cases": [_summary(r, name=name) for name, r in ratios.items()],
    }


def test_the_baseline_is_the_median_run_and_the_margin_follows_the_spread_across_runs(gate):
    # The centre and the spread are the median and the median absolute deviation of log ratio over the runs, so
    # one run taken during a burst of load (3.0 here) moves neither. Checked to fail with the margin taken as
    # the floor alone (spread ignored), with the centre as the mean and with the spread as the standard deviation.
    ratios = (2.0, 2.2, 1.95, 2.05, 3.0)
    b = gate.baseline_case([_summary(r) for r in ratios])
    logs = [math.log(r / 2.05) for r in ratios]
    sigma = 1.4826 * sorted(abs(x) for x in logs)[2]
    assert b["ratio"] == pytest.approx(2.05)
    assert b["sigma_between_runs"] == pytest.approx(sigma)
    assert b["margin_log"] == pytest.approx(gate.K_SIGMA * sigma) and b["margin_log"] < 0.35
    assert b["limit"] == pytest.approx(2.05 * math.exp(-gate.K_SIGMA * sigma))


def test_runs_that_agree_exactly_keep_the_margin_their_rounds_justify(gate):
    # Five identical medians (between-run sd 0) from rounds with a wide IQR: the margin comes from one run's
    # standard error of the median, not the floor. Checked to fail with the within-run term left out.
    runs = [_summary(2.0, q1=1.6, q3=2.5, rounds=25) for _ in range(5)]
    b = gate.baseline_case(runs)
    se = math.sqrt(math.pi / 2) * math.log(2.5 / 1.6) / 1.349 / 5
    assert b["sigma_between_runs"] == 0.0
    assert b["sigma_within_run"] == pytest.approx(se)
    assert b["margin_log"] == pytest.approx(gate.K_SIGMA * se) and b["margin_log"] > gate.MARGIN_FLOOR
    # and with tight rounds the floor holds
    tight = gate.baseline_case([_summary(2.0, q1=1.999, q3=2.001) for _ in range(5)])
    assert tight["margin_log"] == gate.MARGIN_FLOOR


def test_the_op_group_keeps_its_wider_floor_in_a_built_baseline(gate):
    # An op-vs-copy case moves further between sessions than a scheduler case (gate.GROUP_FLOOR): the baseline
    # built from whole runs gives each case its group's floor. Checked to fail with build_baseline passing no group.
    runs = [_run({"op vs copy": 0.3, "DDIM vs diffusers": 4.0}) for _ in range(5)]
    for run in runs:
        run["cases"][0]["group"] = "op"
    cases = gate.build_baseline(runs)["cases"]
    assert cases["op vs copy"]["margin_log"] == gate.GROUP_FLOOR["op"] > gate.MARGIN_FLOOR
    assert cases["DDIM vs diffusers"]["margin_log"] == gate.MARGIN_FLOOR


def _baseline(gate):
    runs = [_run({"DDIM vs diffusers": r, "thin_svd vs torch.linalg.svd": s}) for r, s in
            ((3.6, 2.4), (3.7, 2.35), (3.5, 2.45), (3.65, 2.4), (3.55, 2.38))]  # fmt: skip
    return gate.build_baseline(runs)


def test_a_planted_regression_fails_naming_its_case_and_a_ratio_within_the_spread_passes(gate):
    # Checked to fail with the comparison's sign flipped (ratio > limit fails) and with the limit taken as the
    # baseline ratio itself (no margin: the within-spread ratio fails).
    base = _baseline(gate)["cases"]
    svd = base["thin_svd vs torch.linalg.svd"]
    within = svd["ratio"] * math.exp(-0.5 * svd["margin_log"])
    slowed = svd["ratio"] / 2  # the thin SVD's old wrapper doubled its time
    ok = gate.compare([_summary(3.6, name="DDIM vs diffusers"), _summary(within, name=svd_name(base))], base)
    assert [v["verdict"] for v in ok] == ["ok", "ok"] and gate.failures(ok) == []
    bad = gate.compare([_summary(3.6, name="DDIM vs diffusers"), _summary(slowed, name=svd_name(base))], base)
    assert gate.failures(bad) == ["thin_svd vs torch.linalg.svd"]
    assert bad[1]["verdict"] == "regressed" and bad[1]["limit"] == pytest.approx(svd["limit"])


def svd_name(base):
    return next(name for name in base if name.startswith("thin_svd"))


def test_a_missing_case_fails_a_whole_run_a_new_one_does_not_and_faster_is_reported(gate):
    # Checked to fail with the missing-case rows left out of compare.
    base = _baseline(gate)["cases"]
    verdicts = gate.compare([_summary(7.0, name="DDIM vs diffusers"), _summary(1.0, name="UniPC vs diffusers")], base)
    by_case = {v["case"]: v["verdict"] for v in verdicts}
    assert by_case == {"DDIM vs diffusers": "faster", "UniPC vs diffusers": "new",
                       "thin_svd vs torch.linalg.svd": "missing"}  # fmt: skip
    assert gate.failures(verdicts) == ["thin_svd vs torch.linalg.svd"]
    # a partial run (--only) does not ask for the cases it left out
    partial = gate.compare([_summary(3.6, name="DDIM vs diffusers")], base, complete=False)
    assert [v["verdict"] for v in partial] == ["ok"]


def test_a_refresh_reports_what_moved_beyond_its_margin(gate):
    # Checked to fail with every case reported (the margin test dropped) and with the direction inverted.
    old = _baseline(gate)["cases"]
    new = {name: dict(c) for name, c in old.items()}
    new["DDIM vs diffusers"]["ratio"] = old["DDIM vs diffusers"]["ratio"] * 0.5
    new["thin_svd vs torch.linalg.svd"]["ratio"] *= math.exp(0.5 * old["thin_svd vs torch.linalg.svd"]["margin_log"])
    new["UniPC vs diffusers"] = dict(old["DDIM vs diffusers"])
    lines = gate.what_moved(old, new)
    assert len(lines) == 2, lines
    assert lines[0].startswith("new") and "UniPC" in lines[0]
    assert lines[1].startswith("down") and "DDIM vs diffusers" in lines[1] and "-50.0%" in lines[1]
    assert gate.what_moved(old, {}) == [f"removed   {n}: {c['ratio']:.3f}" for n, c in old.items()]


def test_the_results_json_and_one_csv_line_per_case(gate, tmp_path):
    # The history a plot reads: one line per case and run, with the machine, versions and commit.
    base = _baseline(gate)
    doc = _run({"DDIM vs diffusers": 1.0, "thin_svd vs torch.linalg.svd": 2.4})
    doc["verdicts"] = gate.compare(doc["cases"], base["cases"])
    for _ in range(2):
        path = gate.write_results(doc, str(tmp_path), base["cases"])
    assert json.loads(Path(path).read_text())["cases"] == doc["cases"]
    with open(tmp_path / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and set(rows[0]) == set(gate.CSV_FIELDS)
    assert rows[0]["case"] == "DDIM vs diffusers" and rows[0]["verdict"] == "regressed"
    assert rows[0]["cpu_model"] == "AMD EPYC" and rows[0]["diffusers"] == "0.42.1" and rows[0]["commit"] == "0" * 12
    assert gate.machine_key(doc["machine"]) == "AMD EPYC | 1 thread(s)"


def _check(gate, tmp_path, monkeypatch, measured: list[dict]):
    """gate.check against a written baseline, with run_gate answering ``measured`` in turn (no timing)."""
    import argparse

    baseline = tmp_path / "baseline.json"
    entry = _baseline(gate)
    baseline.write_text(json.dumps({"machines": {gate.machine_key(entry["machine"]): entry}}))
    calls = []

    def fake_run(selected, out_dir, note=""):
        calls.append([c.name for c in selected])
        return _run(measured[len(calls) - 1])

    monkeypatch.setattr(gate, "run_gate", fake_run)
    selected = [gate.Case(name, "scheduler", dict, 1, 1.0) for name in entry["cases"]]
    args = argparse.Namespace(baseline=str(baseline), out=str(tmp_path / "out"), note="", only=None)
    return gate.check(args, selected), calls


def test_a_regression_fails_the_step_only_when_its_re_measurement_fails_too(gate, tmp_path, monkeypatch, capsys):
    # Checked to fail with the re-measurement skipped (a one-off dip fails the step) and with a confirmed
    # regression passed.
    ok = {"DDIM vs diffusers": 3.6, "thin_svd vs torch.linalg.svd": 2.4}
    slow = {"DDIM vs diffusers": 3.6, "thin_svd vs torch.linalg.svd": 1.2}
    status, calls = _check(gate, tmp_path, monkeypatch, [ok])
    assert status == 0 and len(calls) == 1
    status, calls = _check(gate, tmp_path, monkeypatch, [slow, {"thin_svd vs torch.linalg.svd": 2.4}])
    assert status == 0 and calls[1] == ["thin_svd vs torch.linalg.svd"], calls
    assert "ok (not confirmed)" in capsys.readouterr().out
    status, calls = _check(gate, tmp_path, monkeypatch, [slow, {"thin_svd vs torch.linalg.svd": 1.3}])
    assert status == 1
    err = capsys.readouterr().err
    assert "gate: FAILED: thin_svd vs torch.linalg.svd" in err and "DDIM" not in err
    latest = json.loads((tmp_path / "out" / "latest.json").read_text())
    assert [v["verdict"] for v in latest["verdicts"]] == ["ok", "regressed"]


def test_ci_runs_the_gate_as_its_own_step_outside_the_readme_test_command():
    import subprocess

    listing = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--list"], capture_output=True, text=True, check=True)
    steps = dict(line.split(None, 1) for line in listing.stdout.splitlines())
    assert steps["bench"] == "python benchmarks/gate.py"
    assert "gate" not in steps["tests"] and "benchmarks" not in steps["tests"]


def test_a_refresh_from_run_files_writes_the_machine_entry_and_a_partial_one_keeps_the_rest(gate, tmp_path, capsys):
    # Checked to fail with a partial refresh replacing the whole entry (the DDIM case and the first record lost).
    import argparse

    files = []
    for j, r in enumerate((3.6, 3.7, 3.5, 3.65, 3.55)):
        files.append(tmp_path / f"run{j}.json")
        files[-1].write_text(json.dumps(_run({"DDIM vs diffusers": r, "thin_svd vs torch.linalg.svd": 2.4})))
    baseline = tmp_path / "baseline.json"
    args = argparse.Namespace(baseline=str(baseline), out=str(tmp_path), note="", only=None, runs=5,
                              from_results=[str(f) for f in files])  # fmt: skip
    assert gate.refresh(args, []) == 0
    whole = json.loads(baseline.read_text())["machines"]["AMD EPYC | 1 thread(s)"]
    assert whole["runs"] == 5 and whole["cases"]["DDIM vs diffusers"]["ratio"] == pytest.approx(3.6)
    slower = tmp_path / "slower.json"
    slower.write_text(json.dumps(_run({"thin_svd vs torch.linalg.svd": 1.2}, load=7.0)))
    args.only, args.from_results = "thin_svd", [str(slower)]
    assert gate.refresh(args, []) == 0
    assert "down      thin_svd vs torch.linalg.svd: 2.400 -> 1.200 (-50.0%" in capsys.readouterr().out
    entry = json.loads(baseline.read_text())["machines"]["AMD EPYC | 1 thread(s)"]
    assert entry["cases"]["DDIM vs diffusers"] == whole["cases"]["DDIM vs diffusers"]
    assert entry["cases"]["thin_svd vs torch.linalg.svd"]["ratio"] == pytest.approx(1.2)
    assert entry["runs"] == 5 and entry["load_1min"] == whole["load_1min"]
    assert entry["partial_refreshes"][0]["only"] == "thin_svd" and entry["partial_refreshes"][0]["load_1min"][0] == 7.0


def test_a_machine_without_a_baseline_is_held_to_no_drop_in_slower_than_upstream(gate, tmp_path, monkeypatch, capsys):
    # Another CPU family has no baseline of its own: its scheduler and thin-SVD cases must still be >= 1x their
    # upstream (confirmed by a re-measurement), its op-vs-copy cases are not judged. Checked to fail with the
    # floor's groups emptied (the slow scheduler passes) and with the old rule (any run without a baseline fails).
    import argparse

    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"machines": {"Intel Xeon | 1 thread(s)": _baseline(gate)}}))
    measured = [{"DDIM vs diffusers": 1.5, "op vs copy": 0.1, "thin_svd vs torch.linalg.svd": 0.8}]

    def fake_run(selected, out_dir, note=""):
        doc = _run(measured.pop(0))
        for case in doc["cases"]:
            case["group"] = {"DDIM": "scheduler", "op": "op", "thin_svd": "thin_svd"}[case["case"].split()[0]]
        return doc

    monkeypatch.setattr(gate, "run_gate", fake_run)
    selected = [gate.Case(n, "scheduler", dict, 1, 1.0) for n in ("DDIM vs diffusers", "thin_svd vs torch.linalg.svd")]
    args = argparse.Namespace(baseline=str(baseline), out=str(tmp_path / "out"), note="", only=None)
    measured.append({"thin_svd vs torch.linalg.svd": 0.85})  # the re-measurement confirms it
    assert gate.check(args, selected) == 1
    captured = capsys.readouterr()
    assert (
        "no baseline for this machine" in captured.err and "gate: FAILED: thin_svd vs torch.linalg.svd" in captured.err
    )
    assert "DDIM" not in captured.err.split("FAILED")[1] and "op vs copy" not in captured.err.split("FAILED")[1]
    measured[:] = [{"DDIM vs diffusers": 1.5, "op vs copy": 0.1, "thin_svd vs torch.linalg.svd": 1.2}]
    assert gate.check(args, selected) == 0


def test_a_ratio_the_unchanged_code_gave_during_the_baseline_passes(gate):
    # A bimodal case (the float64 thin SVD: 3.3x in most processes, 2.3x in some): the robust sigma ignores the
    # minority mode, so the margin also covers the lowest baseline run. Checked to fail without that term.
    b = gate.baseline_case([_summary(r) for r in (3.30, 3.31, 3.29, 2.31, 3.28)])
    assert gate.verdict(2.31, b) == "ok" and gate.verdict(2.31 * 0.9, b) == "regressed"


@pytest.mark.parametrize("patch", sorted((ROOT / "benchmarks" / "plants").glob("*.patch")), ids=lambda p: p.name)
def test_every_planted_regression_still_applies(patch):
    # The plants are how the gate is shown to fail (docs/performance.md): a plant that no longer applies to the
    # code it slows down shows nothing. Fails with the wrapper plants as they were before the wrapper's rewrite.
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a checkout (not an sdist)")
    check = subprocess.run(["git", "apply", "--check", str(patch)], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0, f"{patch.name} no longer applies: {check.stderr.strip()}"
