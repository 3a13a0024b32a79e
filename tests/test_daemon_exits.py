"""How the embedded broker ends, as an operator meets it: real processes, real ports.

A port it cannot bind is its own exit code and one line naming what to check; the
first SIGTERM shuts it down cleanly (exit 0); a second signal during the shutdown
exits at once (130). For the second, the process is stopped (SIGSTOP) while both
signals are sent, so both are pending when it resumes: the second arrives during
the shutdown the first began, every time, with no sleep guessing when that is.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.daemon import BROKER_READY_LOG, EXIT_CANNOT_LISTEN, EXIT_FORCED, EXIT_OK

from .support.services import free_port

WAIT = 60.0


def broker_env(tmp_path: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQCHAT_")}
    env.update(
        MQCHAT_BROKER_DATABASE_URL=f"sqlite:///{tmp_path / 'mqchat.db'}",
        MQCHAT_BROKER_BRIDGE_PASSWORD="bridge-secret-1",
        MQCHAT_BROKER_PORT=str(port),
        MQCHAT_BROKER_WS_PORT="0",
    )
    return env


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """``python -m broker``, returned once it says it listens."""
    process = subprocess.Popen(
        [sys.executable, "-m", "broker"],
        env=broker_env(tmp_path, free_port()),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    seen = []
    for line in process.stderr:  # pytest-timeout bounds a broker that never says it
        seen.append(line)
        if BROKER_READY_LOG in line:
            break
    else:
        pytest.fail(f"the broker exited before it was ready:\n{''.join(seen)}")
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stderr.close()


def test_a_port_in_use_is_its_own_exit_code(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "broker"],
            env=broker_env(tmp_path, port),
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=False,
        )
    assert result.returncode == EXIT_CANNOT_LISTEN, result.stderr
    said = [line for line in result.stderr.splitlines() if "cannot listen:" in line]
    assert len(said) == 1, result.stderr
    assert f"('127.0.0.1', {port})" in said[0]
    assert "(check MQCHAT_BROKER_HOST and the ports)" in said[0]
    assert "Traceback" not in result.stderr


def test_sigterm_shuts_down_cleanly(broker: subprocess.Popen[str]) -> None:
    broker.send_signal(signal.SIGTERM)
    assert broker.wait(WAIT) == EXIT_OK
    assert broker.stderr is not None
    assert "shutdown: done" in broker.stderr.read()


def test_a_second_signal_exits_at_once(broker: subprocess.Popen[str]) -> None:
    broker.send_signal(signal.SIGSTOP)
    try:
        broker.send_signal(signal.SIGTERM)
        broker.send_signal(signal.SIGINT)
    finally:
        broker.send_signal(signal.SIGCONT)
    assert broker.wait(WAIT) == EXIT_FORCED
    assert broker.stderr is not None
    log = broker.stderr.read()
    assert "second signal: exiting now" in log
    assert "shutdown: done" not in log
