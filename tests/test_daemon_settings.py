"""A daemon started with a missing or bad setting names the variable and exits 78.

Run as an operator runs them (``python -m ...``), with the environment they would
have forgotten to fill: no traceback, no pydantic field names, the variable to set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

WAIT = 30.0


def run_daemon(module: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MQCHAT_")}
    return subprocess.run(
        [sys.executable, "-m", module],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )


@pytest.mark.parametrize(
    ("module", "env", "expected"),
    [
        ("bridge", {"MQCHAT_BRIDGE_DATABASE_URL": "sqlite://"}, "MQCHAT_BRIDGE_PASSWORD: missing"),
        ("bridge", {}, "MQCHAT_BRIDGE_DATABASE_URL: missing"),
        (
            "bridge",
            {
                "MQCHAT_BRIDGE_DATABASE_URL": "sqlite://",
                "MQCHAT_BRIDGE_PASSWORD": "x" * 16,
                "MQCHAT_BRIDGE_MQTT_PORT": "not-a-port",
            },
            "MQCHAT_BRIDGE_MQTT_PORT: Input should be a valid integer",
        ),
        (
            "broker",
            {"MQCHAT_BROKER_DATABASE_URL": "sqlite://"},
            "MQCHAT_BROKER_BRIDGE_PASSWORD: missing",
        ),
        (
            "broker",
            {
                "MQCHAT_BROKER_DATABASE_URL": "sqlite://",
                "MQCHAT_BROKER_BRIDGE_PASSWORD": "x" * 16,
                "MQCHAT_BROKER_PORT": "70000",
            },
            "MQCHAT_BROKER_PORT: Input should be less than or equal to 65535",
        ),
        ("history_api", {}, "MQCHAT_API_DATABASE_URL: missing"),
        (
            "history_api",
            {"MQCHAT_API_DATABASE_URL": "sqlite://", "MQCHAT_API_PORT": "eighty"},
            "MQCHAT_API_PORT: Input should be a valid integer",
        ),
    ],
)
def test_a_bad_setting_is_named_by_its_variable(
    module: str, env: dict[str, str], expected: str, tmp_path: Path
) -> None:
    result = run_daemon(module, **env)
    assert result.returncode == 78, result.stderr
    lines = result.stderr.splitlines()[1:]
    assert any(line.startswith(f"  {expected}") for line in lines), result.stderr
    assert result.stderr.startswith(f"{module}: bad configuration:\n")
    assert "Traceback" not in result.stderr
    assert "errors.pydantic.dev" not in result.stderr


def test_the_bridge_refuses_a_database_not_at_the_newest_schema(tmp_path: Path) -> None:
    """An empty (never migrated) database: exit 78 and the command that fixes it,
    before the bridge takes any uplink it could not store."""
    done = run_daemon(
        "bridge",
        MQCHAT_BRIDGE_DATABASE_URL=f"sqlite:///{tmp_path / 'empty.db'}",
        MQCHAT_BRIDGE_PASSWORD="x" * 16,
    )
    assert done.returncode == 78, done.stderr
    assert "at revision None" in done.stderr
    assert "run `mqchat db upgrade` first" in done.stderr
