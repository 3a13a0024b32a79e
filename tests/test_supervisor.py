"""``core.supervisor.Child`` from plain code and from a loop, as tests and benchmarks use it.

``mqchat up`` covers ``Supervisor`` (tests/test_cli.py); here, the one child on its
own: a real ``python -m broker``, ready by its log line and its port, stopped by
SIGTERM; one with a bad setting, whose exit is reported with its log; and a child's
settings as its environment.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bridge.config import BridgeSettings
from core import daemon
from core.daemon import BROKER_READY_LOG, EXIT_CONFIG, EXIT_OK
from core.supervisor import Child, NotReady

from .support.services import free_port

WAIT = 60.0


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQCHAT_")}
    return {**env, **extra}


def test_a_child_is_ready_by_its_line_and_port_and_stops(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(
        MQCHAT_BROKER_DATABASE_URL=f"sqlite:///{tmp_path / 'mqchat.db'}",
        MQCHAT_BROKER_BRIDGE_PASSWORD="bridge-secret-1",
        MQCHAT_BROKER_PORT=str(port),
        MQCHAT_BROKER_WS_PORT="0",
    )
    child = Child(
        "broker",
        "broker",
        env,
        tmp_path / "broker.log",
        ready_line=BROKER_READY_LOG,
        ports=[("127.0.0.1", port)],
    )
    child.start()
    try:
        child.wait_ready(WAIT)
        assert child.alive
        assert child.starts == 1
    finally:
        assert child.stop(WAIT) == EXIT_OK
    assert "shutdown: done" in child.log_text()
    assert not child.alive


async def test_an_exit_while_starting_is_reported_with_the_log(tmp_path: Path) -> None:
    child = Child(
        "broker", "broker", clean_env(), tmp_path / "broker.log", ready_line=BROKER_READY_LOG
    )
    child.start(banner="--- a test starts the broker ---")
    with pytest.raises(NotReady, match=f"exited with code {EXIT_CONFIG} while starting"):
        await child.until_ready(WAIT)
    assert await child.exited() == EXIT_CONFIG
    with pytest.raises(NotReady, match="MQCHAT_BROKER_DATABASE_URL: missing"):
        child.wait_for_log(BROKER_READY_LOG, timeout=WAIT)
    assert child.log_text().startswith("--- a test starts the broker ---\n")


def test_a_child_runs_with_its_settings_and_changes_them_by_field(tmp_path: Path) -> None:
    """What a crash test does to the bridge between two starts: its settings are the
    whole truth of its environment, and a misspelt change raises instead of vanishing."""
    settings = daemon.build(BridgeSettings, database_url="sqlite://", password="pw")
    inherited = {"PATH": "/bin", "MQCHAT_BRIDGE_CRASH_AT": "after_commit:1"}
    child = Child("bridge", "bridge", inherited, tmp_path / "bridge.log", settings=settings)
    assert child.env == {"PATH": "/bin", **daemon.environment(settings)}

    child.reconfigure(crash_at="before_commit:3", mqtt_port=1884)
    assert child.env["MQCHAT_BRIDGE_CRASH_AT"] == "before_commit:3"
    assert child.env["MQCHAT_BRIDGE_MQTT_PORT"] == "1884"
    child.reconfigure(crash_at=None)
    assert "MQCHAT_BRIDGE_CRASH_AT" not in child.env
    assert child.env["MQCHAT_BRIDGE_MQTT_PORT"] == "1884"
    with pytest.raises(TypeError, match="crash_point"):
        child.reconfigure(crash_point="before_commit:3")
