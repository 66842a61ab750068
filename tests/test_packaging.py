"""The package as users get it: the sdist builds and installs in a clean virtual environment (a registry test:
CI's `sdist` step), a missing extension says how to build it. Lint, format and mypy are CI steps of their own
(.ci/run lint format types), not tests."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _import_copy(tmp_path, prelude: str = "", broken_library: bool = False) -> subprocess.CompletedProcess:
    """`import ddim_gmm_ext` from a copy of the package without its compiled library (a file that is no library
    in its place with `broken_library`), after `prelude`."""
    shutil.copytree(ROOT / "ddim_gmm_ext", tmp_path / "ddim_gmm_ext", ignore=shutil.ignore_patterns("_C*", "data"))
    if broken_library:
        (tmp_path / "ddim_gmm_ext" / "_C.abi3.so").write_text("not a shared library")
    # (an editable install of the checkout would otherwise supply its _C: drop its finder)
    code = "import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f)]\n"
    code += prelude + "\nimport ddim_gmm_ext"
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=False)


def test_missing_extension_says_how_to_build(tmp_path):
    # A copy of the package without the compiled library (mutation checked: importing the C library first
    # again gives the old "partially initialized module ... circular import" message and fails this test).
    proc = _import_copy(tmp_path)
    assert proc.returncode != 0
    assert "ddim_gmm_ext._C is not built" in proc.stderr and "--no-build-isolation" in proc.stderr
    assert "circular import" not in proc.stderr


def test_too_old_torch_says_which_torch_is_needed(tmp_path):
    # Mutation checked: without the version check in ops/__init__.py the import goes on (and would fail with a
    # symbol error in a torch without the stable ABI's entry points).
    proc = _import_copy(tmp_path, "import torch; torch.__version__ = '2.9.1+cpu'", broken_library=True)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError") and "needs torch >= 2.10" in last and "found torch 2.9.1+cpu" in last


def test_library_that_fails_to_load_names_the_torch_found(tmp_path):
    # Mutation checked: the former message (no torch version) fails the second assertion.
    import torch

    proc = _import_copy(tmp_path, broken_library=True)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError") and "ddim_gmm_ext._C failed to load" in last
    assert f"with torch {torch.__version__} (it needs torch >= 2.10)" in last


def test_min_torch_is_the_stable_abi_target():
    # The Python check and the C++ target name one version (mutation checked: MIN_TORCH = (2, 11) fails).
    from ddim_gmm_ext.ops import MIN_TORCH

    target = re.search(
        r"#define TORCH_TARGET_VERSION 0x([0-9a-f]{2})([0-9a-f]{2})", (ROOT / "csrc/stable.h").read_text()
    )
    assert target is not None and (int(target[1], 16), int(target[2], 16)) == MIN_TORCH


@pytest.mark.registry
def test_sdist_builds_and_installs_in_a_clean_venv(tmp_path):
    """The sdist carries every source the extension needs (headers, .cu, Triton kernels, model data) and one
    version; a clean venv with only torch installs it and runs a step on the built op."""
    import torch

    if importlib.util.find_spec("build") is None:
        pytest.skip("the build package is not installed in this interpreter (it is in the test extra)")
    # run outside the checkout: `python -m build` there would find setup.py build_ext's build/ folder first
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(ROOT)])
    (sdist,) = (tmp_path / "dist").glob("ddim_gmm_ext-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = ["csrc/cpu/philox.h", "csrc/cpu/isa.h", "csrc/cpu/type_error.h", "csrc/stable.h", "csrc/thin_svd_aten.h"]
    needed += ["csrc/cpu/normals.h", "csrc/cpu/normals_body.h"]
    needed += ["csrc/cuda/thin_svd.cu"]
    needed += ["triton_kernels/step.py", "ddim_gmm_ext/quality/data/digits_eps.pt", "ddim_gmm_ext/py.typed"]
    for name in needed:
        assert name in names, f"{name} missing from the sdist"

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = str(env_dir / "bin" / "python")
    torch_version = torch.__version__.split("+")[0]
    _run([py, "-m", "pip", "install", "-q", f"torch=={torch_version}", "numpy", "tqdm", "ninja", "setuptools", "wheel"])
    _run([py, "-m", "pip", "install", "-q", "--no-build-isolation", str(sdist)], env={**os.environ, "MAX_JOBS": "2"})
    probe = (
        "import importlib.metadata, torch, ddim_gmm_ext as dg\n"
        "assert importlib.metadata.version('ddim_gmm_ext') == dg.__version__\n"
        "x, eps = torch.randn(2, 3, 4), torch.randn(2, 3, 4)\n"
        "out = dg.ddim_step(eps, x, 0.5, 0.7, eta=1.0, seed=3)\n"
        "ref = dg.reference.ddim_step(eps, x, 0.5, 0.7, eta=1.0, seed=3)\n"
        "torch.testing.assert_close(out.prev_sample, ref.prev_sample)\n"
        "print(dg.__file__)\n"
    )
    proc = _run([py, "-I", "-c", probe], cwd=tmp_path)
    assert str(env_dir) in proc.stdout  # the installed copy, not the checkout


def test_benchmark_suites_are_collected():
    # `python -m pytest benchmarks` must find the bench_*.py suites (pyproject's python_files; with the default
    # test_*.py pattern it collected nothing, which this test caught).
    proc = _run(
        [sys.executable, "-m", "pytest", "benchmarks", "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=ROOT
    )
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    suites = {line.split("::")[0] for line in collected}
    expected = {f"benchmarks/{p.name}" for p in (ROOT / "benchmarks").glob("bench_*.py")}
    assert suites == expected, (suites, expected)
