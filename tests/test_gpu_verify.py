"""The one-command GPU verification (benchmarks/gpu/verify.sh), dry-run on a CPU machine: every step is
there, in order, with the result files the issue asks for, and every benchmark script accepts the flags the
script passes it. (The run itself needs a GPU machine.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu" / "verify.sh"


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
        "pytest tests -q",
        "compute-sanitizer --tool memcheck",
        "run_step_bench.py --device cuda --out res/step_cuda.json",
        "thin_svd_results.py --device cuda --out res/thin_svd_cuda.json",
        "run_loop_bench.py --device cuda --out res/loop_cuda.json",
        "bench_schedulers.py -q -p no:cacheprovider --benchmark-json res/schedulers_cuda.json",
    ]
    positions = []
    for step in steps:
        found = [i for i, c in enumerate(commands) if step in c]
        assert found, f"missing step {step!r} in {commands}"
        positions.append(found[0])
    assert positions == sorted(positions)
    assert any("w/*.whl" in c for c in commands) and any("DDIMGMM_FORCE_CUDA=1" in c for c in commands)


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
