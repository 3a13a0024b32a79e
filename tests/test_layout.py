"""Imports run one way, and nothing imports a test module.

The layers, clients > daemons > core > store > protocol, are ``[tool.importlinter]`` in
pyproject.toml, drawn in ``core/__init__.py``; import-linter follows indirect imports
too, so a chain that climbs through a third module breaks it as surely as a direct
import. Its report names the offending lines.

Shared test machinery lives in ``tests/support/`` (STYLE.md rule 11). A helper that a
second test module (or a benchmark) needs moves there; importing ``conftest`` or a
``test_*`` module would run its module level again under another name and hide its
fixtures' scope.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WAIT = 120.0


def test_imports_run_down_the_layers() -> None:
    # The console script beside this interpreter: the venv's, whoever runs pytest.
    lint_imports = Path(sys.executable).with_name("lint-imports")
    assert lint_imports.exists(), f"{lint_imports} missing: install the dev extra"
    result = subprocess.run(
        [lint_imports, "--no-cache", "--no-logo", "pyproject.toml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"an import runs upward or sideways:\n{result.stdout}{result.stderr}")
    assert "0 broken" in result.stdout


def imports(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """``(line, absolute module, imported names)`` of each import in ``path``."""
    package = ".".join(path.relative_to(ROOT).parent.parts)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            if node.level:
                module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            else:
                module = node.module or ""
            names = [alias.name for alias in node.names]
            yield node.lineno, module, names
            # ``from tests import test_chat`` imports a module too.
            yield from ((node.lineno, f"{module}.{name}", []) for name in names)


def is_test_module(module: str) -> bool:
    parts = module.split(".")
    return parts[0] == "tests" and (
        "conftest" in parts or any(part.startswith("test_") for part in parts)
    )


def sources() -> list[Path]:
    return sorted([*(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").rglob("*.py")])


def test_no_module_imports_conftest_or_a_test_module() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in sources()
        for line, module, _ in imports(path)
        if is_test_module(module)
    ]
    assert found == []


def test_benchmarks_import_only_public_names_of_the_support_package() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line}: {module} {names}"
        for path in sorted((ROOT / "bench").rglob("*.py"))
        for line, module, names in imports(path)
        if module.startswith("tests")
        and (
            not module.startswith("tests.support")
            or any(part.startswith("_") for part in module.split("."))
            or any(name.startswith("_") for name in names)
        )
    ]
    assert found == []


def test_the_check_sees_what_it_forbids(tmp_path: Path) -> None:
    """The walk above is itself code: a relative and an absolute import of a test module
    are both caught, a support import is not."""
    assert is_test_module("tests.conftest")
    assert is_test_module("tests.test_chat")
    assert not is_test_module("tests.support.stack")
    sample = ROOT / "tests" / "support" / "stack.py"
    modules = {module for _, module, _ in imports(sample)}
    assert "tests.support.services" in modules
