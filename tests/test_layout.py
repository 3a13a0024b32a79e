"""Imports run one way: clients > daemons > core > store > protocol.

The contract is ``[tool.importlinter]`` in pyproject.toml, drawn in ``core/__init__.py``;
import-linter follows indirect imports too, so a chain that climbs through a third
module breaks it as surely as a direct import. Its report names the offending lines.
"""

from __future__ import annotations

import subprocess
import sys
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
