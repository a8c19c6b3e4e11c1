"""The import rule: the library core imports nothing of the training harness.

Harness: ``fogzo.data``, ``fogzo.models``, ``fogzo.train``, ``fogzo.reproduce`` and
``fogzo.cli`` (and a ``fogzo.__main__``, should one appear). Core: every other module under
``src/fogzo`` (the quantizers, layers, smoothing, conversion, export, estimators,
diagnostics, adapters and integrations; the process-group helpers are the harness's,
``fogzo.train.distributed``). The harness may import the
core, never the other way round.

The rule is checked on the source: every ``import`` statement of every core file, at any
depth (inside functions and ``if`` blocks too), absolute or relative, and
``importlib.import_module`` / ``__import__`` / ``fogzo._optional.require`` calls with a
literal module name. A second check imports ``fogzo`` in a fresh interpreter and looks
at ``sys.modules``.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fogzo"
HARNESS = frozenset({"data", "models", "train", "reproduce", "cli", "__main__"})
#: Core modules and packages that must exist (a rename should update this test and the README).
EXPECTED_CORE = ("__init__", "_optional", "smoothing", "quantizers", "layers", "convert", "diagnostics",
                 "adapters", "estimators", "integrations")
IMPORT_FUNCTIONS = frozenset({"import_module", "__import__", "require"})


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_harness(module: str) -> bool:
    parts = module.split(".")
    return parts[0] == "fogzo" and len(parts) > 1 and parts[1] in HARNESS


def core_files() -> list[Path]:
    files = []
    for path in sorted(PACKAGE.rglob("*.py")):
        top = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if top not in HARNESS:
            files.append(path)
    return files


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """``(line, module)`` for every module ``source`` imports, relative imports resolved
    against ``package``; ``from X import a`` gives both ``X`` and ``X.a`` (``a`` may be a
    submodule: ``from fogzo import train``)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: -(node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
            if name in IMPORT_FUNCTIONS and node.args and isinstance(node.args[0], ast.Constant):
                if isinstance(node.args[0].value, str):
                    found.append((node.lineno, node.args[0].value))
    return found


def file_imports(path: Path) -> list[tuple[int, str]]:
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return imported_modules(path.read_text(encoding="utf-8"), package)


def test_the_tree_has_the_expected_core_and_harness():
    core = {path.relative_to(PACKAGE).parts[0].removesuffix(".py") for path in core_files()}
    missing = [name for name in EXPECTED_CORE if name not in core]
    assert not missing, f"core modules not found under {PACKAGE}: {missing}"
    assert any(name.startswith("export") for name in core), "no export module or package in the core"
    harness = {path.name.removesuffix(".py") for path in PACKAGE.iterdir() if path.name.removesuffix(".py") in HARNESS}
    assert harness >= {"data", "models", "train", "reproduce", "cli"}


@pytest.mark.parametrize("path", core_files(), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_core_module_imports_no_harness_module(path):
    offending = [f"line {line}: {module}" for line, module in file_imports(path) if _is_harness(module)]
    assert not offending, f"{path.relative_to(PACKAGE.parent)} imports the harness: {'; '.join(offending)}"


def test_the_import_finder_sees_every_form():
    # The checker itself: each form of a harness import, nested in a function, as if written
    # in fogzo/estimators/something.py.
    forms = {
        "import fogzo.train": "fogzo.train",
        "import fogzo.models.mlp as mlp": "fogzo.models.mlp",
        "from fogzo.train.records import JsonlLogger": "fogzo.train.records",
        "from fogzo import cli": "fogzo.cli",
        "from ..train import records": "fogzo.train",
        "from .. import reproduce": "fogzo.reproduce",
        "from ..data.idx import read_idx": "fogzo.data.idx",
        "importlib.import_module('fogzo.models')": "fogzo.models",
    }
    source = "def later():\n" + "".join(f"    {statement}\n" for statement in forms)
    found = {module for _, module in imported_modules(source, "fogzo.estimators")}
    assert all(expected in found for expected in forms.values()), (forms, found)
    assert all(_is_harness(expected) for expected in forms.values())
    # Relative imports inside the core resolve to the core.
    assert {module for _, module in imported_modules("from .base import Estimator\nfrom .. import layers\n", "fogzo.estimators")} == {
        "fogzo.estimators.base", "fogzo.estimators.base.Estimator", "fogzo", "fogzo.layers"}
    assert not _is_harness("fogzo.estimators.base") and not _is_harness("fogzo.datasets") and not _is_harness("torch.data")


def test_import_fogzo_loads_no_harness_module():
    code = "import json, sys, fogzo; print(json.dumps([fogzo.__file__, sorted(m for m in sys.modules if m.startswith('fogzo'))]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=True)
    where, loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(where).resolve() == PACKAGE / "__init__.py"  # this tree's fogzo
    assert "fogzo.estimators" in loaded
    assert [name for name in loaded if _is_harness(name)] == []


@pytest.mark.parametrize("folder", ["src", "tests", "benchmarks", "experiments", "examples"])
def test_every_file_parses_as_python_3_10(folder):
    """pyproject says requires-python >= 3.10: no syntax newer than 3.10 (``except*``, PEP 695
    type parameters, ...). The standard-library side (tomllib) is the tomli fallback's test."""
    root = Path(__file__).resolve().parents[1] / folder
    files = sorted(root.rglob("*.py"))
    assert files
    for path in files:
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 10))


ESTIMATORS = PACKAGE / "estimators"


def _estimator_imports() -> dict[str, set[str]]:
    """For each module of ``fogzo.estimators``: the modules of the package it imports, at any
    depth, ``TYPE_CHECKING`` blocks included."""
    graph = {}
    for path in sorted(ESTIMATORS.glob("*.py")):
        module = _module_name(path)
        graph[module] = {target for _, target in file_imports(path)
                         if target.startswith("fogzo.estimators.") and target.count(".") == 2 and target != module}
    return graph


def test_the_estimators_have_no_import_cycle_and_import_no_private_name():
    """No cycle, also not under ``TYPE_CHECKING``; no ``_name`` imported from another module; at
    most 11 files of at most 400 lines."""
    graph = {module: {t for t in targets if t in _estimator_imports()} for module, targets in _estimator_imports().items()}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(path + [module])}")
        if state.get(module) == 2:
            return
        state[module] = 1
        for target in sorted(graph[module]):
            visit(target, path + [module])
        state[module] = 2

    for module in graph:
        visit(module, [])
    private = [f"{path.relative_to(PACKAGE)}: {target}" for path in core_files() for _, target in file_imports(path)
               if target.rpartition(".")[2].startswith("_") and not target.rpartition(".")[2].startswith("__")
               and target.startswith("fogzo.") and (target.startswith("fogzo.estimators.") or path.parent == ESTIMATORS)]
    assert not private, private
    files = sorted(ESTIMATORS.glob("*.py"))
    assert len(files) <= 11, [path.name for path in files]
    # (smoothed.py, the smoothed-gradient oracle, is no part of a FOGZO or n-SPSA step.)
    long = {path.name: n for path in files if path.name != "smoothed.py"
            and (n := len(path.read_text(encoding="utf-8").splitlines())) > 400}
    assert not long, long
