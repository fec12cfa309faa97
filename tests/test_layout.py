"""The package layout holds: layers import only downwards, no cycles, no Sacred below ``run``.

``docs/engine.md`` draws the map this test enforces:

    errors, files  <-  isic2019  <-  data  <-  train  <-  report
                                               train  <-  methods  <-  run  <-  experiment/
    deploy: files, isic2019, data, train

and ``docs/methods.md``'s ``_kd_method`` table is the one ``kd_losses.methods`` generates.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from kd_losses.methods import methods_markdown

ROOT = Path(__file__).resolve().parents[1]

# What each top-level part of raug may import (besides itself).
ALLOWED = {
    "errors": set(),
    "files": set(),
    "isic2019": {"files"},
    "data": {"files", "isic2019"},
    "train": {"errors", "files", "isic2019", "data"},
    "report": {"errors", "files", "isic2019", "data", "train"},
    "methods": {"errors", "files", "isic2019", "data", "train"},
    "deploy": {"errors", "files", "isic2019", "data", "train"},
    "run": {"errors", "files", "isic2019", "data", "train", "report", "methods"},
    "testing": {"files", "isic2019", "data"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """``{module: raug modules it imports}`` for every module of raug (static, all branches)."""
    modules = {_module_name(p): p for p in (ROOT / "raug").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        graph[name] = {m for m in found if m in modules and m != "raug"}
    return graph


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_every_import_goes_down_the_layers():
    wrong = [f"{m} imports {d}" for m, deps in _imports().items() for d in deps
             if _part(d) != _part(m) and _part(d) not in ALLOWED[_part(m)]]
    assert wrong == []


def test_no_import_cycle():
    graph = _imports()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for dep in graph[node]:
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])
    assert cycles == []


def test_the_graph_sees_real_imports():
    # the checks above are only as good as the graph: a known downward import is in it
    graph = _imports()
    assert "raug.train.engine" in graph["raug.run.runner"]
    assert "raug.files.checkpoint" in graph["raug.methods.teacher"]
    assert _part("raug.run.experiment") == "run"


@pytest.mark.parametrize("module", ["kd_losses", "raug.methods", "raug.train.engine",
                                    "raug.run.runner", "raug.report.runs", "raug.data.loaders"])
def test_no_sacred_below_the_experiment_glue(module):
    code = f"import sys, {module}; print('sacred' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_sacred_glue_does_import_sacred():
    # the subprocess check can tell: the glue module pulls Sacred in
    code = "import sys, raug.run.experiment; print('sacred' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_methods_doc_shows_the_generated_table():
    assert methods_markdown() in (ROOT / "docs" / "methods.md").read_text()
