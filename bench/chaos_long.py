"""The long chaos run: hundreds of users, 50+ seeded faults, a Jepsen-style verdict.

    python -m bench.chaos_long --minutes 10 --users 200 --seed N

Starts its own mosquitto (production config, dynsec) and PostgreSQL via
``tests/services.py``, the bridge as a subprocess (behind a TCP proxy) and the history
API; every client connects through a second proxy. While pairs of users chat, a seeded
schedule kills the bridge and mosquitto, stops PostgreSQL, freezes the bridge, and cuts
and stalls both network paths. At the end :func:`tests.chaos.check` reconciles the
logs and the report is written to ``docs/reliability.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import secrets
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from clients.sdk import ChatClient
from store import make_engine, migrate
from tests import chaos
from tests.chaos import History, Received, StoredRow, check
from tests.conftest import Daemon, Stack, _bridge_env, password_of
from tests.services import PostgresServer, start_mosquitto, start_postgres
from tests.tcp_proxy import TcpProxy
from tests.test_chat import stored

ROOT = Path(__file__).parents[1]
FAULTS = {
    "kill -9 bridge": (0.5, 2.0),
    "kill -9 mosquitto": (0.5, 2.0),
    "stop postgres": (1.0, 3.0),
    "SIGSTOP bridge": (2.0, 7.0),
    "cut clients": (0.5, 3.0),
    "stall clients": (0.5, 3.0),
    "cut bridge": (0.5, 3.0),
    "stall bridge": (0.5, 3.0),
}
SEND_TIMEOUT = 120.0
MAX_PER_SENDER = 5000
QUIET_TIMEOUT = 120.0


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Bench:
    def __init__(self, args: argparse.Namespace, base: Path) -> None:
        self.args = args
        self.base = base
        self.seed: int = args.seed
        self.rng = random.Random(self.seed)
        self.history = History()
        self.received: list[Received] = []
        self.applied: list[str] = []
        self.clients: dict[str, ChatClient] = {}
        users = [f"u{i:04d}" for i in range(args.users - args.users % 2)]
        self.pairs = [(users[i], users[i + 1]) for i in range(0, len(users), 2)]
        self.partner = {a: b for a, b in self.pairs} | {b: a for a, b in self.pairs}
        self.users = users
        self.started = time.monotonic()

    async def setup(self) -> None:
        self.postgres: PostgresServer = await asyncio.to_thread(start_postgres, self.base)
        self.postgres.create_database("mqchat")
        db_url = self.postgres.url("mqchat")
        engine = make_engine(db_url)
        migrate(engine)
        mosq = await asyncio.to_thread(start_mosquitto, self.base)
        self.client_proxy = await TcpProxy(mosq.host, mosq.port).start()
        self.bridge_proxy = await TcpProxy(mosq.host, mosq.port).start()
        env = _bridge_env(db_url, mosq.host, self.bridge_proxy.port, mosq.bridge.password)
        bridge = Daemon("bridge", "bridge", env, self.base)
        self.stack = Stack(
            "long", mosq.host, mosq.port, db_url, engine, bridge, env, self.base, mosquitto=mosq
        )
        await asyncio.to_thread(self.stack.start_bridge)
        await self.stack.start_api()
        for i in range(0, len(self.users), 50):
            await self.stack.add_users(*self.users[i : i + 50])
        for user in self.users:
            client = ChatClient(
                host=self.client_proxy.host,
                port=self.client_proxy.port,
                username=user,
                password=password_of(user),
                device="phone",
                resend_after=3.0,
                history=self.stack.history(user),
            )
            await client.connect()
            self.stack._clients.append(client)
            self.clients[user] = client

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.stack.close()
        await self.client_proxy.close()
        await self.bridge_proxy.close()
        await asyncio.to_thread(self.postgres.close)

    def plan(self) -> list[tuple[float, chaos.Fault]]:
        budget = self.args.minutes * 60 - 15
        full = chaos.schedule(
            self.seed,
            FAULTS,
            extra=400,
            first_at=(3.0, 5.0),
            gap=(self.args.gap, self.args.gap * 2),
        )
        return [(at, f) for at, f in full if at + f.duration < budget]

    async def apply(self, fault: chaos.Fault) -> None:
        stack, d = self.stack, fault.duration
        if fault.kind == "kill -9 bridge":
            stack.bridge.kill()
            await asyncio.sleep(d)
            await asyncio.to_thread(stack.start_bridge)
        elif fault.kind == "kill -9 mosquitto":
            assert stack.mosquitto is not None
            stack.mosquitto.kill()
            await asyncio.sleep(d)
            await asyncio.to_thread(stack.mosquitto.start)
        elif fault.kind == "stop postgres":
            try:
                await asyncio.to_thread(self.postgres.stop)
                await asyncio.sleep(d)
            finally:
                await asyncio.to_thread(self.postgres.start)
        elif fault.kind == "SIGSTOP bridge":
            assert stack.bridge.process is not None
            pid = stack.bridge.process.pid
            os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(d)
            finally:
                os.kill(pid, signal.SIGCONT)
        else:
            verb, path = fault.kind.split()
            proxy = self.client_proxy if path == "clients" else self.bridge_proxy
            if verb == "cut":
                proxy.cut()
            else:
                proxy.stall(d)
            await asyncio.sleep(d)
            proxy.heal()

    async def inject(self, plan: Sequence[tuple[float, chaos.Fault]], stop: asyncio.Event) -> None:
        try:
            for at, fault in plan:
                delay = self.started + at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                begin = time.monotonic() - self.started
                await self.apply(fault)
                self.applied.append(
                    f"{begin:6.1f}s-{time.monotonic() - self.started:6.1f}s {fault}"
                )
            remaining = self.started + self.args.minutes * 60 - time.monotonic()
            await asyncio.sleep(max(remaining, 2.0))
        finally:
            stop.set()

    async def send_all(self, sender: str, stop: asyncio.Event) -> None:
        client, to = self.clients[sender], self.partner[sender]
        rng = random.Random(f"{self.seed}-{sender}")
        await asyncio.sleep(rng.uniform(0, self.args.pace))
        for i in range(MAX_PER_SENDER):
            if stop.is_set():
                return
            await self.history.send(client, sender, to, i, SEND_TIMEOUT)
            # Mixed load: mostly paced, some bursts.
            if rng.random() > 0.1:
                await asyncio.sleep(rng.uniform(0.2, 2.0) * self.args.pace)

    async def receive_all(self, user: str) -> None:
        device = f"{user}/phone"
        async for m in self.clients[user].messages():
            self.received.append(
                Received(device, m.id, m.conversation, m.seq, m.sender, m.body, time.monotonic())
            )

    async def progress(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 10)
            kinds = {"ok": 0, "fail": 0, "unknown": 0}
            for op in self.history.ops:
                if op.kind != "invoke":
                    kinds[op.kind] += 1
            invoked = len(self.history.ops) - sum(kinds.values())
            print(
                f"[{time.monotonic() - self.started:6.1f}s] invoked={invoked} ok={kinds['ok']} "
                f"fail={kinds['fail']} unknown={kinds['unknown']} shown={len(self.received)} "
                f"faults={len(self.applied)}",
                flush=True,
            )

    def caught_up(self) -> bool:
        if any(client.pending for client in self.clients.values()):
            return False
        shown = {(r.device, r.sender, r.id) for r in self.received}
        for row in stored(self.stack):
            for user in (row.sender, self.partner[row.sender]):
                if (f"{user}/phone", row.sender, row.client_id) not in shown:
                    return False
        return True

    async def run(self) -> chaos.Report:
        plan = self.plan()
        print(f"chaos seed {self.seed}: {len(plan)} faults planned, {len(self.users)} users")
        stop = asyncio.Event()
        receivers = [asyncio.create_task(self.receive_all(u)) for u in self.users]
        self.started = time.monotonic()
        ticker = asyncio.create_task(self.progress(stop))
        try:
            await asyncio.gather(
                self.inject(plan, stop), *(self.send_all(u, stop) for u in self.users)
            )
            self.load_ended = time.monotonic() - self.started
            deadline = time.monotonic() + QUIET_TIMEOUT
            while not await asyncio.to_thread(self.caught_up):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(1.0)
            self.quiet_ended = time.monotonic() - self.started
        finally:
            stop.set()
            await ticker
            for task in receivers:
                task.cancel()
            for task in receivers:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        rows = [
            StoredRow(r.client_id, r.conversation_id, r.seq, r.sender, r.body, r.pk or 0)
            for r in stored(self.stack)
        ]
        devices: dict[str, Sequence[str]] = {u: [f"{u}/phone"] for u in self.users}
        self.planned = len(plan)
        return check(self.history, self.received, rows, devices=devices)


def write_report(bench: Bench, report: chaos.Report, args: argparse.Namespace, out: Path) -> str:
    short = args.minutes < 10
    command = (
        f"python -m bench.chaos_long --minutes {args.minutes:g} --users {args.users} "
        f"--seed {bench.seed}"
    )
    lines = [
        "# Reliability: the long chaos run",
        "",
        "Generated by `bench/chaos_long.py`: pairs of users chat through the SDK while a",
        "seeded schedule kills the bridge and mosquitto (SIGKILL), stops PostgreSQL, freezes",
        "the bridge (SIGSTOP), and cuts and stalls the client↔broker and bridge↔broker TCP",
        "paths (`tests/tcp_proxy.py`). `tests/chaos.py::check` then reconciles every",
        "sender's operation log, every device's received log and the `messages` table.",
        "",
    ]
    if short:
        lines += [
            f"**This is a SHORT run ({args.minutes:g} minutes, {args.users} users)**, made to",
            "prove the harness works. The full run is:",
            "",
            "```",
            f"python -m bench.chaos_long --minutes 10 --users 200 --seed {bench.seed}",
            "```",
            "",
        ]
    lines += [
        "## Run",
        "",
        f"- command: `{command}`",
        f"- seed: {bench.seed} (replay with the same `--seed`)",
        f"- git commit: {git_commit()}",
        f"- users: {len(bench.users)} ({len(bench.pairs)} pairs, one device each)",
        f"- faults: {len(bench.applied)} applied of {bench.planned} planned",
        f"- load ended at {bench.load_ended:.1f}s, devices caught up at {bench.quiet_ended:.1f}s",
        f"- verdict: **{report.verdict()}**",
        "",
        "## Counts",
        "",
        "```",
        report.render(),
        "```",
        "",
        "## Faults applied",
        "",
        "```",
        *bench.applied,
        "```",
        "",
    ]
    text = "\n".join(lines)
    out.write_text(text)
    return text


async def amain(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="mqchat-chaos-") as tmp:
        bench = Bench(args, Path(tmp))
        await bench.setup()
        try:
            report = await bench.run()
        finally:
            await bench.close()
    print(report.render())
    write_report(bench, report, args, Path(args.out))
    print(f"report written to {args.out}")
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--seed", type=int, default=secrets.randbelow(1_000_000))
    parser.add_argument("--pace", type=float, default=1.0, help="mean seconds between sends")
    parser.add_argument("--gap", type=float, default=2.0, help="min seconds between faults")
    parser.add_argument("--out", default=str(ROOT / "docs" / "reliability.md"))
    args = parser.parse_args(argv)
    if not 2 <= args.users <= 1000 or not 0 < args.minutes <= 60:
        parser.error("--users must be 2..1000 and --minutes 0..60")
    return asyncio.run(amain(args))


if __name__ == "__main__":
    raise SystemExit(main())
