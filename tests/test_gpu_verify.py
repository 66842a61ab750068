"""The one-command GPU verification (tools/gpu/verify.sh), dry-run on a CPU machine: every step is
there, in order, with the result files the issue asks for, and every benchmark script accepts the flags the
script passes it. (The run itself needs a GPU machine.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu" / "verify.sh"


def _dry_run(*args: str) -> list[str]:
    if shutil.which("bash") is None:
        pytest.skip("bash not available")
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]


def test_dry_run_lists_every_step_in_order():
    # Checked to fail when a step is dropped from the script (e.g. the sanitizer or the loop benchmark).
    commands = _dry_run("--wheels", "w", "--out", "res")
    steps = [
        "pip install -q --no-index --no-deps",
        "setup.py build_ext --inplace",
        "import torch, ddim_gmm_ext",
        "pytest tests -q -p no:cacheprovider -rs -m not registry -k cuda --junitxml res/tests_device.xml",
        "run_step_bench.py --device cuda --out res/step_cuda.json",
        "thin_svd_results.py --device cuda --out res/thin_svd_cuda.json",
        "run_loop_bench.py --device cuda --out res/loop_cuda.json",
        "bench_schedulers.py -q -p no:cacheprovider --benchmark-json res/schedulers_cuda.json",
        "compute-sanitizer --tool memcheck",
        "-k not cuda --junitxml res/tests_other.xml",
    ]
    positions = []
    for step in steps:
        found = [i for i, c in enumerate(commands) if step in c]
        assert found, f"missing step {step!r} in {commands}"
        positions.append(found[0])
    assert positions == sorted(positions)
    assert any("w/*.whl" in c for c in commands) and any("DDIMGMM_FORCE_CUDA=1" in c for c in commands)


BENCHMARKS = ("run_step_bench.py", "thin_svd_results.py", "run_loop_bench.py", "bench_schedulers.py")


def _run_with_stand_in(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    """verify.sh (not a dry run) with a stand-in python3 on PATH that records its arguments, fails the test
    suite and succeeds at everything else; (the process, the recorded calls)."""
    if shutil.which("bash") is None:
        pytest.skip("bash not available")
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\ncase "$*" in *"pytest tests "*) exit 1;; esac\nexit 0\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--wheels", str(tmp_path / "none"), "--out", str(tmp_path / "out"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    return proc, calls.read_text()


def test_a_failing_step_does_not_stop_the_rest(tmp_path):
    # GPU time is scarce: a failing test run must still leave the benchmarks' results. Checked to fail with
    # `set -e` and `|| exit` on the device-test step (the benchmarks never ran).
    proc, ran = _run_with_stand_in(tmp_path)
    assert proc.returncode == 1 and "failed steps: device_tests other_tests" in proc.stderr, proc.stderr
    for later in BENCHMARKS:
        assert later in ran, (later, ran)
    assert "+ " in (tmp_path / "out" / "verify.log").read_text()


def test_steps_past_the_budget_are_skipped(tmp_path):
    # A lease's command has a time limit: past --budget the remaining steps are skipped and named, the build
    # still runs. Checked to fail with the budget test removed from step().
    proc, ran = _run_with_stand_in(tmp_path, "--budget", "0")
    assert "setup.py build_ext" in ran and not any(b in ran for b in BENCHMARKS), ran
    assert "skipped for the budget: device device_tests step_bench" in proc.stderr, proc.stderr


@pytest.mark.registry
def test_rehearsal_with_the_gpu_machines_software(tmp_path):
    """verify.sh --rehearse on this CPU machine with the GPU machine's Python, torch (a CUDA build) and triton
    (tools/gpu/rehearse.sh): the CUDA build, the whole test suite (the sm_80 / sm_90 compiles with that
    triton among it) and every benchmark script pass there, so a GPU session is not spent on version breakage.
    Not in the default run (registry): CI's `rehearsal` step (.ci/run rehearsal) runs it, about 5 GB.
    (Its first, manual run found: register spills in float64 kernels compiled by triton 3.6, its interpreter
    refusing runtime loop bounds under numpy >= 2.4, tests that needed an installed package or a registry, and
    a CUDA build that failed without a visible GPU or with a wrapper nvcc; each failed it before its fix.)"""
    if shutil.which("git") is None:
        pytest.skip("git is needed to copy the checkout")
    work = tmp_path / "rehearsal"
    try:
        proc = subprocess.run(
            ["bash", str(ROOT / "tools" / "gpu" / "rehearse.sh"), str(work)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=3600,
        )
    finally:  # the venv is 5 GB; pytest keeps the last three runs' tmp_path
        shutil.rmtree(work / "venv", ignore_errors=True)
    if proc.returncode == 3:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, (proc.stdout[-6000:], proc.stderr[-3000:])
    out = work / "out"
    suites = [ElementTree.parse(out / f"tests_{part}.xml").getroot().find("testsuite") for part in ("device", "other")]
    assert sum(int(suite.get("tests")) for suite in suites) > 1000, [suite.attrib for suite in suites]
    for suite in suites:
        assert suite.get("failures") == "0" and suite.get("errors") == "0", suite.attrib
    for name, rows in (("step", "results"), ("thin_svd", "thin_svd"), ("loop", "results")):
        doc = json.loads((out / f"{name}_cpu.json").read_text())
        assert doc[rows] and doc["versions"]["torch"].startswith("2.11"), (name, doc["versions"])
    doc = json.loads((out / "schedulers_cpu.json").read_text())  # pytest-benchmark's own format
    assert doc["benchmarks"] and doc["machine_info"]["python_version"].startswith("3.12"), doc["machine_info"]


def test_unknown_argument_is_refused():
    proc = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "unknown argument --bogus" in proc.stderr


@pytest.mark.parametrize("script", ["run_step_bench.py", "thin_svd_results.py", "run_loop_bench.py"])
def test_benchmark_scripts_take_the_flags_verify_passes(script):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert "--device" in proc.stdout and "--out" in proc.stdout


def test_the_shared_json_writer_and_cpu_timer(tmp_path, monkeypatch):
    # benchmarks/common.py: every result file carries date, command, device, machine and versions.
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import json

    import common

    times = common.cpu_times(lambda: sum(range(1000)), repeats=5)
    assert len(times["ms"]) == 5 and 0 <= times["min_ms"] <= times["median_ms"] and times["iqr_ms"] >= 0
    path = common.write_json({"results": [1]}, "cpu", str(tmp_path / "x" / "r.json"), "unused.json")
    doc = json.loads(Path(path).read_text())
    assert doc["results"] == [1] and doc["device"] == "cpu"
    assert {"date", "command", "machine", "versions"} <= doc.keys()
    assert doc["versions"]["torch"] and doc["machine"]["cpu_count"] >= 1
