"""The JavaScript SDK's and the web app's own tests (clients/js, node's test runner),
run from here so that `make test`, and so CI, runs them: each starts a real
`mqchat up` of this checkout (the venv's `mqchat`) and, for the browser, Debian's
chromium through playwright-core. `make web` built them (a prerequisite of `make test`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

JS = Path(__file__).resolve().parents[1] / "clients" / "js"
MQCHAT = Path(sys.executable).with_name("mqchat")


def _node_tests(script: str, timeout: float) -> None:
    assert (JS / "dist" / "test").is_dir(), "clients/js is not built: run `make web`"
    result = subprocess.run(
        ["npm", "run", "--silent", script],
        cwd=JS,
        env={**os.environ, "MQCHAT_BIN": str(MQCHAT)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, f"npm run {script} failed:\n{result.stdout}\n{result.stderr}"


# One xdist worker for both: each starts a whole stack, and the browser two chromiums.
@pytest.mark.xdist_group("cpu_heavy")
@pytest.mark.timeout(420)
def test_js_sdk_against_mqchat_up() -> None:
    _node_tests("test", 400)


@pytest.mark.xdist_group("cpu_heavy")
@pytest.mark.timeout(600)
def test_web_app_in_chromium() -> None:
    _node_tests("test:browser", 580)
