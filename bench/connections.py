"""Idle connected users with presence: how many the stack holds, and what each costs.

    .venv/bin/python -m bench.connections --users 50000                  # mosquitto + PostgreSQL
    .venv/bin/python -m bench.connections --stack embedded --users 5000  # amqtt + SQLite
    .venv/bin/python -m bench.connections --plot bench/results/connections-*.jsonl

Makes ``--users`` real accounts (dynsec + database rows, in bulk: see
``bench/_conn_stack.py``), starts the stack, then ramps up in steps (1k, 5k, 10k, 20k,
50k by default, up to ``--users``). At each step the new devices connect all at once
(a storm, ``--concurrency`` handshakes in flight per worker process), each one the way
the SDK's persistent device does: CONNECT with username, password and a last will
``offline`` on ``up/presence``; SUBSCRIBE to its ``down/#`` (QoS 1), which brings the
presence of its ``--contacts`` (1:1 conversations made in bulk with the next users);
PUBLISH ``online`` to ``up/presence`` (QoS 1), which brings it a snapshot.
Then they stay idle: a PINGREQ within each keepalive, ``online`` again every
``--announce-every`` seconds (the SDK's 120 s). Each device binds its own loopback
source address (127.1.0.1, ...; 250 devices per address), so one address's
ephemeral port range is never the limit.

Per step it records: devices held, failures by kind, the storm's connect rate
(devices through CONNACK, SUBACK and PUBACK per second) and CONNACK latency, how long
until the bridge has recorded every device online in the database and until a
monitor that is every user's contact has seen each user's ``online`` on its
``down/presence`` (``retained_s``, the name it had when presence was retained),
and, after ``--hold`` idle seconds, the RSS (from /proc) of the broker, the bridge
and the generator. It stops at the first step that fails and says why.

Bounded: ``--max-seconds`` in all, ``--step-timeout`` per storm, ``--handshake-timeout``
per device. Everything listens and connects on loopback and is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.dynsec import Credentials
from core.mqtt import Incoming, LinkConfig, MqttLink
from protocol import topics

from . import _conn_stack
from ._conn_client import username
from ._report import git_commit

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STEPS = (1_000, 5_000, 10_000, 20_000, 50_000)
#: Devices per generator process: well under the 20,000 open files a process may have.
PER_WORKER = 12_500
MONITOR = "bmonitor"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.connections", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--stack", choices=("production", "embedded"), default="production")
    parser.add_argument("--users", type=int, default=50_000, help="devices at the last step")
    parser.add_argument(
        "--steps", default=None, help="comma-separated totals (default 1k,5k,10k,20k,50k)"
    )
    parser.add_argument("--workers", type=int, default=0, help="generator processes")
    parser.add_argument("--concurrency", type=int, default=64, help="handshakes per worker")
    parser.add_argument("--keepalive", type=int, default=30, help="seconds (SDK default)")
    parser.add_argument("--announce-every", type=float, default=120.0)
    parser.add_argument("--contacts", type=int, default=3)
    parser.add_argument("--hold", type=float, default=15.0, help="idle seconds per step")
    parser.add_argument("--handshake-timeout", type=float, default=30.0)
    parser.add_argument("--step-timeout", type=float, default=600.0)
    parser.add_argument("--presence-timeout", type=float, default=300.0)
    parser.add_argument("--max-seconds", type=float, default=2400.0)
    parser.add_argument("--out", type=Path, default=None, help="JSON lines file")
    parser.add_argument("--plot", nargs="+", type=Path, default=None, metavar="JSONL")
    parser.add_argument("--plot-out", type=Path, default=ROOT / "docs/img/connections-rss.png")
    args = parser.parse_args(argv)
    if args.steps:
        steps = sorted({int(s) for s in args.steps.split(",")})
    else:
        steps = [s for s in DEFAULT_STEPS if s < args.users] + [args.users]
    args.step_list = [s for s in steps if s <= args.users]
    if not args.workers:
        args.workers = max(2, math.ceil(args.users / PER_WORKER))
    return args


# -- the generator processes ----------------------------------------------------------


@dataclass
class Worker:
    process: asyncio.subprocess.Process
    progress: dict[str, int] = field(default_factory=dict)
    replies: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, config: dict[str, Any]) -> Worker:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench._conn_client",
            cwd=ROOT,
            env={**os.environ, "MQCHAT_BENCH_WORKER": json.dumps(config)},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=2**26,
        )
        worker = cls(process)
        worker.reader = asyncio.create_task(worker._read())
        ready = await asyncio.wait_for(worker.replies.get(), 60)
        assert ready["ev"] == "ready", ready
        return worker

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            event = json.loads(line)
            if event["ev"] == "progress":
                self.progress = event
            else:
                await self.replies.put(event)
        await self.replies.put({"ev": "exited", "code": await self.process.wait()})

    async def send(self, command: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(command) + "\n").encode())
        await self.process.stdin.drain()

    async def ask(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        await self.send(command)
        reply = await asyncio.wait_for(self.replies.get(), timeout)
        if reply["ev"] == "exited":
            raise RuntimeError(f"generator process {self.process.pid} exited: {reply}")
        return reply

    async def stop(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(Exception):
                await self.send({"cmd": "quit"})
            try:
                await asyncio.wait_for(self.process.wait(), 15)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self.reader is not None:
            self.reader.cancel()


# -- the presence monitor -------------------------------------------------------------


def _listener(
    stack: _conn_stack.BenchStack,
    who: Credentials,
    client_id: str,
    on_message: Callable[[Incoming], None],
) -> MqttLink:
    """A connection of the bench's own, beside the measured devices, that only
    listens: the broker keeps no session for it."""
    config = LinkConfig(
        host=stack.host,
        port=stack.port,
        username=who.username,
        password=who.password,
        client_id=client_id,
        clean_session=True,
        keepalive=30,
    )
    return MqttLink(config, on_message=on_message)


class PresenceMonitor:
    """One more device, every user's contact, following their presence."""

    def __init__(self, stack: _conn_stack.BenchStack) -> None:
        self.online: set[str] = set()
        monitor = Credentials(stack.monitor, stack.password)
        self.link = _listener(stack, monitor, f"{stack.monitor}:monitor", self._on_presence)

    async def start(self) -> None:
        await self.link.connect()
        await self.link.subscribe(topics.down_presence(self.link.config.username), qos=0)

    def _on_presence(self, message: Incoming) -> None:
        try:
            words = json.loads(message.payload)["users"]
        except (ValueError, KeyError):
            return
        for word in words:
            if word.get("state") == "online":
                self.online.add(word.get("username"))
            else:
                self.online.discard(word.get("username"))


