"""The training package has no import cycles (top-level or inside functions), every module imports alone in a fresh
interpreter, and no library module imports the pretraining loop (only the entry points: the CLI, demo, ablate)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dreamteacher"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
ENTRY_POINTS = {"cli", "__main__", "demo", "ablate"}


def _imports(module: str) -> set[str]:
    """Sibling modules ``module`` imports anywhere in its body (``from .x import``, ``from dreamteacher.x import``)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(a.name for a in node.names)
            elif node.module and node.module.startswith("dreamteacher."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("dreamteacher."))
    return {m for m in found if m in MODULES and m != module}


def test_no_import_cycles_in_the_package():
    graph = {m: _imports(m) for m in MODULES}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m)


def test_only_entry_points_import_the_training_loop():
    importers = sorted(m for m in MODULES if "train" in _imports(m) and m not in ENTRY_POINTS)
    assert not importers, f"these modules import dreamteacher.train (move what they need out of it): {importers}"


@pytest.mark.parametrize("module", [m for m in MODULES if m != "__main__"])  # __main__ runs the CLI
def test_every_module_imports_alone(module):
    proc = subprocess.run([sys.executable, "-c", f"import dreamteacher.{module}"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
