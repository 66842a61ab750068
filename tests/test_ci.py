"""CI's driver (.ci/run) with stand-in tools: it runs the README's test command verbatim, names every step,
fails on a failing step, on a pytest run where nothing ran, and on skips in a step that exists to run them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / ".ci" / "run"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not available")


def _steps() -> dict[str, str]:
    proc = subprocess.run(["bash", str(RUN), "--list"], capture_output=True, text=True, cwd=ROOT, check=True)
    return dict(line.split(None, 1) for line in proc.stdout.splitlines())


def test_the_readme_test_command_is_ci_install_then_tests():
    # The README's test command is what a new user runs and what CI runs first (its install line, then its
    # pytest command, both verbatim).
    readme = (ROOT / "README.md").read_text()
    block = readme.split("Run the tests:", 1)[1].lstrip("\n")
    command = block.splitlines()[0].strip()
    steps = _steps()
    assert command == f"{steps['install']} && {steps['tests']}", (command, steps)
    assert list(steps)[:2] == ["install", "tests"]
    assert {"lint", "format", "types", "sdist", "wheel", "rehearsal"} <= steps.keys()


def _run(tmp_path, python_script: str, *steps: str) -> tuple[subprocess.CompletedProcess, str]:
    """.ci/run STEPS with stand-in python and ruff on PATH; (the process, the stand-ins' recorded calls)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for tool, body in (("python", python_script), ("ruff", "exit 0")):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n{body}\n')
        (bin_dir / tool).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(RUN), *steps], capture_output=True, text=True, cwd=ROOT, env=env)
    return proc, calls.read_text() if calls.exists() else ""


def test_a_failing_step_is_named_and_the_rest_still_run(tmp_path):
    # Checked to fail with the status check removed (every step "passed") and with pytest's exit status 5
    # accepted as a pass.
    proc, calls = _run(tmp_path, "exit 5", "tests", "lint", "format")
    assert proc.returncode == 1, proc.stdout
    for name in ("tests", "lint", "format"):
        assert f"== step: {name} ==" in proc.stdout, proc.stdout
    assert "== step: tests: no tests ran (pytest exit status 5)" in proc.stdout, proc.stdout
    assert ".ci/run: failed steps: tests" in proc.stderr, proc.stderr
    assert calls.splitlines() == ["python -m pytest tests", "ruff check .", "ruff format --check ."], calls


@pytest.mark.parametrize(
    ("step", "summary", "fails"),
    [
        ("tests", "==== 12 passed, 3 skipped, 2 deselected in 4.10s ====", False),
        ("tests", "==== 2 skipped, 9 deselected in 0.50s ====", True),
        ("rehearsal", "==== 1 passed in 400.00s (0:06:40) ====", False),
        ("rehearsal", "==== 1 skipped, 8 deselected in 0.20s ====", True),
        ("sdist", "==== 1 passed, 1 skipped in 30.00s ====", True),
    ],
)
def test_a_pytest_step_where_nothing_ran_fails(tmp_path, step, summary, fails):
    # A step that exists to run registry tests fails if they skip (no python3.12, no `build`): CI would
    # otherwise pass without the rehearsal. Checked to fail with the skip count ignored.
    proc, _ = _run(tmp_path, f'echo "{summary}"; exit 0', step)
    assert proc.returncode == (1 if fails else 0), proc.stdout + proc.stderr
    assert re.search(rf"== step: {step}: {'(?!passed)' if fails else 'passed'}", proc.stdout), proc.stdout


def test_registry_tests_are_left_out_of_the_default_run():
    # pyproject's addopts deselect them (CI's sdist and rehearsal steps select them again with -m registry and
    # fail if nothing passes). One collection, not two: each starts torch.
    cmd = [sys.executable, "-m", "pytest", "tests/test_packaging.py", "tests/test_gpu_verify.py", "--collect-only"]
    proc = subprocess.run([*cmd, "-q", "-p", "no:cacheprovider"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    collected = {line.split("::")[1] for line in proc.stdout.splitlines() if "::" in line}
    registry = {"test_sdist_builds_and_installs_in_a_clean_venv", "test_rehearsal_with_the_gpu_machines_software"}
    assert collected and not registry & collected, collected
    assert "(2 deselected)" in proc.stdout, proc.stdout[-500:]
