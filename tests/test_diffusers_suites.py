"""tools/diffusers_suites.py, which runs diffusers' own tests/schedulers files on our drop-ins: its table covers
every exported scheduler, and on a small stand-in checkout (no network, no diffusers sources) it finds the file,
puts the drop-in in, gives it the harness's special cases of its stock class and counts as pytest does."""

import importlib.util
import textwrap
from pathlib import Path

import pytest

diffusers = pytest.importorskip("diffusers")

TOOL = Path(__file__).resolve().parents[1] / "tools" / "diffusers_suites.py"


def _tool():
    spec = importlib.util.spec_from_file_location("diffusers_suites", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_table_covers_every_exported_scheduler():
    """Checked to fail with a row removed and with the Euler ancestral row naming EulerDiscreteScheduler."""
    import ddim_gmm_ext.diffusers as ours

    exported = {
        name
        for name in ours.__all__
        if isinstance(getattr(ours, name), type) and issubclass(getattr(ours, name), diffusers.SchedulerMixin)
    }
    table = _tool().DROP_INS
    assert set(table.values()) == exported
    for stock, name in table.items():
        assert getattr(ours, name).__mro__[1:].count(getattr(diffusers, stock)) == 1, (name, stock)


HARNESS = """
import unittest

from diffusers import EulerDiscreteScheduler


class SchedulerCommonTest(unittest.TestCase):
    scheduler_classes = ()

    def test_harness_special_case(self):
        for scheduler_class in self.scheduler_classes:
            assert scheduler_class in (EulerDiscreteScheduler,)
"""

SUITE = """
import unittest

from diffusers import EulerDiscreteScheduler

from .test_schedulers import SchedulerCommonTest


class EulerDiscreteSchedulerTest(SchedulerCommonTest):
    scheduler_classes = (EulerDiscreteScheduler,)

    def test_runs_the_drop_in(self):
        assert self.scheduler_classes[0].__module__ == "ddim_gmm_ext.diffusers"

    @unittest.skip("a skip")
    def test_skipped(self):
        pass


class EulerDiscreteScheduler1DTest(EulerDiscreteSchedulerTest):
    def test_runs_the_drop_in(self):
        assert self.scheduler_classes[0].__name__ == "EulerDiscreteGMMScheduler"
"""


def test_runs_a_suite_file_on_the_drop_in(tmp_path):
    """Checked to fail with the harness rebinding removed (the special case then fails), with the harness class
    imported beside the suite left selected (5 passed), with the counts keyed by test name (a subclass's reruns
    of its base's tests counted once: 2 passed) and with the file pattern reduced to the class name (the file that
    only imports EulerDiscreteScheduler is found too)."""
    tool = _tool()
    folder = tmp_path / "tests" / "schedulers"
    folder.mkdir(parents=True)
    for path, text in [
        (tmp_path / "tests" / "__init__.py", ""),
        (folder / "__init__.py", ""),
        (folder / "test_schedulers.py", HARNESS),
        (folder / "test_scheduler_euler.py", SUITE),
        (folder / "test_scheduler_other.py", "from diffusers import EulerDiscreteScheduler  # noqa: F401\n"),
    ]:
        path.write_text(textwrap.dedent(text))
    files = tool.suite_files(tmp_path, "EulerDiscreteScheduler")
    assert [p.name for p in files] == ["test_scheduler_euler.py"]
    assert tool.suite_files(tmp_path, "FlowMatchEulerDiscreteScheduler") == []
    counts = tool.run_file(tmp_path, files[0], "EulerDiscreteScheduler", ours=True)
    assert counts == {"passed": 4, "failed": 0, "skipped": 2, "error": 0, "failed_tests": []}
    stock = tool.run_file(tmp_path, files[0], "EulerDiscreteScheduler", ours=False)
    assert stock["passed"] == 2 and stock["failed_tests"] == [
        "EulerDiscreteScheduler1DTest::test_runs_the_drop_in",
        "EulerDiscreteSchedulerTest::test_runs_the_drop_in",
    ]
    assert not list(tmp_path.rglob("__pycache__")) and not list(tmp_path.rglob(".pytest_cache"))
