"""The ``mqchat`` command, run as a user would: the installed executable, as processes.

``mqchat up`` runs on free ports with a data dir in tmp_path; every other command
talks to it through that data dir and port. Output is read by threads, so every
wait has a deadline and none is a fixed sleep.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
from sqlmodel import Session

from store import accounts, make_engine
from store import admin as store_admin

from .support.services import MosquittoServer, PostgresServer, free_port, start_mosquitto

MQCHAT = Path(sys.executable).parent / "mqchat"
WAIT = 20.0
#: For a daemon's ready line: a start imports, migrates and binds, which on a loaded
#: 2-core machine (the suite's workers beside it) has taken over 20 s.
START_WAIT = 60.0
PASSWORDS = {"alice": "alice-secret", "bob": "bob-secret-1", "carol": "carol-secret"}


class Lines:
    """Lines of a child's stream, collected by a thread as they come."""

    def __init__(self, stream: IO[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        """The first line from now on that matches ``pattern`` (a regex, searched)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._queue.get(timeout=max(remaining, 0))
            except queue.Empty:
                raise TimeoutError(
                    f"no line matching {pattern!r} in {timeout} s; seen: {self.seen}"
                ) from None
            if line is None:
                raise EOFError(f"stream ended before {pattern!r}; seen: {self.seen}")
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def rest(self, timeout: float = WAIT) -> list[str]:
        """Everything until the stream closes."""
        deadline = time.monotonic() + timeout
        out = []
        while (line := self._queue.get(timeout=max(deadline - time.monotonic(), 0))) is not None:
            self.seen.append(line)
            out.append(line)
        return out


@dataclass
class Background:
    process: subprocess.Popen[str]
    stdout: Lines
    stderr: Lines

    def finish(self, timeout: float = WAIT) -> tuple[int, list[str]]:
        lines = self.stdout.rest(timeout)
        return self.process.wait(timeout), lines


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQCHAT_")}
    env.update(extra)
    return env


def completed(
    argv: Sequence[str | Path],
    *,
    env: dict[str, str],
    input: str | None = None,
    timeout: float = WAIT,
    **options: Any,
) -> subprocess.CompletedProcess[str]:
    """``argv`` to its end, its output captured as text; the caller checks the exit code."""
    return subprocess.run(
        [str(arg) for arg in argv],
        env=env,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **options,
    )


def run_mqchat(
    *args: str, env: dict[str, str], input: str | None = None, timeout: float = WAIT
) -> subprocess.CompletedProcess[str]:
    return completed([MQCHAT, *args], env=env, input=input, timeout=timeout)


def spawn(*args: str, env: dict[str, str], stdin: int | None = subprocess.DEVNULL) -> Background:
    process = subprocess.Popen(
        [str(MQCHAT), *args],
        env=env,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    return Background(process, Lines(process.stdout), Lines(process.stderr))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Up:
    """A running ``mqchat up`` and how to reach it."""

    run: Background
    data_dir: Path
    mqtt_port: int
    api_port: int
    pids: dict[str, int] = field(default_factory=dict)

    def env(self, user: str | None = None, password: str | None = None) -> dict[str, str]:
        extra = {"MQCHAT_DATA_DIR": str(self.data_dir), "MQCHAT_MQTT_PORT": str(self.mqtt_port)}
        if user is not None:
            extra["MQCHAT_USER"] = user
            extra["MQCHAT_PASSWORD"] = password if password is not None else PASSWORDS[user]
        return base_env(**extra)

    def mqchat(
        self,
        *args: str,
        user: str | None = None,
        password: str | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return run_mqchat(*args, env=self.env(user, password), input=input)

    def add_users(self, *names: str) -> None:
        for name in names:
            result = self.mqchat(
                "user", "add", name, "--password-stdin", input=PASSWORDS[name] + "\n"
            )
            assert (result.returncode, result.stdout) == (0, f"created {name}\n"), result.stderr

    def listen(self, user: str, *args: str) -> Background:
        """``mqchat listen`` in the background, returned once it is subscribed."""
        listener = spawn("listen", *args, env=self.env(user))
        listener.stderr.wait_for(f"^listening as {user} ")
        return listener

    def wait_started(self) -> None:
        line = r"^(broker|bridge|api|push) .*\(pid (\d+)\)$"
        while not {"api", "bridge", "push"} <= set(self.pids):
            match = self.run.stdout.wait_for(line, START_WAIT)
            self.pids[match.group(1)] = int(match.group(2))
        self.run.stdout.wait_for(r"^(create a user|chat): mqchat ")


def start_up(data_dir: Path, *extra: str, mqtt_port: int | None = None) -> Up:
    mqtt_port = mqtt_port or free_port()
    api_port = free_port()
    args = [
        "up",
        "--data-dir",
        str(data_dir),
        "--mqtt-port",
        str(mqtt_port),
        "--ws-port",
        str(free_port()),
        "--api-port",
        str(api_port),
        *extra,
    ]
    up = Up(spawn(*args, env=base_env()), data_dir, mqtt_port, api_port)
    try:
        up.wait_started()
    except (TimeoutError, EOFError) as exc:
        # mqchat up says on stderr which child did not come up, and its log's tail.
        stop_up(up)
        raise AssertionError(f"{exc}\nstderr: {up.run.stderr.rest()}") from None
    except BaseException:
        stop_up(up)
        raise
    return up


def stop_up(up: Up) -> int:
    process = up.run.process
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(WAIT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for pid in up.pids.values():  # never leave a child behind, even if up misbehaved
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return process.returncode


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    running = start_up(tmp_path / "data")
    try:
        yield running
    finally:
        stop_up(running)


def test_send_listen_chat_and_refusals(up: Up) -> None:
    up.add_users("alice", "bob")

    bob = up.listen("bob", "--count", "1")
    sent = up.mqchat("send", "--to", "bob", "hi", user="alice")
    assert sent.returncode == 0, sent.stderr
    conversation = re.fullmatch(r"sent (c_\w+) #1\n", sent.stdout)
    assert conversation is not None, sent.stdout
    code, lines = bob.finish()
    assert (code, lines) == (0, [f"[{conversation.group(1)} #1] alice: hi"])

    alice = up.listen("alice", "--count", "1")
    chat = up.mqchat("chat", "alice", user="bob", input="hello alice\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout == ""  # bob's own line is not echoed back to him
    code, lines = alice.finish()
    assert (code, lines) == (0, [f"[{conversation.group(1)} #2] bob: hello alice"])

    unknown = up.mqchat("send", "--to", "nobody", "hi", user="alice")
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("error unknown_recipient: ")
    assert unknown.stdout == ""

    refused = up.mqchat("send", "--to", "bob", "hi", user="alice", password="not-her-password")
    assert refused.returncode == 77
    assert "refused 'alice'" in refused.stderr

    health = httpx.get(f"http://127.0.0.1:{up.api_port}/healthz", timeout=WAIT)
    assert health.json() == {"status": "ok"}

    # Starting, chatting and refusing a password are all routine: nothing in the
    # broker's log may look like a failure to the person reading it.
    broker_log = (up.data_dir / "logs" / "broker.log").read_text()
    assert " ERROR " not in broker_log, broker_log[-3000:]
    assert "Traceback" not in broker_log, broker_log[-3000:]


def test_up_tells_where_each_daemon_answers_for_its_health(up: Up) -> None:
    endpoints = json.loads((up.data_dir / "endpoints.json").read_text())
    assert set(endpoints) == {"broker", "bridge", "api"}
    assert endpoints["api"] == f"http://127.0.0.1:{up.api_port}"
    for name, url in endpoints.items():
        ready = httpx.get(f"{url}/readyz", timeout=WAIT)
        assert (ready.status_code, ready.json()["status"]) == (200, "ready"), name
        assert "# TYPE process_cpu_seconds_total counter" in httpx.get(f"{url}/metrics").text


def test_status_once_json_reads_the_daemons(up: Up) -> None:
    up.add_users("alice", "bob")
    bob = up.listen("bob", "--count", "1")
    assert up.mqchat("send", "--to", "bob", "hi", user="alice").returncode == 0
    assert bob.finish()[0] == 0
    result = up.mqchat("status", "--once", "--json", "--sample", "0.5")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert {name: h["state"] for name, h in shown["health"].items()} == {
        "broker": "ready",
        "bridge": "ready",
        "api": "ready",
    }
    assert shown["connected_devices"] >= 1  # the bridge, at least
    assert shown["undelivered"] is not None
    assert shown["window_seconds"] > 0


def test_status_quantile_is_prometheus_histogram_quantile() -> None:
    from clients.cli.status import quantile

    before = {0.1: 0.0, 1.0: 0.0, math.inf: 0.0}
    after = {0.1: 50.0, 1.0: 100.0, math.inf: 100.0}
    assert quantile(0.5, before, after) == pytest.approx(0.1)
    assert quantile(0.75, before, after) == pytest.approx(0.55)
    assert quantile(0.5, after, after) is None


def test_listen_json_and_chat_shows_the_peer(up: Up) -> None:
    up.add_users("alice", "bob")
    bob = up.listen("bob", "--count", "1", "--json")
    assert up.mqchat("send", "--to", "bob", "one", user="alice").returncode == 0
    code, [line] = bob.finish()
    assert code == 0
    assert re.fullmatch(
        r'\{"id":"\w+","conversation":"c_\w+","seq":1,"from":"alice","body":"one",'
        r'"sent_at":"[^"]+Z"\}',
        line,
    ), line

    # alice chats through a pipe that stays open while the others write to her.
    chat = spawn("chat", "bob", env=up.env("alice"), stdin=subprocess.PIPE)
    assert chat.process.stdin is not None
    chat.stderr.wait_for("^chatting with bob as alice")
    assert up.mqchat("send", "--to", "alice", "yes", user="bob").returncode == 0
    chat.stdout.wait_for("^bob: yes$")
    other_device = up.mqchat("send", "--to", "bob", "from my phone", user="alice")
    assert other_device.returncode == 0, other_device.stderr
    chat.stdout.wait_for("^alice: from my phone$")
    chat.process.stdin.write("are you there?\n")
    chat.process.stdin.close()
    code, rest = chat.finish()
    assert (code, rest) == (0, [])  # her own line is not printed back to her

    # bob's device "cli-listen" was offline since its listen: the broker kept what came.
    bob = up.listen("bob", "--count", "3")
    code, lines = bob.finish()
    assert code == 0
    assert [line.split("] ", 1)[1] for line in lines] == [
        "bob: yes",
        "alice: from my phone",
        "alice: are you there?",
    ]


def test_a_group_from_the_command_line(up: Up) -> None:
    up.add_users("alice", "bob", "carol")

    def mqchat(*args: str, user: str = "alice") -> tuple[int, str, str]:
        env = up.env(user) | {"MQCHAT_API_URL": f"http://127.0.0.1:{up.api_port}"}
        result = run_mqchat(*args, env=env)
        return result.returncode, result.stdout, result.stderr

    code, out, err = mqchat("group", "create", "climbing", "--member", "bob")
    assert code == 0, err
    created = re.fullmatch(r"(c_\w+)\n", out)
    assert created is not None, out
    group = created.group(1)

    # bob's listen starts after the group's first seq: it shows from #2 on.
    bob = up.listen("bob", "--count", "3", "--device", "bob-listen")
    alice = up.listen("alice", "--receipts", "--device", "alice-listen")
    assert mqchat("group", "add", group, "carol")[:2] == (0, f"added {group} #2\n")
    assert mqchat("send", "--conversation", group, "saturday?")[:2] == (0, f"sent {group} #3\n")
    assert mqchat("group", "rename", group, "climbing club")[:2] == (0, f"renamed {group} #4\n")
    code, lines = bob.finish()
    assert code == 0
    assert lines == [
        f"[{group} #2] * alice added carol",
        f"[{group} #3] alice: saturday?",
        f'[{group} #4] * alice renamed the group to "climbing club"',
    ]
    # bob's listen acked "delivered": alice sees one of two.
    alice.stdout.wait_for(rf"^\[{group} #3\] delivered to 1 of 2, read by 0 of 2$")

    code, out, _ = mqchat("group", "members", group)
    assert (code, out) == (
        0,
        "alice admin since #1\nbob member since #1\ncarol member since #2\n",
    )
    code, out, _ = mqchat("group", "list", user="bob")
    assert (code, out) == (0, f"{group} climbing club (3 members)\n")

    code, _, err = mqchat("group", "add", group, "alice", user="bob")
    assert (code, err.split(":")[0]) == (1, "error forbidden")
    assert mqchat("group", "promote", group, "bob")[:2] == (0, f"promoted {group} #5\n")
    assert mqchat("group", "demote", group, "alice", user="bob")[:2] == (0, f"demoted {group} #6\n")
    assert mqchat("group", "leave", group, user="carol")[:2] == (0, f"left {group} #7\n")
    assert mqchat("group", "remove", group, "alice", user="bob")[:2] == (0, f"removed {group} #8\n")
    code, out, _ = mqchat("group", "list", user="carol")
    assert (code, out) == (0, f"{group} climbing club (left)\n")
    code, _, err = mqchat("group", "members", group, user="carol")
    assert (code, err.split(":")[0]) == (1, "error unknown_conversation")
    alice.process.terminate()
    alice.finish()


def test_a_stock_client_chats_with_an_mqtt_credential(up: Up) -> None:
    """`mqchat up` issues MQTT credentials (its key made once, in secrets.json), and
    `mqchat mqtt-credential` hands one to mosquitto_pub, which never sees the password."""
    up.add_users("alice", "bob")
    bob = up.listen("bob", "--count", "1")
    env = up.env("alice") | {"MQCHAT_API_URL": f"http://127.0.0.1:{up.api_port}"}
    made = run_mqchat("mqtt-credential", "--device", "pub", env=env)
    assert made.returncode == 0, made.stderr
    credential = json.loads(made.stdout)
    assert credential["client_id"] == "alice:pub"
    assert "mqtt_credential_secret" in json.loads((up.data_dir / "secrets.json").read_text())

    uplink = json.dumps({"id": "pub-1", "to": "bob", "body": "from mosquitto_pub"})
    published = subprocess.run(
        [
            "mosquitto_pub",
            *("-h", "127.0.0.1", "-p", str(up.mqtt_port), "-q", "1"),
            *("-u", "alice", "-i", credential["client_id"], "-P", credential["password"]),
            *("-t", "chat/v1/u/alice/up/msg", "-m", uplink),
        ],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert published.returncode == 0, published.stderr
    code, lines = bob.finish()
    assert code == 0
    assert lines[0].endswith("alice: from mosquitto_pub"), lines


def test_listen_and_chat_as_one_user_both_work(up: Up) -> None:
    """Each command has a device of its own: neither takes the other's session over."""
    up.add_users("alice", "bob")
    listener = up.listen("bob")
    chat = spawn("chat", "alice", env=up.env("bob"), stdin=subprocess.PIPE)
    assert chat.process.stdin is not None
    try:
        chat.stderr.wait_for("^chatting with alice as bob")
        assert up.mqchat("send", "--to", "bob", "to both", user="alice").returncode == 0
        chat.stdout.wait_for("^alice: to both$")
        listener.stdout.wait_for(r"\] alice: to both$")
        chat.process.stdin.write("typed in chat\n")
        chat.process.stdin.flush()
        # Stored and delivered: the listen of the same user shows bob's own line.
        listener.stdout.wait_for(r"\] bob: typed in chat$")
        chat.process.stdin.close()
        assert chat.process.wait(WAIT) == 0
        assert not [line for line in chat.stderr.seen + listener.stderr.seen if "lost" in line]
    finally:
        for process in (chat.process, listener.process):
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                process.wait(WAIT)


def test_a_session_taken_over_is_said_at_once(up: Up) -> None:
    up.add_users("bob")
    said_at_once_when_taken_over(up)


def said_at_once_when_taken_over(up: Up) -> None:
    """bob's second listen with the same device: both brokers, the same outcome.

    The first is cut off and says so at once. Then the two would take the session
    from each other for ever; instead the one cut off within moments of connecting
    gives up (exit 69, with the same advice) and the other keeps the session.
    """
    first = up.listen("bob", "--device", "laptop")
    second = spawn("listen", "--device", "laptop", env=up.env("bob"))
    advice = "it took this session over: give each its own --device$"
    try:
        first.stderr.wait_for(
            f"^mqchat: (connection to the broker lost|the session keeps).*{advice}"
        )
        deadline = time.monotonic() + WAIT
        while first.process.poll() is None and second.process.poll() is None:
            assert time.monotonic() < deadline, "neither gave the session up"
            with contextlib.suppress(subprocess.TimeoutExpired):
                second.process.wait(0.1)
        gave_up, kept = (first, second) if first.process.poll() is not None else (second, first)
        assert gave_up.process.wait(WAIT) == 69
        gave_up.stderr.rest()
        assert any(re.search(advice, line) for line in gave_up.stderr.seen)
        assert kept.process.poll() is None
        for listener in (first, second):
            assert not [line for line in listener.stderr.seen if "Traceback" in line]
    finally:
        for process in (first.process, second.process):
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                process.wait(WAIT)


def test_old_setting_names_still_work_with_a_warning(up: Up, tmp_path: Path) -> None:
    up.add_users("alice", "bob")
    env = up.env("alice")
    env["MQCHAT_PORT"] = env.pop("MQCHAT_MQTT_PORT")
    sent = run_mqchat("send", "--to", "bob", "hi", env=env)
    assert sent.returncode == 0, sent.stderr
    assert "mqchat: MQCHAT_PORT is deprecated, use MQCHAT_MQTT_PORT" in sent.stderr

    target = tmp_path / "dynamic-security.json"
    bootstrap = run_mqchat(
        "mosquitto",
        "bootstrap",
        "--out",
        str(target),
        env=base_env(
            MQCHAT_MOSQUITTO_ADMIN_USER="old-admin",
            MQCHAT_MOSQUITTO_ADMIN_PASSWORD="admin-pass-123",
            MQCHAT_BRIDGE_PASSWORD="bridge-pass-123",
        ),
    )
    assert bootstrap.returncode == 0, bootstrap.stderr
    assert "(admin old-admin, bridge mqchat-bridge)" in bootstrap.stdout
    assert "MQCHAT_MOSQUITTO_ADMIN_USER is deprecated" in bootstrap.stderr


def test_ctrl_c_stops_every_child(up: Up) -> None:
    pids = dict(up.pids)
    assert set(pids) == {"broker", "bridge", "api", "push"}
    assert all(alive(pid) for pid in pids.values())

    up.run.process.send_signal(signal.SIGINT)

    assert up.run.process.wait(WAIT) == 0
    assert up.run.stdout.rest()[-1] == "stopped"
    assert [name for name, pid in pids.items() if alive(pid)] == []


def _bindable(port: int) -> bool:
    """Free for a new server: SO_REUSEADDR as every server here sets (a connection in
    TIME_WAIT does not count, a listener does)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_ctrl_c_stops_every_child_when_nobody_reads_the_output(tmp_path: Path) -> None:
    """``make run | tee log`` then Ctrl-C: the terminal's SIGINT kills ``tee`` too."""
    ports = {"--mqtt-port": free_port(), "--ws-port": free_port(), "--api-port": free_port()}
    args = [str(MQCHAT), "up", "--data-dir", str(tmp_path / "data")]
    for option, port in ports.items():
        args += [option, str(port)]
    process = subprocess.Popen(
        args,
        env=base_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    pids: dict[str, int] = {}
    try:
        for line in process.stdout:
            if match := re.search(r"^(broker|bridge|api|push) .*\(pid (\d+)\)$", line):
                pids[match.group(1)] = int(match.group(2))
            if line.startswith("logs "):
                break
        assert set(pids) == {"broker", "bridge", "api", "push"}
        # Both readers gone, as with `tee` killed (and `|&`): every line now meets EPIPE.
        process.stdout.close()
        process.stderr.close()
        process.send_signal(signal.SIGINT)
        assert process.wait(WAIT) == 0
        assert [name for name, pid in pids.items() if alive(pid)] == []
        assert [port for port in ports.values() if not _bindable(port)] == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


#: Where Swagger UI's and ReDoc's pages name what they load: attributes, and the
#: schema's ``url: '/openapi.json'`` in Swagger UI's inline script.
ASSET_URL = r"""(?:src|href|spec-url)=["']([^"']+)["']|url: ?'([^']+)'"""


def test_docs_work_offline(up: Up) -> None:
    """/docs and /redoc load every script, stylesheet and icon from the API itself."""
    api = f"http://127.0.0.1:{up.api_port}"
    with httpx.Client(base_url=api, timeout=WAIT) as http:
        for page in ("/docs", "/redoc"):
            html = http.get(page)
            assert html.status_code == 200, html.text
            assets = re.findall(ASSET_URL, html.text)
            urls = {a or b for a, b in assets}
            assert len(urls) >= 3, html.text  # a script, a stylesheet or icon, the schema
            assert [u for u in urls if not u.startswith("/")] == []  # no CDN, no other host
            for url in urls:
                asset = http.get(url)
                assert (asset.status_code, url) == (200, url)
                assert asset.content


def test_a_restart_with_users_suggests_chatting(tmp_path: Path) -> None:
    first = start_up(tmp_path / "data")
    try:
        assert any(line.startswith("create a user: ") for line in first.run.stdout.seen)
        first.add_users("alice")
    finally:
        assert stop_up(first) == 0
    again = start_up(tmp_path / "data")
    try:
        seen = again.run.stdout.seen
        assert not [line for line in seen if "user add alice" in line]
        [hint] = [line for line in seen if line.startswith("chat: ")]
        assert f"mqchat chat PEER --user NAME --mqtt-port {again.mqtt_port}" in hint
    finally:
        stop_up(again)


def test_a_killed_bridge_is_restarted_and_loses_nothing(up: Up) -> None:
    up.add_users("alice", "bob")
    bob = up.listen("bob", "--count", "1")
    old = up.pids["bridge"]

    os.kill(old, signal.SIGKILL)
    # Sent at once: it meets either no bridge (the broker keeps it for the bridge's
    # session) or the restarted one.
    sent = up.mqchat("send", "--to", "bob", "after the crash", user="alice")

    assert sent.returncode == 0, sent.stderr
    assert re.fullmatch(r"sent c_\w+ #1\n", sent.stdout)
    code, [line] = bob.finish()
    assert code == 0
    assert line.endswith("] alice: after the crash")
    up.run.stdout.wait_for(r"^bridge +was killed by SIGKILL; restarting")
    new = int(up.run.stdout.wait_for(r"^bridge +\S+/metrics  \(pid (\d+)\)").group(1))
    assert new != old
    assert alive(new)
    up.pids["bridge"] = new


def test_a_bridge_that_keeps_dying_stops_everything(up: Up) -> None:
    pid = up.pids["bridge"]
    for _ in range(6):
        os.kill(pid, signal.SIGKILL)
        line = up.run.stdout.wait_for(r"^bridge +\S+/metrics  \(pid (\d+)\)|^stopping ")
        if line.group(0).startswith("stopping"):
            break
        pid = up.pids["bridge"] = int(line.group(1))

    assert up.run.process.wait(WAIT) == 1
    assert "stopping everything" in " ".join(up.run.stderr.rest())
    assert [name for name, pid in up.pids.items() if alive(pid)] == []


def test_accounts_and_schema_without_up(tmp_path: Path) -> None:
    mqchat = functools.partial(run_mqchat, env=base_env(MQCHAT_DATA_DIR=str(tmp_path / "data")))

    missing = mqchat("user", "add", "alice", "--password-stdin", input="alice-secret\n")
    assert missing.returncode == 78
    assert "mqchat db upgrade" in missing.stderr
    assert not (tmp_path / "data" / "mqchat.db").exists()

    upgraded = mqchat("db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert re.fullmatch(
        r"sqlite:///\S+/mqchat\.db: upgraded \(empty\) -> \w+ \(head\)\n", upgraded.stdout
    ), upgraded.stdout
    again = mqchat("db", "upgrade")
    assert re.fullmatch(r"sqlite:///\S+: already at \w+ \(head\)\n", again.stdout), again.stdout

    created = mqchat("user", "add", "alice", "--password-stdin", input="alice-secret\n")
    assert (created.returncode, created.stdout) == (0, "created alice\n")
    for name, password, code in [
        ("alice", "alice-secret", "username_taken"),
        ("Alice", "alice-secret", "username_taken"),  # the same name, normalised
        ("$sys", "alice-secret", "invalid_username"),
        ("carol", "short", "weak_password"),
    ]:
        refused = mqchat("user", "add", name, "--password-stdin", input=password + "\n")
        assert refused.returncode == 1, (name, refused.stderr)
        assert refused.stderr.startswith(f"error {code}: "), refused.stderr


def test_user_passwd_disable_enable_delete(tmp_path: Path) -> None:
    mqchat = functools.partial(run_mqchat, env=base_env(MQCHAT_DATA_DIR=str(tmp_path / "data")))

    def signs_in(password: str) -> bool:
        engine = make_engine(f"sqlite:///{tmp_path / 'data' / 'mqchat.db'}")
        try:
            with Session(engine) as session:
                return accounts.verify(session, "alice", password)
        finally:
            engine.dispose()

    def ok(*args: str, input: str | None = None) -> str:
        done = mqchat(*args, input=input)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def refused(code: str, *args: str, input: str | None = None) -> None:
        done = mqchat(*args, input=input)
        assert done.returncode == 1, (args, done.stdout)
        assert done.stderr.startswith(f"error {code}: "), done.stderr

    ok("db", "upgrade")
    assert ok("user", "add", "Alice", "--password-stdin", input="alice-secret\n") == (
        "created alice\n"
    )
    refused("weak_password", "user", "passwd", "alice", "--password-stdin", input="password\n")
    assert ok("user", "passwd", "ALICE", "--password-stdin", input="alice-new-secret\n") == (
        "password changed alice\n"
    )
    assert signs_in("alice-new-secret")
    assert not signs_in("alice-secret")

    def is_admin() -> bool:
        engine = make_engine(f"sqlite:///{tmp_path / 'data' / 'mqchat.db'}")
        try:
            with Session(engine) as session:
                return store_admin.is_admin(session, "alice")
        finally:
            engine.dispose()

    assert not is_admin()
    assert ok("user", "admin", "Alice") == "admin alice\n"
    assert is_admin()
    assert ok("user", "admin", "alice", "--revoke") == "not admin alice\n"
    assert not is_admin()

    assert ok("user", "disable", "alice") == "disabled alice\n"
    assert not signs_in("alice-new-secret")
    assert ok("user", "enable", "alice") == "enabled alice\n"
    assert signs_in("alice-new-secret")

    assert mqchat("user", "delete", "alice", input="n\n").returncode == 1  # not confirmed
    assert signs_in("alice-new-secret")
    assert ok("user", "delete", "alice", "--yes") == "deleted alice\n"
    assert not signs_in("alice-new-secret")
    refused("unknown_user", "user", "enable", "alice")
    refused("username_taken", "user", "add", "alice", "--password-stdin", input="another-one\n")
    for command in (["disable"], ["enable"], ["delete", "--yes"], ["admin"]):
        refused("unknown_user", "user", *command, "nobody")
    refused("invalid_username", "user", "disable", "al/ice")


def test_up_refuses_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_mqchat(
            "up",
            "--data-dir",
            str(tmp_path),
            "--api-port",
            str(port),
            "--mqtt-port",
            str(free_port()),
            "--ws-port",
            str(free_port()),
            env=base_env(),
        )
    assert result.returncode == 78
    assert f"port {port} (--api-port)" in result.stderr


def test_up_names_every_busy_port(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        ports = {}
        for option in ("--mqtt-port", "--ws-port", "--api-port"):
            busy = stack.enter_context(socket.socket())
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            ports[option] = busy.getsockname()[1]
        args = ["up", "--data-dir", str(tmp_path)]
        for option, port in ports.items():
            args += [option, str(port)]
        result = run_mqchat(*args, env=base_env())
    assert result.returncode == 78
    for option, port in ports.items():
        assert f"{port} ({option})" in result.stderr


# -- with mosquitto ------------------------------------------------------------------


def test_up_with_mosquitto(tmp_path: Path, own_mosquitto: MosquittoServer) -> None:
    mosquitto = own_mosquitto
    admin = ["--mosquitto-admin-password", mosquitto.admin.password]
    up = start_up(
        tmp_path / "data",
        "--mosquitto",
        f"{mosquitto.host}:{mosquitto.port}",
        "--mosquitto-bridge-password",
        mosquitto.bridge.password,
        *admin,
        mqtt_port=mosquitto.port,
    )
    try:
        assert "broker" not in up.pids
        assert any("(mosquitto, not started here)" in line for line in up.run.stdout.seen)
        for name in ("alice", "bob"):
            result = up.mqchat(
                "user",
                "add",
                name,
                "--password-stdin",
                "--mosquitto-port",
                str(mosquitto.port),
                *admin,
                input=PASSWORDS[name] + "\n",
            )
            assert result.returncode == 0, result.stderr
        # Through the API too: it provisions mosquitto itself.
        created = httpx.post(
            f"http://127.0.0.1:{up.api_port}/v1/users",
            json={"username": "carol", "password": "carol-secret"},
            timeout=WAIT,
        )
        assert created.status_code == 201, created.text

        said_at_once_when_taken_over(up)
        bob = up.listen("bob", "--count", "1")
        sent = up.mqchat("send", "--to", "bob", "via mosquitto", user="alice")
        assert sent.returncode == 0, sent.stderr
        code, [line] = bob.finish()
        assert (code, line.endswith("] alice: via mosquitto")) == (0, True)
        carol = up.mqchat("send", "--to", "bob", "hi", user="carol", password="carol-secret")
        assert carol.returncode == 0, carol.stderr
    finally:
        assert stop_up(up) == 0


def test_rabbitmq_configure_writes_the_clusters_own_files(tmp_path: Path) -> None:
    """The peers, the definitions file (the bridge's account, hashed) and the broker-auth
    URL with its secret; a secret that is not URL-safe is refused, as it goes into a URL
    path (compose's header makes URL-safe ones)."""
    out = tmp_path / "mqchat"
    secret = "s3cret-Token_1"
    args = ["rabbitmq", "configure", "--out", str(out), "--nodes", "rabbit@a,rabbit@b"]
    env = base_env(
        MQCHAT_BRIDGE_PASSWORD="bridge-long-password", MQCHAT_API_BROKER_AUTH_SECRET=secret
    )
    result = run_mqchat(*args, "--api-url", "http://api:8000/", env=env)
    assert result.returncode == 0, result.stderr
    conf = (out / "mqchat-cluster.conf").read_text().splitlines()
    assert "cluster_formation.classic_config.nodes.2 = rabbit@b" in conf
    assert f"load_definitions = {out / 'definitions.json'}" in conf
    assert f"auth_http.user_path = http://api:8000/broker-auth/{secret}/user" in conf
    definitions = (out / "definitions.json").read_text()
    assert [user["name"] for user in json.loads(definitions)["users"]] == ["mqchat-bridge"]
    assert "bridge-long-password" not in definitions

    env["MQCHAT_API_BROKER_AUTH_SECRET"] = "a/b+c"
    refused = run_mqchat(*args, "--api-url", "http://api:8000", env=env)
    assert refused.returncode == 78, refused.stderr
    assert "URL" in refused.stderr


async def test_mosquitto_bootstrap_writes_accounts_mosquitto_accepts(tmp_path: Path) -> None:
    """The operator's first step for production: the file mosquitto.conf points at."""
    from core.dynsec import Credentials
    from core.mqtt import ConnectRefused, MqttLink

    from .support.services import chown_tree

    server = start_mosquitto(tmp_path)
    try:
        server.stop()
        target = server.data_dir / "dynamic-security.json"
        target.unlink()
        env = base_env(
            MQCHAT_MOSQUITTO_ADMIN_PASSWORD="admin-pass-123",
            MQCHAT_BRIDGE_PASSWORD="bridge-pass-123",
        )
        bootstrap = ("mosquitto", "bootstrap", "--out", str(target))
        done = run_mqchat(*bootstrap, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "make mosquitto-plugin" in done.stdout
        assert "must name mqchat-admin and mqchat-bridge" in done.stdout
        assert oct(target.stat().st_mode & 0o777) == "0o600"
        again = run_mqchat(*bootstrap, env=env, timeout=60)
        assert again.returncode == 78
        assert "not overwritten" in again.stderr
        chown_tree(server.workdir, server.account)
        server.start()

        bridge = MqttLink(server.link_config(Credentials("mqchat-bridge", "bridge-pass-123"), "b"))
        await bridge.connect()
        await bridge.subscribe("chat/v1/u/+/up/#")
        await bridge.close()
        wrong = MqttLink(server.link_config(Credentials("mqchat-bridge", "bridge-pass-12"), "w"))
        with pytest.raises(ConnectRefused):
            await wrong.connect()
        await wrong.close()
    finally:
        server.close()


# -- the README, run as written ------------------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"
#: The passwords the README's chat section types (asserted to be in it below).
README_PASSWORDS = {"alice": "alices-password", "bob": "bobs-password"}


def readme_blocks_of(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


def readme_blocks(lang: str) -> list[str]:
    return readme_blocks_of(README.read_text(), lang)


def shell_lines(block: str) -> list[str]:
    """The block's commands, continuation lines joined; bash drops the comments."""
    lines = block.replace("\\\n", " ").splitlines()
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


class Readme:
    """Runs the README's lines the way a reader types them, one terminal per block.

    Only the ports differ from the text: the stack under test runs on free ports, so
    ``-p 1883`` and the SDK's ports are rewritten, and the ``mqchat`` commands get
    ``MQCHAT_MQTT_PORT`` (as the README says to do for other ports).
    """

    def __init__(self, up: Up) -> None:
        self.up = up
        self.background: list[Background] = []
        #: What each command run to its end printed.
        self.printed: dict[str, str] = {}

    def env(self) -> dict[str, str]:
        env = base_env(
            MQCHAT_MQTT_PORT=str(self.up.mqtt_port),
            MQCHAT_API_URL=f"http://127.0.0.1:{self.up.api_port}",
            MQCHAT_DATA_DIR=str(self.up.data_dir),
        )
        env["PATH"] = f"{MQCHAT.parent}{os.pathsep}{env['PATH']}"
        return env

    def ported(self, line: str) -> str:
        return line.replace("-p 1883", f"-p {self.up.mqtt_port}")

    def start(self, line: str, env: dict[str, str], stdin: int | None = None) -> Background:
        process = subprocess.Popen(
            ["bash", "-c", self.ported(line).rstrip("& ")],
            env=env,
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own group, so that all of it is stopped
        )
        assert process.stdout is not None
        assert process.stderr is not None
        running = Background(process, Lines(process.stdout), Lines(process.stderr))
        self.background.append(running)
        return running

    def run(self, line: str, env: dict[str, str], input: str | None = None) -> str:
        result = completed(
            ["bash", "-c", self.ported(line)],
            env=env,
            input=input,
            start_new_session=True,  # no terminal: the password prompt reads stdin
        )
        assert result.returncode == 0, (line, result.stderr)
        return result.stdout

    def terminal(self, lines: list[str]) -> dict[str, Background]:
        """Run one block's lines; long-running commands stay in the background."""
        env = self.env()
        started: dict[str, Background] = {}
        for line in lines:
            if line.startswith("export "):
                for assignment in shlex.split(line)[1:]:
                    key, _, value = assignment.partition("=")
                    env[key] = value
            elif match := re.search(r"mqchat user add (\w+)", line):
                password = README_PASSWORDS[match.group(1)]
                self.run(line, env, input=f"{password}\n{password}\n")
            elif re.search(r"mqchat (listen|chat)|mosquitto_sub", line):
                stdin = subprocess.PIPE if "mqchat chat" in line else None
                started[line] = self.start(line, env, stdin)
            else:
                self.printed[line] = self.run(line, env)
        return started

    def close(self) -> None:
        for running in self.background:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(running.process.pid, signal.SIGKILL)
            running.process.wait(WAIT)
            if running.process.stdin is not None:
                with contextlib.suppress(OSError):
                    running.process.stdin.close()


def only(started: dict[str, Background], fragment: str) -> Background:
    [found] = [running for line, running in started.items() if fragment in line]
    return found


def readme_sdk_script(up: Up, directory: Path) -> Path:
    """The README's SDK example as a file, its ports the stack's."""
    [snippet] = readme_blocks("python")
    script = directory / "readme_sdk.py"
    script.write_text(
        snippet.replace("127.0.0.1:8000", f"127.0.0.1:{up.api_port}").replace(
            "port=1883", f"port={up.mqtt_port}"
        )
    )
    return script


def test_the_readme_runs_as_written(up: Up, tmp_path: Path) -> None:
    text = README.read_text()
    assert all(password in text for password in README_PASSWORDS.values())
    blocks = {block.splitlines()[0]: block for block in readme_blocks("sh")}
    readme = Readme(up)
    try:
        # Terminal 2: two accounts, then bob listens.
        two = readme.terminal(shell_lines(blocks["# terminal 2: two accounts, then bob listens"]))
        bob_listen = only(two, "mqchat listen")
        bob_listen.stderr.wait_for("^listening as bob ")

        # Terminal 3: alice sends, then chats.
        three = readme.terminal(shell_lines(blocks["# terminal 3: alice writes"]))
        [sent] = [out for line, out in readme.printed.items() if "mqchat send" in line]
        assert re.fullmatch(r"sent c_\w+ #1\n", sent), sent
        bob_listen.stdout.wait_for(r"^\[c_\w+ #1\] alice: hi bob$")
        alice_chat = only(three, "mqchat chat bob")
        alice_chat.stderr.wait_for("^chatting with bob as alice")

        # Terminal 4: bob replies from a chat of his own, beside his listen.
        four = readme.terminal(shell_lines(blocks["# terminal 4: bob replies"]))
        bob_chat = only(four, "mqchat chat alice")
        bob_chat.stderr.wait_for("^chatting with alice as bob")
        assert bob_chat.process.stdin is not None
        bob_chat.process.stdin.write("hi alice\n")
        bob_chat.process.stdin.flush()
        alice_chat.stdout.wait_for("^bob: hi alice$")
        bob_listen.stdout.wait_for(r"\] bob: hi alice$")

        # Groups, after "mqchat user add carol" as the README's sentence asks: the block
        # in one shell, for its GROUP=$(...); the listen at its end is bob's above.
        readme.run("mqchat user add carol", readme.env(), input="carols-secret\n" * 2)
        [groups] = [block for block in blocks.values() if "mqchat group create" in block]
        lines = [line for line in shell_lines(groups) if "mqchat listen" not in line]
        printed = readme.run("set -e\n" + "\n".join(lines), readme.env())
        assert re.search(r"^sent c_\w+ #2$", printed, re.M), printed
        members = re.findall(r"^(\w+) (admin|member) since #(\d+)$", printed, re.M)
        assert members == [
            ("alice", "admin", "1"),
            ("bob", "member", "1"),
            ("carol", "member", "3"),
        ]
        assert re.search(r"^c_\w+ climbing \(3 members\)$", printed, re.M), printed
        bob_listen.stdout.wait_for(r'^\[c_\w+ #1\] \* alice created the group "climbing"')
        bob_listen.stdout.wait_for(r"^\[c_\w+ #2\] alice: saturday\?$")

        # The same with mosquitto_pub / mosquitto_sub.
        [stock] = [block for block in blocks.values() if "mosquitto_pub" in block]
        [pub] = [line for line in shell_lines(stock) if "mosquitto_pub" in line]
        subs = readme.terminal([line for line in shell_lines(stock) if line != pub])
        bob_sub, alice_sub = (only(subs, "-u bob"), only(subs, "-u alice"))
        env = readme.env()
        # mosquitto_sub says nothing once subscribed: publish (the same id, so the same
        # message) until bob's device has it, a bounded number of times.
        for _ in range(10):
            readme.run(pub, env)
            with contextlib.suppress(TimeoutError):
                bob_sub.stdout.wait_for(r'^chat/v1/u/bob/down/msg \{"id":"m1",.*"body":"hi bob"', 2)
                break
        else:
            raise AssertionError(f"bob's mosquitto_sub saw nothing: {bob_sub.stdout.seen}")
        alice_sub.stdout.wait_for(r'^chat/v1/u/alice/down/receipt \{"status":"sent",.*"id":"m1"')
        readme.run(pub.replace("""'{"id":"m1","to":"bob","body":"hi bob"}'""", "'oops'"), env)
        alice_sub.stdout.wait_for(r'^chat/v1/u/alice/down/error \{.*"code":"invalid_json"')

        # The SDK snippet, as a file run by Python.
        script = readme_sdk_script(up, tmp_path)
        sdk = readme.start(f"{sys.executable} {script}", env)
        sdk.stdout.wait_for(r"^stored as #\d+ in c_\w+$")
        sdk.stdout.wait_for("^bob: hi alice$")  # caught up from the history API
        assert sdk.process.poll() is None, sdk.stderr.seen
    finally:
        readme.close()


#: What the wheel is built from: the project file, the README it names, and the
#: top-level folders of [tool.setuptools] packages (copied, so that the build's own
#: build/ and *.egg-info stay out of the checkout).
PROJECT = README.parent
BUILT_FROM = ["pyproject.toml", "README.md"]

#: Run in the fresh venv: every third-party module `import mqchat` loads must come
#: from a distribution mqchat requires (directly or through another), so the
#: borrowed site-packages (see below) cannot hide a missing dependency.
UNDECLARED = """
import sys
before = set(sys.modules)  # the interpreter's own start-up (site, .pth hooks) aside
import mqchat
import importlib.metadata as md
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
own = set(md.distribution("mqchat").read_text("top_level.txt").split())
needed, todo = set(), ["mqchat"]
while todo:
    name = todo.pop()
    if name in needed:
        continue
    needed.add(name)
    for line in md.requires(name) or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            todo.append(canonicalize_name(req.name))
dists = md.packages_distributions()
loaded = {m.split(".")[0] for m in set(sys.modules) - before}
loaded -= set(sys.stdlib_module_names) | own
print(sorted(
    m for m in loaded
    if m in dists and not {canonicalize_name(d) for d in dists[m]} & needed
))
"""


def test_the_readme_sdk_example_runs_from_a_wheel_in_a_fresh_venv(up: Up, tmp_path: Path) -> None:
    """Issue 14's "done when": ``pip install`` of the package, then the README's example.

    Offline and quick: the wheel is built with this venv's setuptools
    (``--no-build-isolation``) and installed with ``--no-deps``; the fresh venv gets the
    runtime dependencies from this venv's site-packages through a ``.pth`` line, which
    Python appends after the venv's own site-packages. The wheel therefore wins over
    this checkout's editable install (whose import hook a ``.pth`` path line does not
    run), and :data:`UNDECLARED` proves the dependencies it borrows are declared.
    """
    source = tmp_path / "source"
    source.mkdir()
    for name in BUILT_FROM:
        shutil.copy2(PROJECT / name, source / name)
    config = tomllib.loads((PROJECT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = config.get("package-dir", {})
    top_level = {package.split(".")[0] for package in config["packages"]}
    for root in {mapped.get(name, name).split("/")[0] for name in top_level}:
        shutil.copytree(PROJECT / root, source / root, ignore=shutil.ignore_patterns("__pycache__"))

    def run(*args: str | Path) -> str:
        env = base_env(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
        done = completed(args, env=env, timeout=240, cwd=tmp_path)
        assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-2000:])
        return done.stdout

    wheels = tmp_path / "wheels"
    build = (sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation")
    run(*build, "-w", wheels, source)
    [wheel] = wheels.glob("mqchat-*.whl")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--no-deps", wheel)
    [site] = (venv / "lib").glob("python3*/site-packages")
    (site / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    where = run(python, "-c", "import mqchat, protocol; print(mqchat.__file__, protocol.__file__)")
    assert all(Path(path).is_relative_to(site) for path in where.split()), where
    assert run(python, "-c", UNDECLARED).strip() == "[]"

    for name, password in README_PASSWORDS.items():
        created = up.mqchat("user", "add", name, "--password-stdin", input=password + "\n")
        assert created.returncode == 0, created.stderr
    readme = Readme(up)
    try:
        sdk = readme.start(f"{python} {readme_sdk_script(up, tmp_path)}", readme.env())
        sdk.stdout.wait_for(r"^stored as #1 in c_\w+$")
        reply = up.mqchat(
            "send", "--to", "alice", "hi alice", user="bob", password=README_PASSWORDS["bob"]
        )
        assert reply.returncode == 0, reply.stderr
        sdk.stdout.wait_for("^bob: hi alice$")
        assert sdk.process.poll() is None, sdk.stderr.seen
    finally:
        readme.close()


def test_the_documented_command_lines_exist() -> None:
    """Every ``mqchat`` command and option the docs show is one ``--help`` lists.

    ``mqchat mosquitto bootstrap --admin-user`` was documented before it existed.
    """
    docs = [README, README.parent / "docs" / "operations.md"]
    shown = set()
    for text in (path.read_text() for path in docs):
        shown.update(re.findall(r"`(mqchat [^`]+)`", text))
        for block in re.findall(r"^```sh\n(.*?)^```", text, re.S | re.M):
            shown.update(re.findall(r"^(mqchat [^#\n]+)", block, re.M))
    options: dict[tuple[str, ...], set[str]] = {}
    for line in shown:
        words = shlex.split(line.replace("|", " ").replace("[", "").replace("]", ""))
        command = tuple(w for w in words[1:4] if re.fullmatch(r"[a-z]+", w))
        options.setdefault(command, set()).update(
            w.split("=")[0] for w in words if w.startswith("--")
        )
    assert len(options) >= 8
    for command, wanted in sorted(options.items()):
        result = run_mqchat(*command, "--help", env=base_env(COLUMNS="200"))
        assert result.returncode == 0, (command, result.stderr)
        assert sorted(o for o in wanted if o not in result.stdout) == [], command


def test_the_documented_postgresql_setup_works(postgres: PostgresServer) -> None:
    """docs/operations.md's psql steps, then `mqchat db upgrade` as the new role.

    PostgreSQL 15 no longer lets every role create tables in ``public``: the steps
    work only because the role owns its database. The psql line differs from the
    text only in how it reaches this throwaway cluster (its port, no sudo).
    """
    text = (README.parent / "docs" / "operations.md").read_text()
    [setup] = [block for block in readme_blocks_of(text, "sh") if "CREATE ROLE" in block]
    psql = f"{postgres.bindir / 'psql'} -h {postgres.host} -p {postgres.port} -U postgres"
    steps = setup.replace("sudo -u postgres psql", psql)
    created = completed(["bash", "-c", steps], env=base_env())
    try:
        assert created.returncode == 0, created.stderr
        [upgrade] = [line for line in text.splitlines() if line.startswith("mqchat db upgrade")]
        url = f"postgresql+psycopg://mqchat:PASSWORD@{postgres.host}:{postgres.port}/mqchat"
        args = shlex.split(upgrade.replace("postgresql+psycopg://mqchat:PASSWORD@db/mqchat", url))
        result = run_mqchat(*args[1:], env=base_env(), timeout=60)
        assert result.returncode == 0, result.stderr
        assert re.search(r": upgraded \(empty\) -> \w+ \(head\)$", result.stdout.strip())
    finally:
        postgres.drop_database("mqchat")
        subprocess.run([*shlex.split(psql), "-c", "DROP ROLE IF EXISTS mqchat"], check=False)