class HeapMonitor:
    """mosquitto's own count of its heap (``$SYS/broker/heap/current``, every 10 s)."""

    def __init__(self, stack: _conn_stack.BenchStack) -> None:
        self.current: int | None = None
        self._published = asyncio.Event()
        self.link: MqttLink | None = None
        if stack.sys_reader is not None:
            self.link = _listener(stack, stack.sys_reader, "bench-sys:heap", self._on_heap)

    async def start(self) -> None:
        if self.link is not None:
            await self.link.connect()
            await self.link.subscribe("$SYS/broker/heap/current", qos=0)

    def _on_heap(self, message: Incoming) -> None:
        with contextlib.suppress(ValueError):
            self.current = int(message.payload)
            self._published.set()

    async def fresh(self, timeout: float = 15.0) -> int | None:
        """A value published after now (mosquitto publishes every ``sys_interval``)."""
        if self.link is None:
            return None
        self._published.clear()
        try:
            await asyncio.wait_for(self._published.wait(), timeout)
        except TimeoutError:
            return self.current  # mosquitto publishes a $SYS value only when it changed
        return self.current


# -- measuring ------------------------------------------------------------------------


def nearest_rank(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def read_text(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "?"


def machine() -> dict[str, Any]:
    mem_kib = int(read_text("/proc/meminfo").split()[1]) if read_text("/proc/meminfo") else 0
    mosquitto = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout
    return {
        "cpus": os.cpu_count(),
        "mem_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mosquitto": mosquitto.splitlines()[0] if mosquitto else "?",
        "ip_local_port_range": read_text("/proc/sys/net/ipv4/ip_local_port_range"),
        "somaxconn": read_text("/proc/sys/net/core/somaxconn"),
        "tcp_max_syn_backlog": read_text("/proc/sys/net/ipv4/tcp_max_syn_backlog"),
        "file_max": read_text("/proc/sys/fs/file-max"),
        "nr_open": read_text("/proc/sys/fs/nr_open"),
        "nofile_self": "{}/{}".format(*resource.getrlimit(resource.RLIMIT_NOFILE)),
    }


class Run:
    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        self.args = args
        self.out = out
        self.started = time.monotonic()
        self.loadavg_at_launch = "?"

    def write(self, record: dict[str, Any]) -> None:
        with self.out.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def left(self) -> float:
        return self.args.max_seconds - (time.monotonic() - self.started)


def say(text: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {text}", flush=True)


async def wait_presence(
    stack: _conn_stack.BenchStack, monitor: PresenceMonitor, expected: int, timeout: float
) -> tuple[float | None, float | None]:
    """Seconds until the database, then the monitor's ``down/presence``, show ``expected``
    online."""
    t0 = time.monotonic()
    db_s: float | None = None
    retained_s: float | None = None
    last_report = 0.0
    while time.monotonic() - t0 < timeout:
        if db_s is None:
            count = await asyncio.to_thread(stack.online_devices)
            if count >= expected:
                db_s = time.monotonic() - t0
        seen = sum(1 for u in monitor.online if u != stack.monitor)
        if retained_s is None and seen >= expected:
            retained_s = time.monotonic() - t0
        if db_s is not None and retained_s is not None:
            break
        if time.monotonic() - last_report > 5:
            last_report = time.monotonic()
            db_now = count if db_s is None else expected
            say(f"  presence: {db_now}/{expected} in the database, {seen} online seen")
        if not stack.bridge_alive():
            say("  the bridge exited")
            break
        await asyncio.sleep(0.25)
    return db_s, retained_s


async def run_steps(args: argparse.Namespace, run: Run, base: Path) -> None:
    names = [username(i) for i in range(args.users)]
    say(f"setting up {args.stack}: {args.users} accounts")
    start = _conn_stack.production if args.stack == "production" else _conn_stack.embedded
    stack = await asyncio.to_thread(start, base, names, MONITOR, args.contacts)
    workers: list[Worker] = []
    monitor = PresenceMonitor(stack)
    heap = HeapMonitor(stack)
    try:
        say("setup (s): " + ", ".join(f"{k} {v:.1f}" for k, v in stack.setup_s.items()))
        await monitor.start()
        await heap.start()
        config = {
            "host": stack.host,
            "port": stack.port,
            "password": stack.password,
            "keepalive": args.keepalive,
            "announce_every": args.announce_every,
            "contacts": args.contacts,
            "concurrency": args.concurrency,
            "handshake_timeout": args.handshake_timeout,
        }
        workers = list(await asyncio.gather(*(Worker.start(config) for _ in range(args.workers))))
        await asyncio.sleep(2)  # let the bridge settle after its startup
        baseline = {
            "broker_rss_kib": _conn_stack.rss_kib(stack.broker_pid),
            "bridge_rss_kib": _conn_stack.rss_kib(stack.bridge_pid),
            "generator_rss_kib": sum(_conn_stack.rss_kib(w.process.pid) for w in workers),
            "broker_heap_bytes": await heap.fresh(),
        }
        run.write(
            {
                "kind": "run",
                "stack": args.stack,
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
                "command": "python -m bench.connections " + " ".join(sys.argv[1:]),
                "commit": git_commit(),
                "loadavg_at_launch": run.loadavg_at_launch,
                "loadavg_at_first_step": read_text("/proc/loadavg"),
                "machine": machine(),
                "broker_nofile": _conn_stack.nofile_limit(stack.broker_pid),
                "generator_nofile": _conn_stack.nofile_limit(workers[0].process.pid),
                "settings": {
                    k: v for k, v in vars(args).items() if k not in ("plot", "out", "plot_out")
                },
                "setup_s": stack.setup_s,
                "baseline": baseline,
                "info": stack.info,
            }
        )
        say(f"baseline RSS (KiB): {baseline}")
        held = 0
        for target in args.step_list:
            if run.left() < 60:
                say("out of time (--max-seconds); stopping")
                break
            record = await one_step(
                args, run, stack, monitor, heap, workers, held, target, baseline
            )
            run.write(record)
            held = record["held"]
            if not record["ok"]:
                say(f"step {target} FAILED: {record['reason']}")
                break
    finally:
        say("cleaning up")
        await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
        for link in (monitor.link, heap.link):
            if link is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(link.close(), 10)
        await asyncio.to_thread(stack.close)


async def one_step(
    args: argparse.Namespace,
    run: Run,
    stack: _conn_stack.BenchStack,
    monitor: PresenceMonitor,
    heap: HeapMonitor,
    workers: list[Worker],
    held: int,
    target: int,
    baseline: dict[str, int],
) -> dict[str, Any]:
    new = target - held
    say(f"step {target}: connecting {new} devices ({held} already held)")
    share, extra = divmod(new, len(workers))
    first = held
    t0 = time.monotonic()
    for n, worker in enumerate(workers):
        count = share + (1 if n < extra else 0)
        worker.progress = {}
        await worker.send({"cmd": "connect", "first": first, "count": count, "total": args.users})
        first += count
    pending = {asyncio.create_task(w.replies.get()): w for w in workers}
    replies: list[dict[str, Any]] = []
    timeout = min(args.step_timeout, max(run.left(), 1))
    while pending and time.monotonic() - t0 < timeout:
        done, _ = await asyncio.wait(pending, timeout=2)
        for task in done:
            pending.pop(task)
            replies.append(task.result())
        progress = sum(w.progress.get("ok", 0) for w in workers)
        failed = sum(w.progress.get("failed", 0) for w in workers)
        elapsed = time.monotonic() - t0
        say(f"  {progress}/{new} connected, {failed} failed, {elapsed:.0f} s")
    storm_s = time.monotonic() - t0
    for task in pending:
        task.cancel()
    connected = [r for r in replies if r["ev"] == "connected"]
    ok = sum(r["ok"] for r in connected)
    failed = sum(r["failed"] for r in connected)
    connack = sorted(ms for r in connected for ms in r["connack_ms"])
    errors: dict[str, int] = {}
    for r in connected:
        for kind, n in r["errors"].items():
            errors[kind] = errors.get(kind, 0) + n
    slowest = max((r["seconds"] for r in connected), default=storm_s)
    rate = ok / slowest if slowest > 0 else 0.0
    say(
        f"  storm: {ok} connected, {failed} failed in {slowest:.1f} s = {rate:.0f}/s; "
        f"CONNACK p50 {nearest_rank(connack, 0.5):.1f} ms p99 {nearest_rank(connack, 0.99):.1f} ms"
    )
    expected = held + ok
    db_s, retained_s = await wait_presence(stack, monitor, expected, args.presence_timeout)
    say(f"  presence: database after {db_s} s, retained seen after {retained_s} s")
    say(f"  holding idle {args.hold:.0f} s")
    await asyncio.sleep(args.hold)
    statuses = [await w.ask({"cmd": "status"}, 60) for w in workers]
    open_now = sum(s["open"] for s in statuses)
    lost = sum(s["lost"] for s in statuses)
    broker_rss = _conn_stack.rss_kib(stack.broker_pid)
    broker_heap = await heap.fresh()
    bridge_rss = _conn_stack.rss_kib(stack.bridge_pid)
    generator_rss = sum(s["rss_kib"] for s in statuses)

    def per_conn(now: int, before: int) -> float | None:
        return round((now - before) / open_now, 2) if open_now else None

    reasons = []
    if pending:
        reasons.append(f"storm not finished within {timeout:.0f} s")
    if failed:
        reasons.append(f"{failed} devices failed to connect: {errors}")
    if db_s is None:
        reasons.append(f"bridge did not record all {expected} online in {args.presence_timeout} s")
    if retained_s is None:
        reasons.append(f"retained presence of all {expected} not seen in {args.presence_timeout} s")
    if open_now < expected:
        reasons.append(f"{expected - open_now} connections dropped while idle")
    if broker_rss == 0:
        reasons.append("the broker exited")
    if not stack.bridge_alive():
        reasons.append("the bridge exited")
    record = {
        "kind": "step",
        "stack": stack.name,
        "target": target,
        "new": new,
        "held": open_now,
        "failed": failed,
        "errors": errors,
        "storm_s": round(slowest, 2),
        "connect_rate": round(rate, 1),
        "connack_ms": {
            "p50": nearest_rank(connack, 0.5),
            "p99": nearest_rank(connack, 0.99),
            "max": connack[-1] if connack else None,
        },
        "presence_db_s": None if db_s is None else round(db_s, 2),
        "presence_retained_s": None if retained_s is None else round(retained_s, 2),
        "lost_while_idle": lost,
        "broker_rss_kib": broker_rss,
        "bridge_rss_kib": bridge_rss,
        "generator_rss_kib": generator_rss,
        "broker_kib_per_conn": per_conn(broker_rss, baseline["broker_rss_kib"]),
        "bridge_kib_per_conn": per_conn(bridge_rss, baseline["bridge_rss_kib"]),
        "broker_heap_bytes": broker_heap,
        "broker_heap_kib_per_conn": (
            round((broker_heap - baseline["broker_heap_bytes"]) / 1024 / open_now, 2)
            if broker_heap is not None and baseline["broker_heap_bytes"] is not None and open_now
            else None
        ),
        "broker_log_warnings": stack.broker_warnings(),
        "generator_kib_per_conn": per_conn(generator_rss, baseline["generator_rss_kib"]),
        "presence_received": sum(s["received"] for s in statuses),
        "pings": sum(s["pings"] for s in statuses),
        "announcements": sum(s["announcements"] for s in statuses),
        "loadavg": read_text("/proc/loadavg"),
        "ok": not reasons,
        "reason": "; ".join(reasons) or None,
    }
    say(
        f"  held {open_now}; RSS KiB broker {broker_rss} bridge {bridge_rss} "
        f"generator {generator_rss}; per connection broker {record['broker_kib_per_conn']} "
        f"bridge {record['bridge_kib_per_conn']} KiB; broker heap "
        f"{record['broker_heap_kib_per_conn']} KiB per connection"
    )
    return record


# -- the plot -------------------------------------------------------------------------


def plot(paths: list[Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for path in paths:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        head = next(r for r in records if r["kind"] == "run")
        steps = [r for r in records if r["kind"] == "step" and r["held"]]
        base = head["baseline"]
        xs = [0] + [r["held"] for r in steps]
        run_name = f"{head['stack']} ({head['settings']['users']:,} accounts)"
        broker = "mosquitto" if head["stack"] == "production" else "amqtt"
        for key, label, style in (
            ("broker_rss_kib", f"{broker} RSS", "-o"),
            ("bridge_rss_kib", "bridge RSS", "--s"),
        ):
            ys = [base[key] / 1024] + [r[key] / 1024 for r in steps]
            ax.plot(xs, ys, style, label=f"{run_name}: {label}")
        if base.get("broker_heap_bytes"):
            pairs = [(0, base["broker_heap_bytes"])] + [
                (r["held"], r["broker_heap_bytes"]) for r in steps if r.get("broker_heap_bytes")
            ]
            ax.plot(
                [x for x, _ in pairs],
                [y / 2**20 for _, y in pairs],
                ":^",
                label=f"{run_name}: mosquitto heap ($SYS)",
            )
    ax.set_xlabel("idle devices connected (with presence)")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("Memory against connections held")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot:
        plot(args.plot, args.plot_out)
        return 0
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or ROOT / f"bench/results/connections-{args.stack}-{stamp}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    run = Run(args, out)
    run.loadavg_at_launch = read_text("/proc/loadavg")
    say(f"steps {args.step_list}, {args.workers} generator processes; results to {out}")
    with tempfile.TemporaryDirectory(prefix="mqchat-conns-") as base:
        asyncio.run(run_steps(args, run, Path(base)))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
