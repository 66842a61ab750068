"""Run diffusers' own scheduler test-suites with our drop-ins in place of the stock classes.

    python tools/diffusers_suites.py PATH/TO/diffusers          # a diffusers source checkout (nothing is downloaded)
    python tools/diffusers_suites.py PATH/TO/diffusers --stock  # also the stock classes, for comparison

For each row of :data:`DROP_INS` it finds the files under ``tests/schedulers`` whose test class declares
``scheduler_classes = (<stock class>,)``, runs each file with pytest in its own process with that tuple set to
our drop-in, and prints the passed / failed / skipped counts per file (and the failing tests; exit status 1 when
a drop-in fails any). The counts leave out the tests of the harness base class that each file imports, which run
with no scheduler class. The tests import the installed diffusers (the one our classes extend), not the
checkout's ``src``: ``tests/conftest.py``, which puts ``src`` on ``sys.path``, is left out (``--noconftest``; its
FutureWarning filter is passed as ``-W``).

Subclass-awareness, applied at run time in the pytest process and never written to the checkout: diffusers'
common harness (``tests/schedulers/test_schedulers.py``) special-cases some stock classes by identity
(``scheduler_class in (EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, ...)``: those get a float
timestep and a seeded generator). In the harness module the name of each stock class in the table is bound to
its drop-in, so the drop-in gets the stock class's special cases. The checkout is only read (no bytecode, no
pytest cache written into it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

#: stock diffusers scheduler -> our drop-in in ``ddim_gmm_ext.diffusers``; a new drop-in is one line here.
DROP_INS = {
    "DDIMScheduler": "DDIMGMMScheduler",
    "DDPMScheduler": "DDPMGMMScheduler",
    "EulerDiscreteScheduler": "EulerDiscreteGMMScheduler",
    "EulerAncestralDiscreteScheduler": "EulerAncestralDiscreteGMMScheduler",
    "FlowMatchEulerDiscreteScheduler": "FlowMatchEulerDiscreteGMMScheduler",
    "DPMSolverMultistepScheduler": "DPMSolverMultistepGMMScheduler",
    "DPMSolverSDEScheduler": "DPMSolverSDEGMMScheduler",
    "UniPCMultistepScheduler": "UniPCMultistepGMMScheduler",
    "LCMScheduler": "LCMGMMScheduler",
    "TCDScheduler": "TCDGMMScheduler",
    "FlowMatchLCMScheduler": "FlowMatchLCMGMMScheduler",
    "EDMEulerScheduler": "EDMEulerGMMScheduler",
    "EDMDPMSolverMultistepScheduler": "EDMDPMSolverMultistepGMMScheduler",
}

_ENV_CLASS = "DDIM_GMM_SUITE_CLASS"  # the stock class name whose suite runs (plugin side)
_ENV_OURS = "DDIM_GMM_SUITE_OURS"  # "1": put the drop-in in; "0": the stock class as is
_ENV_REPORT = "DDIM_GMM_SUITE_REPORT"  # where the plugin writes its counts (JSON)


def suite_files(checkout: Path, stock: str) -> list[Path]:
    """The test files of ``checkout`` whose test class runs exactly ``stock``."""
    pattern = re.compile(rf"scheduler_classes\s*=\s*\(\s*{re.escape(stock)}\s*,?\s*\)")
    folder = checkout / "tests" / "schedulers"
    return [p for p in sorted(folder.glob("test_*.py")) if pattern.search(p.read_text())]


def run_file(checkout: Path, path: Path, stock: str, ours: bool) -> dict:
    """Counts of one test file in a fresh pytest process, with the drop-in (``ours``) or the stock class."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=os.pathsep.join(_pythonpath()))
        env.update({_ENV_CLASS: stock, _ENV_OURS: "1" if ours else "0", _ENV_REPORT: str(report)})
        command = [sys.executable, "-m", "pytest", str(path), "-q", "-p", "no:cacheprovider", "-p", Path(__file__).stem]
        command += ["--rootdir", str(checkout), "--noconftest", "-W", "ignore::FutureWarning", "-o", "addopts="]
        done = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True)
        if not report.exists():
            tail = (done.stdout + done.stderr)[-3000:]
            raise RuntimeError(f"pytest did not run {path.name} (exit {done.returncode}):\n{tail}")
        return json.loads(report.read_text())


