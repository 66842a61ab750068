"""The package's import graph, read from the source (ast): the specification is a leaf, and nothing imports in a
cycle.

``reference`` is the oracle of every fused path: if it imported the runtime (the row builder, the ops, the GMM
tables), a bug there would reach both sides of the comparison and every oracle test would pass. Imports inside
functions count, since they run as surely as the others. Mutations checked: ``from . import _rows`` inside
``reference.step`` fails the leaf test (and, on the code before the split, where _rows imported reference, the
cycle test too); ``from . import api`` inside a function of ``_checks`` fails both; calling ``reference.step``
from ``DDIMGMMScheduler._thresholded_step`` fails the last test."""

from __future__ import annotations

import ast
from pathlib import Path

import ddim_gmm_ext

PACKAGE = Path(ddim_gmm_ext.__file__).parent
NAME = "ddim_gmm_ext"
#: What the specification may import: the argument rules and the schedules / path coefficients, shared leaves.
SPEC_IMPORTS = {f"{NAME}._checks", f"{NAME}._schedules"}
#: The specification's step functions: oracles, never run by a user path.
SPEC_STEPS = {"step", "step_from_table", "ddim_step", "rfim_step"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join((NAME, *parts))] = path
    return found


MODULES = _modules()
#: Compiled extension modules (ddim_gmm_ext._C): imported by name, leaves of the graph.
EXTENSIONS = {
    ".".join((NAME, *p.relative_to(PACKAGE).parent.parts, p.name.split(".")[0])) for p in PACKAGE.rglob("*.so")
}


def _imports(module: str, path: Path) -> set[str]:
    """The package modules ``module`` imports anywhere in its source: ``from X import a`` is X.a where that is a
    module, else X (the implicit import of a parent package by its submodules is not an edge)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = (f"{base}.{a.name}" for a in node.names)
            out.update(n if n in MODULES or n in EXTENSIONS else base for n in names)
    return {m for m in out if m in MODULES and m != module}


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def test_the_graph_is_read():
    # Guards the reader itself: the runtime's known edges are seen, relative and absolute, top level and nested.
    assert f"{NAME}.reference" in MODULES and f"{NAME}.integrations.diffusers.ddim" in MODULES
    assert {f"{NAME}._rows", f"{NAME}._checks", f"{NAME}.ops.step"} <= GRAPH[f"{NAME}.api"]
    assert f"{NAME}.api" in GRAPH[f"{NAME}.integrations.diffusers.ddim"]


def test_reference_imports_no_runtime_module():
    closure, todo = set(), [f"{NAME}.reference"]
    while todo:
        for imported in GRAPH[todo.pop()] - closure:
            closure.add(imported)
            todo.append(imported)
    assert closure <= SPEC_IMPORTS, f"reference reaches runtime modules: {sorted(closure - SPEC_IMPORTS)}"


def test_no_import_cycle():
    # Depth-first search; a back edge is a cycle, reported as the path around it.
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for imported in sorted(GRAPH[module]):
            if state.get(imported) == 1:
                cycles.append(path[path.index(imported) :] + [imported])
            elif imported not in state:
                visit(imported)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_runtime_module_runs_the_specs_step():
    # A user path through reference.step would make the oracle and the code it checks one (the diffusers DDIM
    # scheduler's dynamic thresholding once did).
    offenders = []
    for module, path in MODULES.items():
        if module == f"{NAME}.reference":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in SPEC_STEPS
                and isinstance(node.value, ast.Name)
                and node.value.id in ("reference", "ref", "R")
            ):
                offenders.append(f"{module}:{node.lineno} reference.{node.attr}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("reference"):
                offenders += [f"{module}:{node.lineno} imports {a.name}" for a in node.names if a.name in SPEC_STEPS]
    assert not offenders, offenders
