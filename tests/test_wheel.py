"""The binary wheel as users get it (a registry test: CI's `wheel` step). One wheel, built here against this
interpreter's torch, installs with a plain `pip install` (no compiler, no --no-build-isolation) into a fresh
venv holding another torch, and the unit suite passes there against the installed copy: the C++ library is
on the LibTorch stable ABI, so it loads in every torch from ddim_gmm_ext.ops.MIN_TORCH on.

The other torch is DDIMGMM_WHEEL_TORCH (default 2.11.0, the GPU machine's; from the package index, a CUDA
build, which runs on a CPU); the suite is SUITE: the op (opcheck, autograd, torch.compile), the argument checks
and the diffusers schedulers."""

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WHEEL_TORCH = os.environ.get("DDIMGMM_WHEEL_TORCH", "2.11.0")
SUITE = ["tests/ops", "tests/test_validation.py", "tests/integrations/test_diffusers_scheduler.py"]


def _run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.registry
def test_wheel_installs_and_passes_the_suite_under_another_torch(tmp_path):
    import importlib.metadata
    import importlib.util

    import torch

    if importlib.util.find_spec("build") is None:
        pytest.skip("the build package is not installed in this interpreter (it is in the test extra)")
    assert not WHEEL_TORCH.startswith(torch.__version__.split("+")[0]), "pick a torch other than the build's"
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)])
    (wheel,) = dist.glob("ddim_gmm_ext-*.whl")
    assert "-cp310-abi3-" in wheel.name, wheel.name  # one wheel for every CPython >= 3.10 of the platform

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = str(env_dir / "bin" / "python")
    diffusers = importlib.metadata.version("diffusers")
    deps = [f"torch=={WHEEL_TORCH}", "pytest", "scipy", "torchsde", f"diffusers=={diffusers}"]
    _run([py, "-m", "pip", "install", "-q", *deps])
    _run([py, "-m", "pip", "install", "-q", str(wheel)])

    # The tests run from a copy (with pyproject's pytest settings), so the checkout's package is not on the path.
    run_dir = tmp_path / "run"
    shutil.copytree(ROOT / "tests", run_dir / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", run_dir)
    probe = "import torch, ddim_gmm_ext, ddim_gmm_ext._C as c; print(torch.__version__, c.__file__)"
    found_torch, library = _run([py, "-I", "-c", probe], cwd=run_dir).stdout.split()
    assert found_torch.startswith(WHEEL_TORCH) and library.startswith(str(env_dir)), (found_torch, library)
    proc = subprocess.run(
        [py, "-m", "pytest", *SUITE, "-q", "-p", "no:cacheprovider", "-x"], capture_output=True, text=True, cwd=run_dir
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
