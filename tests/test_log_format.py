"""``MQCHAT_LOG_FORMAT=json``: the daemons' log lines as JSON objects, same fields.

Run in a child process, as a daemon configures logging for its whole process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from core.daemon import EXIT_CONFIG

LOG_ONE_LINE = (
    "import logging; from core.daemon import configure_logging; "
    "configure_logging('bridge'); logging.getLogger('x').warning('held %d uplinks', 3)"
)


def run(log_format: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MQCHAT_LOG_FORMAT": log_format}
    return subprocess.run(
        [sys.executable, "-c", LOG_ONE_LINE], env=env, capture_output=True, text=True, timeout=60
    )


def test_json_lines_carry_the_fields_of_the_text_ones() -> None:
    text = run("text")
    assert text.returncode == 0, text.stderr
    assert text.stderr.rstrip().endswith(" bridge WARNING held 3 uplinks")
    done = run("json")
    assert done.returncode == 0, done.stderr
    line = json.loads(done.stderr)
    assert set(line) == {"time", "daemon", "level", "message"}
    assert (line["daemon"], line["level"], line["message"]) == (
        "bridge",
        "WARNING",
        "held 3 uplinks",
    )
    assert line["time"][:4] == text.stderr[:4]  # the same asctime, year first


@pytest.mark.parametrize("value", ["xml", ""])
def test_a_bad_format_is_a_bad_setting(value: str) -> None:
    done = run(value)
    assert done.returncode == EXIT_CONFIG
    assert "MQCHAT_LOG_FORMAT: expected text or json" in done.stderr
