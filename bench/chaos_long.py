"""The long chaos run: hundreds of users, 50+ seeded faults of every kind, one verdict.

    python -m bench.chaos_long --minutes 10 --users 200 --seed N
    python -m bench.chaos_long --minutes 10 --users 200 --seed N --groups

Starts its own mosquitto (production config, dynsec) and PostgreSQL via
``tests/support/services.py``, the bridge as a subprocess and the history API. Devices reach
the broker through one TCP proxy, the bridge reaches the broker and PostgreSQL
through two more. Users sit on a ring and chat with their neighbours (every fourth
also across the ring), some with a second device, some impatient (their sends go
*unknown* after a few seconds and must be recovered), at a paced rate with bursts.
Meanwhile :class:`tests.support.chaos.Injector` applies every kind of
:data:`tests.support.chaos.FAULT_KINDS` in seeded rounds. At the end
:func:`tests.support.chaos.check` reconciles the logs and the report is written to
``docs/reliability.md``. Exit code 0 only for a VALID run with every fault applied.

With ``--groups`` the first ``--group-size`` users are also in a group (created before
the faults start) and one send in four of each member goes to the group; a user is
added a third of the way in and a member removed two thirds in, under the faults. The
checker then also holds every member device to exactly the group's stored sequence
within its membership window (:class:`tests.support.chaos.GroupOps`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import secrets
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench._report import git_commit
from mqchat import ChatClient, HistoryError
from store import make_engine, migrate
from tests.support import chaos
from tests.support.chaos import History, Received, check
from tests.support.services import PostgresServer, start_mosquitto, start_postgres
from tests.support.stack import new_stack, password_of, stored
from tests.support.tcp_proxy import TcpProxy

ROOT = Path(__file__).parents[1]
SEND_TIMEOUT = 120.0  # patient senders
IMPATIENT_TIMEOUT = 3.0  # every fifth sender: past it the outcome is logged unknown
MAX_PER_SENDER = 20_000
QUIET_TIMEOUT = 180.0
TAIL = 10.0  # seconds of load after the last fault


async def _connect(client: ChatClient, attempts: int = 60) -> None:
    """Connect as a device would: the history API admits so many sign-ins at once and
    answers the rest 429 "try again in 1 s" (nothing is connected yet then)."""
    for attempt in range(attempts):
        try:
            await client.connect()
            return
        except HistoryError as exc:
            if exc.status != 429 or attempt == attempts - 1:
                raise
        await asyncio.sleep(1)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class Bench:
    def __init__(self, args: argparse.Namespace, base: Path) -> None:
        self.args = args
        self.base = base
        self.seed: int = args.seed
        self.history = History()
        self.received: list[Received] = []
        self.failures: list[str] = []
        n = args.users
        self.users = [f"u{i:04d}" for i in range(n)]
        # A ring (everyone talks to both neighbours) plus chords from every fourth user.
        self.partners: dict[str, list[str]] = {u: [] for u in self.users}
        for i, user in enumerate(self.users):
            for j in (i + 1, i + n // 2) if i % 4 == 0 else (i + 1,):
                other = self.users[j % n]
                if other != user and other not in self.partners[user]:
                    self.partners[user].append(other)
                    self.partners[other].append(user)
        self.devices: dict[str, list[str]] = {
            u: ["phone", "tablet"] if i % 10 == 3 else ["phone"] for i, u in enumerate(self.users)
        }
        self.impatient = {u for i, u in enumerate(self.users) if i % 5 == 1}
        self.clients: dict[str, ChatClient] = {}  # "user/device" -> client
        self.group: str | None = None
        size = min(args.group_size, n - 1) if args.groups else 0
        self.group_members = self.users[:size]
        #: Added mid-run (the first user outside the group) and removed mid-run.
        self.joiner = self.users[size] if size else ""
        self.leaver = self.users[2] if size else ""
        self.started = time.monotonic()
        self.load_ended = self.quiet_ended = 0.0
        self.planned = 0
        self.load_samples: list[float] = []

    @property
    def conversations(self) -> int:
        return sum(len(p) for p in self.partners.values()) // 2

    async def setup(self) -> None:
        self.postgres: PostgresServer = await asyncio.to_thread(start_postgres, self.base)
        self.postgres.create_database("mqchat")
        db_url = self.postgres.url("mqchat")
        engine = make_engine(db_url)
        migrate(engine)
        engine.dispose()
        mosq = await asyncio.to_thread(start_mosquitto, self.base)
        self.client_proxy = await TcpProxy(mosq.host, mosq.port).start()
        self.broker_proxy = await TcpProxy(mosq.host, mosq.port).start()
        self.db_proxy = await TcpProxy(self.postgres.host, self.postgres.port).start()
        self.stack = new_stack(
            "long", self.base, db_url, mosq.host, mosq.port, mosq.bridge.password, mosquitto=mosq
        )
        self.injector = chaos.Injector(
            self.stack,
            self.postgres,
            clients=self.client_proxy,
            bridge_broker=self.broker_proxy,
            bridge_db=self.db_proxy,
        )
        await self.injector.route_bridge()
        await self.stack.start_api()
        for i in range(0, len(self.users), 50):
            await self.stack.add_users(*self.users[i : i + 50])
        for user in self.users:
            for device in self.devices[user]:
                client = ChatClient(
                    host=self.client_proxy.host,
                    port=self.client_proxy.port,
                    username=user,
                    password=password_of(user),
                    device=device,
                    resend_after=3.0,
                    history=self.stack.history(user),
                )
                self.stack._clients.append(client)
                self.clients[f"{user}/{device}"] = client
        pending = list(self.clients.values())
        for i in range(0, len(pending), 20):  # 20 devices connecting at a time
            await asyncio.gather(*(_connect(client) for client in pending[i : i + 20]))
        self.group_ops = chaos.GroupOps(self.stack, self.history)
        if self.group_members:
            creator, *members = self.group_members
            row = await self.group_ops.apply(
                self.clients[f"{creator}/phone"],
                creator,
                "create",
                name="chaos",
                members=members,
                timeout=60,
            )
            self.group = row.conversation

    async def change_members(self, stop: asyncio.Event) -> None:
        """Add ``joiner`` a third of the way in and remove ``leaver`` two thirds in."""
        if self.group is None:
            return
        admin = self.group_members[0]
        client = self.clients[f"{admin}/phone"]
        for share, op, user in ((1 / 3, "add", self.joiner), (2 / 3, "remove", self.leaver)):
            at = self.started + share * (self.args.minutes * 60 - TAIL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, at - time.monotonic()))
            if stop.is_set():
                return
            try:
                await self.group_ops.apply(
                    client, admin, op, conversation=self.group, members=[user], timeout=120
                )
            except AssertionError as exc:  # the run fails on it, as on a failed fault
                self.failures.append(f"{time.monotonic() - self.started:6.1f}s {exc}")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.stack.close()
        for proxy in (self.client_proxy, self.broker_proxy, self.db_proxy):
            await proxy.close()
        await asyncio.to_thread(self.postgres.close)

    def plan(self) -> list[tuple[float, chaos.Fault]]:
        budget = self.args.minutes * 60 - TAIL
        full = chaos.schedule(
            self.seed,
            chaos.FAULT_KINDS,
            rounds=100,
            first_at=(3.0, 5.0),
            gap=(self.args.gap, self.args.gap * 2),
        )
        return [(at, f) for at, f in full if at + f.duration < budget]

    async def inject(self, plan: Sequence[tuple[float, chaos.Fault]], stop: asyncio.Event) -> None:
        budget = self.started + self.args.minutes * 60 - TAIL
        try:
            for at, fault in plan:
                if time.monotonic() > budget:
                    break  # restarts ran slower than planned: the rest does not fit
                delay = self.started + at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                try:
                    await self.injector.apply(fault)
                except chaos.FaultFailed as exc:
                    # A harness problem, not a verdict on mqchat: note it, get the
                    # bridge back, go on; the run then fails (not every fault applied).
                    self.failures.append(f"{time.monotonic() - self.started:6.1f}s {exc}")
                    print(f"fault failed: {exc}", flush=True)
                    if not self.stack.bridge.alive:
                        await asyncio.to_thread(self.stack.start_bridge)
            remaining = self.started + self.args.minutes * 60 - time.monotonic()
            await asyncio.sleep(max(remaining, 2.0))
        finally:
            stop.set()

    async def send_all(self, sender: str, stop: asyncio.Event) -> None:
        client = self.clients[f"{sender}/phone"]
        timeout = IMPATIENT_TIMEOUT if sender in self.impatient else SEND_TIMEOUT
        rng = random.Random(f"{self.seed}-{sender}")
        pace = self.args.pace * rng.uniform(0.5, 2.0)  # some users chattier than others
        await asyncio.sleep(rng.uniform(0, pace))
        for i in range(MAX_PER_SENDER):
            if stop.is_set():
                return
            # Members send to the group from their add on (the leaver goes on after its
            # removal and is refused for good); before the add a refusal would not be
            # final: a late resend of the same id could be stored once they are in.
            in_group = self.group is not None and sender in self.group_ops.windows[self.group]
            if in_group and rng.random() < 0.25:
                await self.history.send(client, sender, None, i, timeout, conversation=self.group)
            else:
                to = rng.choice(self.partners[sender])
                await self.history.send(client, sender, to, i, timeout)
            # Mixed load: mostly paced, one send in ten starts a burst.
            if rng.random() > 0.1:
                await asyncio.sleep(rng.uniform(0.2, 1.8) * pace)

    def counts(self) -> Counter[str]:
        return Counter(op.kind for op in self.history.ops)

    async def progress(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.args.progress)
            kinds = self.counts()
            self.load_samples.append(os.getloadavg()[0])
            last = self.injector.applied[-1] if self.injector.applied else "-"
            print(
                f"[{time.monotonic() - self.started:6.1f}s] invoked={kinds['invoke']} "
                f"ok={kinds['ok']} unknown={kinds['unknown']} fail={kinds['fail']} "
                f"shown={len(self.received)} faults={len(self.injector.applied)}/{self.planned} "
                f"(last: {last}) load={loadavg()}",
                flush=True,
            )

    def caught_up(self) -> bool:
        if any(client.pending for client in self.clients.values()):
            return False
        targets = {op.key: op.target for op in self.history.ops if op.kind == "invoke"}
        shown = {(r.device, r.sender, r.id) for r in self.received}
        windows = self.group_ops.windows
        for row in stored(self.stack):
            if row.conversation_id in windows:
                group = windows[row.conversation_id]
                audience = [u for u, w in group.items() if chaos.in_window(w, row.seq)]
            else:
                audience = [row.sender, targets[(row.sender, row.client_id)].removeprefix("to:")]
            for user in audience:
                for device in self.devices[user]:
                    if (f"{user}/{device}", row.sender, row.client_id) not in shown:
                        return False
        return True

    async def run(self) -> chaos.Report:
        plan = self.plan()
        self.planned = len(plan)
        kinds = Counter(f.kind for _, f in plan)
        print(
            f"chaos seed {self.seed}: {len(plan)} faults planned ({len(kinds)} kinds, "
            f"{min(kinds.values())}-{max(kinds.values())} each), {len(self.users)} users, "
            f"{len(self.clients)} devices, {self.conversations} conversations"
            + (
                f", a group of {len(self.group_members)} (+{self.joiner}, -{self.leaver} mid-run)"
                if self.group
                else ""
            ),
            flush=True,
        )
        stop = asyncio.Event()
        receivers = [
            asyncio.create_task(chaos.record_shown(device, client, self.received))
            for device, client in self.clients.items()
        ]
        self.started = self.injector.started = time.monotonic()
        ticker = asyncio.create_task(self.progress(stop))
        try:
            await asyncio.gather(
                self.inject(plan, stop),
                self.change_members(stop),
                *(self.send_all(u, stop) for u in self.users),
            )
            self.load_ended = time.monotonic() - self.started
            print(f"load ended at {self.load_ended:.1f}s; waiting for devices", flush=True)
            deadline = time.monotonic() + QUIET_TIMEOUT
            while not await asyncio.to_thread(self.caught_up):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(1.0)
            self.quiet_ended = time.monotonic() - self.started
        finally:
            stop.set()
            await ticker
            await chaos.cancel(receivers)
        rows = chaos.stored_rows(self.stack)
        devices: dict[str, Sequence[str]] = {
            u: [f"{u}/{d}" for d in names] for u, names in self.devices.items()
        }
        return check(
            self.history, self.received, rows, devices=devices, windows=self.group_ops.windows
        )

    @property
    def ok(self) -> bool:
        """Every fault applied as planned, and every kind at least once."""
        return not self.failures and set(self.injector.counts()) == set(chaos.FAULT_KINDS)


def write_report(bench: Bench, report: chaos.Report, args: argparse.Namespace, out: Path) -> str:
    short = args.minutes < 10
    command = (
        f"python -m bench.chaos_long --minutes {args.minutes:g} --users {args.users} "
        f"--seed {bench.seed} --pace {args.pace:g} --gap {args.gap:g}"
        + (f" --groups --group-size {args.group_size}" if args.groups else "")
    )
    counts = bench.injector.counts()
    verdict = report.verdict()
    if not bench.ok:
        verdict = f"INCOMPLETE (faults failed or kinds missing); {verdict}"
    lines = [
        "# Reliability: the long chaos run",
        "",
        "Generated by `bench/chaos_long.py` (one command, below). Users on a ring chat with",
        "their neighbours through the SDK (some with a second device, some impatient:",
        f"their sends go *unknown* after {IMPATIENT_TIMEOUT:g} s) while `tests/support/chaos.py`'s",
        "injector applies every fault kind in seeded rounds: the bridge killed (SIGKILL) at",
        "random moments and at its three dangerous points (`MQCHAT_BRIDGE_CRASH_AT`: before",
        "the commit, between commit and republish, between republish and the uplink ack),",
        "restarted gracefully (SIGTERM), frozen past its keepalive (SIGSTOP); mosquitto",
        "killed (persistence on); PostgreSQL restarted and crashed; the client↔broker,",
        "bridge↔broker and bridge↔PostgreSQL TCP paths cut and stalled",
        "(`tests/support/tcp_proxy.py`). `tests/support/chaos.py::check` then reconciles",
        "every sender's operation log, every",
        "device's received log and the `messages` table. The CI-sized run of the same",
        "faults is `tests/test_chaos.py::test_no_message_is_lost_under_every_fault`.",
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
    peak = max(bench.load_samples, default=0.0)
    lines += [
        "## Run",
        "",
        f"- command: `{command}`",
        f"- seed: {bench.seed} (replay with the same `--seed`)",
        f"- git commit: {git_commit()}",
        f"- users: {len(bench.users)}, devices: {len(bench.clients)}, "
        f"conversations: {bench.conversations}, impatient senders: {len(bench.impatient)}",
        *(
            [
                f"- group: {len(bench.group_members)} members, one send in four of each goes"
                f" to it; {bench.joiner} added and {bench.leaver} removed mid-run; windows"
                f" (seqs each member must see exactly): {bench.group_ops.windows[bench.group]}"
            ]
            if bench.group
            else []
        ),
        f"- faults: {len(bench.injector.applied)} applied, {len(counts)} kinds (the plan had "
        f"{bench.planned}; those that no longer fitted in the time were left out)",
        f"- load ended at {bench.load_ended:.1f}s, devices caught up at {bench.quiet_ended:.1f}s",
        f"- machine: {os.cpu_count()} cores shared with other work; load average at the end "
        f"{loadavg()} (1/5/15 min), highest 1-min sample during the run {peak:.2f}",
        f"- verdict: **{verdict}**",
        "",
        "## Counts",
        "",
        "```",
        report.render(),
        "```",
        "",
        "## Faults per kind",
        "",
        "| fault | applied |",
        "|---|---|",
        *(f"| {kind} | {counts[kind]} |" for kind in sorted(chaos.FAULT_KINDS)),
        f"| **total** | **{sum(counts.values())}** |",
        "",
    ]
    if bench.failures:
        lines += ["## Faults that failed to apply", "", "```", *bench.failures, "```", ""]
    lines += [
        "## Faults applied",
        "",
        "```",
        *map(str, bench.injector.applied),
        "```",
        "",
    ]
    text = "\n".join(lines)
    out.write_text(text)
    return text


async def amain(args: argparse.Namespace) -> int:
    # Devices lose their connections dozens of times on purpose: keep the progress readable.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    logging.getLogger("clients").setLevel(logging.ERROR)
    logging.getLogger("core.mqtt").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="mqchat-chaos-") as tmp:
        bench = Bench(args, Path(tmp))
        await bench.setup()
        try:
            report = await bench.run()
        finally:
            await bench.close()
    print(report.render())
    print(f"faults per kind: {dict(sorted(bench.injector.counts().items()))}")
    write_report(bench, report, args, Path(args.out))
    print(f"seed {bench.seed}; report written to {args.out}")
    return 0 if report.ok and bench.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--seed", type=int, default=secrets.randbelow(1_000_000))
    parser.add_argument("--pace", type=float, default=2.0, help="mean seconds between sends")
    parser.add_argument("--gap", type=float, default=2.0, help="min seconds between faults")
    parser.add_argument("--progress", type=float, default=10.0, help="seconds between lines")
    parser.add_argument("--out", default=str(ROOT / "docs" / "reliability.md"))
    parser.add_argument("--groups", action="store_true", help="also a group, changed mid-run")
    parser.add_argument("--group-size", type=int, default=20, help="members at the start")
    args = parser.parse_args(argv)
    if not 4 <= args.users <= 1000 or not 0 < args.minutes <= 60:
        parser.error("--users must be 4..1000 and --minutes 0..60")
    return asyncio.run(amain(args))


if __name__ == "__main__":
    raise SystemExit(main())