def _pythonpath() -> list[str]:
    """This folder (the plugin), the repository holding it (its ddim_gmm_ext), then the caller's PYTHONPATH."""
    here = Path(__file__).resolve().parent
    extra = os.environ.get("PYTHONPATH")
    return [str(here), str(here.parent), *([extra] if extra else [])]


# -- the pytest plugin (loaded in the test process with -p diffusers_suites) ---------------------------------------


def _drop_in(stock: str):
    import ddim_gmm_ext.diffusers as ours

    return getattr(ours, DROP_INS[stock])


def pytest_collection_modifyitems(session, config, items) -> None:
    stock_name = os.environ.get(_ENV_CLASS)
    if stock_name is None:
        return
    import diffusers

    stock = getattr(diffusers, stock_name)
    selected = [item for item in items if getattr(item.cls, "scheduler_classes", None) == (stock,)]
    config.hook.pytest_deselected(items=[item for item in items if item not in selected])
    items[:] = selected  # only the stock class's own test class (not the harness base class imported beside it)
    if os.environ.get(_ENV_OURS) != "1":
        return
    for cls in {item.cls for item in selected}:
        cls.scheduler_classes = (_drop_in(stock_name),)
        for base in cls.__mro__[1:]:  # the harness module(s): its stock-class special cases apply to the drop-ins
            module = sys.modules.get(base.__module__)
            for name in DROP_INS:
                if module is not None and getattr(module, name, None) is getattr(diffusers, name, None):
                    setattr(module, name, _drop_in(name))


def pytest_sessionfinish(session, exitstatus) -> None:
    path = os.environ.get(_ENV_REPORT)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if path is None or reporter is None:
        return
    stats = reporter.stats

    def ids(key: str) -> list[str]:  # "Class::test" (a subclass reruns its base's tests under the same names)
        return sorted({r.nodeid.partition("::")[2] for r in stats.get(key, []) if hasattr(r, "nodeid")})

    counts = {key: len(ids(key)) for key in ("passed", "failed", "skipped", "error")}
    counts["failed_tests"] = ids("failed") + ids("error")  # type: ignore[assignment]
    Path(path).write_text(json.dumps(counts))


# -- command line --------------------------------------------------------------------------------------------------


def _line(counts: dict) -> str:
    text = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
    return text + (f", {counts['error']} errors" if counts["error"] else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="a diffusers source checkout (holding tests/schedulers)")
    parser.add_argument("--stock", action="store_true", help="also run each file on the stock class")
    args = parser.parse_args(argv)
    checkout = args.checkout.resolve()
    if not (checkout / "tests" / "schedulers" / "test_schedulers.py").is_file():
        parser.error(f"{args.checkout} is not a diffusers checkout (no tests/schedulers/test_schedulers.py)")
    import diffusers

    print(f"installed diffusers {diffusers.__version__}; tests from {checkout}")
    failed = False
    for stock, ours in DROP_INS.items():
        files = suite_files(checkout, stock)
        if not files:
            print(f"{ours}: no file in tests/schedulers runs {stock}")
        for path in files:
            counts = run_file(checkout, path, stock, ours=True)
            line = f"{path.name}  {ours}: {_line(counts)}"
            if args.stock:
                line += f"  |  {stock}: {_line(run_file(checkout, path, stock, ours=False))}"
            print(line, flush=True)
            for test in counts["failed_tests"]:
                print(f"    failed: {test}")
            failed |= bool(counts["failed"] or counts["error"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
