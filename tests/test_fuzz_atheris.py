"""A few seconds of the coverage-guided fuzzer (``python -m bench.fuzz``) per target.

The long run (100,000+ inputs each) is recorded in ``docs/security.md``; this keeps
the command working and catches a regression the seed corpus reaches quickly.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize(("target", "runs"), [("decode", 20_000), ("pipeline", 3_000)])
def test_short_fuzz_run_finds_nothing(target: str, runs: int, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.fuzz",
            target,
            "--runs",
            str(runs),
            "--artifacts",
            str(tmp_path),
            "--",
            "-max_total_time=60",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert f"Done {runs} runs" in output, output[-3000:]
    assert f"stat::number_of_executed_units: {runs}" in output
    assert not list(tmp_path.glob("crash-*"))
