"""The training package has no import cycles (top-level or inside functions), every module imports alone in a fresh
interpreter, and no library module imports the pretraining loop (only the entry points: the CLI, demo, ablate,
compare)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dreamteacher"
# Modules by dotted name below the package: "model", "teachers.taps", "commands.pretrain", ... (the subpackages
# included)
MODULES = sorted([p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"]
                 + [f"{sub}.{p.stem}" for sub in ("teachers", "commands") for p in (PACKAGE / sub).glob("*.py")
                    if p.stem != "__init__"])
ENTRY_POINTS = {"cli", "__main__", "demo", "ablate", "compare"} | {m for m in MODULES if m.startswith("commands.")}


def _resolve(dotted: str) -> str | None:
    """The module of MODULES a dotted name below the package refers to (a module, or a name inside one)."""
    parts = dotted.split(".")
    for n in (2, 1):
        if ".".join(parts[:n]) in MODULES:
            return ".".join(parts[:n])
    return None


def _imports(module: str) -> set[str]:
    """Package modules ``module`` imports anywhere in its body (``from .x import``, ``from ..x import``,
    ``from dreamteacher.x import``)."""
    tree = ast.parse((PACKAGE / f"{module.replace('.', '/')}.py").read_text())
    here = module.split(".")[:-1]  # the subpackage a module is in ([] at top level)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level - 1 <= len(here) else []
                prefix = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{prefix}.{a.name}" if prefix else a.name for a in node.names] + [prefix]
            elif node.module and node.module.startswith("dreamteacher."):
                rest = node.module.removeprefix("dreamteacher.")
                targets = [rest] + [f"{rest}.{a.name}" for a in node.names]
            else:
                continue
            found.update(m for m in map(_resolve, filter(None, targets)) if m)
        elif isinstance(node, ast.Import):
            found.update(m for a in node.names if a.name.startswith("dreamteacher.")
                         if (m := _resolve(a.name.removeprefix("dreamteacher."))))
    return {m for m in found if m != module}


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


@pytest.fixture(scope="module")
def warm():
    """Fresh processes forked from one interpreter that has imported torch, diffusers and timm but nothing of this
    project (tests/warm_interpreter.py): an import cycle or a missing import among our modules still fails."""
    from warm_interpreter import WarmInterpreter

    server = WarmInterpreter()
    yield server
    server.close()


@pytest.mark.parametrize("module", [m for m in MODULES if m != "__main__"])  # __main__ runs the CLI
def test_every_module_imports_alone(module, warm):
    proc = warm.run(code=f"import dreamteacher.{module}")
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_module_imports_alone_in_a_cold_interpreter():
    """One module in a fresh interpreter, as the warm server's children stand in for (the CLI's module: it imports
    the most)."""
    proc = subprocess.run([sys.executable, "-c", "import dreamteacher.cli"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
