"""Push throughput and latency: many offline recipients, each pushed once.

    .venv/bin/python -m bench.push                 # 10,000 recipients, 1,000 msg/s, 10 s
    .venv/bin/python -m bench.push --recipients 2000 --rate 200 --seconds 10

Starts a throwaway PostgreSQL (``--database sqlite`` for the embedded stack's store),
migrates it, adds ``--recipients`` accounts (password hashes skipped: nobody signs in)
with one Web Push subscription each at the tests' HTTPS push service
(``tests.support.push.PushReceiver``, which checks every VAPID signature and decrypts
every payload), and starts ``python -m push`` against it. Then it stores messages as
the bridge does (``store.messages.persist_batch``, batches of ``rate / 10`` every
100 ms) from one sender to the recipients in turn, each recipient getting at most one,
and waits for every push to arrive.

Reported: pushes per second at the receiver, latency from each message's commit to
its push's receipt (for an offline recipient the grace ends at the commit: no device
is online), and how many recipients got more than one push (must be 0).

Bounded: at most ``--seconds`` (60) of sending and ``--wait`` (240) of waiting; every
server listens on loopback only and is stopped at the end.

Each result is appended to ``bench/results/push.jsonl``; ``--plot`` draws the runs of
this commit there (pushes per second and p99 by number of push daemons) to
``docs/img/push-daemons.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
from sqlalchemy import Engine, insert
from sqlmodel import Session

from bench._report import _figure, _save, git_commit
from core import daemon
from core.daemon import PUSH_READY_LOG
from protocol import UpMessage
from push.config import PushSettings
from store import make_engine, migrate
from store.messages import DirectConversations, persist_batch
from store.tables import Account, PushSubscription
from store.types import utcnow
from tests.support.push import DeviceKeys, PushReceiver
from tests.support.services import LOOPBACK, Daemon, start_postgres

SENDER = "sender"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else float("nan")


@contextlib.contextmanager
def database(kind: str, base: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{base / 'bench.db'}"
        return
    server = start_postgres(base)
    try:
        server.create_database("bench")
        yield server.url("bench")
    finally:
        server.close()


def populate(engine: Engine, receiver: PushReceiver, recipients: int) -> list[str]:
    users = [f"r{i:05d}" for i in range(recipients)]
    keys = DeviceKeys.new()  # one key pair for all: decrypting is the receiver's cost
    now = utcnow()
    with Session(engine) as session:
        session.execute(
            insert(Account),
            [
                {"username": u, "password_hash": "!", "created_at": now, "disabled": False}
                for u in [SENDER, *users]
            ],
        )
        rows = []
        for user in users:
            endpoint, _ = receiver.endpoint(user, keys=keys)
            rows.append(
                {
                    "username": user,
                    "device": "phone",
                    "channel": "webpush",
                    "endpoint": endpoint,
                    **keys.subscription_keys(),
                    "created_at": now,
                }
            )
        session.execute(insert(PushSubscription), rows)
        session.commit()
    return users


async def send(engine: Engine, users: list[str], rate: int, seconds: float) -> dict[str, float]:
    """Store messages at ``rate`` a second; the commit time of each recipient's one."""
    committed: dict[str, float] = {}
    directs = DirectConversations()
    per_tick = max(1, rate // 10)
    started = time.monotonic()
    sent = 0
    while sent < len(users) and time.monotonic() - started < seconds:
        batch = users[sent : sent + per_tick]
        uplinks = [(SENDER, UpMessage(id=f"m-{u}", to=u, body="hello")) for u in batch]
        await asyncio.to_thread(persist_batch, engine, uplinks, directs)
        now = time.monotonic()
        committed.update({u: now for u in batch})
        sent += len(batch)
        next_tick = started + (sent / per_tick) * 0.1
        await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
    return committed


RESULTS = Path(__file__).parent / "results" / "push.jsonl"
PLOT = Path(__file__).parent.parent / "docs" / "img" / "push-daemons.png"


def plot(results: Path, out: Path) -> None:
    """Pushes per second and p99 of each run of the newest commit, by daemons."""
    records = [json.loads(line) for line in results.read_text().splitlines() if line]
    commit = records[-1]["commit"]
    runs = sorted(
        (r for r in records if r["commit"] == commit),
        key=lambda r: (r["daemons"], r.get("variant", "")),
    )
    fig, ax = _figure((7, 4))
    labels = [
        f"{r['daemons']} daemon{'s' if r['daemons'] > 1 else ''} ({n})"
        + (f"\n{r['variant']}" if "variant" in r else "")
        for n, r in enumerate(runs, 1)
    ]
    ax.bar(labels, [r["pushes_per_second"] for r in runs], color="C0", label="pushes/s")
    ax.set_ylabel("pushes per second at the push service")
    twin = ax.twinx()
    twin.plot(
        labels, [r["latency_ms"]["p99"] / 1000 for r in runs], "o", color="C3", label="p99 (s)"
    )
    twin.set_ylabel("p99 from commit to receipt (s)")
    twin.set_ylim(bottom=0)
    ax.set_title(
        f"push: offline recipients, a message each, 10 s at up to 1,000/s; commit {commit}",
        fontsize=9,
    )
    twin.legend(loc="upper center", fontsize=7)
    _save(fig, ax, out)


def _cpu(processes: list[psutil.Process]) -> float:
    """CPU seconds (user + system) the processes have used so far."""
    return float(sum(t.user + t.system for t in (p.cpu_times() for p in processes)))


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--recipients", type=int, default=10_000)
    parser.add_argument("--rate", type=int, default=1_000, help="messages a second")
    parser.add_argument("--seconds", type=float, default=10.0, help="of sending, at most 60")
    parser.add_argument("--wait", type=float, default=60.0, help="for the last push, at most 240")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--daemons", type=int, default=1, choices=range(1, 5), help="push daemons sharing the work"
    )
    parser.add_argument("--plot", action="store_true", help="draw this commit's runs and exit")
    args = parser.parse_args()
    if args.plot:
        plot(RESULTS, PLOT)
        return 0
    seconds, wait = min(args.seconds, 60.0), min(args.wait, 240.0)
    users_wanted = min(args.recipients, int(args.rate * seconds))

    with tempfile.TemporaryDirectory(prefix="mqchat-bench-push-") as tmp:
        base = Path(tmp)
        receiver = PushReceiver(base)
        with database(args.database, base) as url:
            engine = make_engine(url)
            migrate(engine)
            users = populate(engine, receiver, args.recipients)[:users_wanted]
            settings = daemon.build(
                PushSettings,
                database_url=url,
                vapid_key_file=base / "vapid.pem",
                allow_hosts=[LOOPBACK],
                ca_file=receiver.cert_file,
                concurrency=args.concurrency,
                poll=0.05,
            )
            pushers = [
                Daemon(f"push-{n}", "push", {}, base, settings=settings, ready_line=PUSH_READY_LOG)
                for n in range(1, args.daemons + 1)
            ]
            for push in pushers:
                push.start_ready()
            processes = [psutil.Process(push.process.pid) for push in pushers if push.process]
            cpu_before = (_cpu(processes), resource.getrusage(resource.RUSAGE_SELF))
            try:
                committed = await send(engine, users, args.rate, seconds)
                with contextlib.suppress(TimeoutError):  # reported as pushed < messages
                    await asyncio.to_thread(
                        receiver.wait_for,
                        lambda r: len({x.path for x in r.received}) >= len(committed),
                        wait,
                        "every push",
                    )
                # Where the two cores went: the daemons, and this process (the push
                # service's TLS, VAPID checks and decryption, and the sending).
                usage = resource.getrusage(resource.RUSAGE_SELF)
                cpu = {
                    "push_daemons_s": round(_cpu(processes) - cpu_before[0], 1),
                    "bench_and_receiver_s": round(
                        usage.ru_utime
                        + usage.ru_stime
                        - cpu_before[1].ru_utime
                        - cpu_before[1].ru_stime,
                        1,
                    ),
                }
            finally:
                for push in pushers:
                    push.stop()
                engine.dispose()
                receiver.close()
    arrivals: dict[str, list[float]] = {}
    for r in receiver.received:
        arrivals.setdefault(r.path.lstrip("/"), []).append(r.at)
    latencies = [min(arrivals[u]) - t for u, t in committed.items() if u in arrivals]
    first = min(min(a) for a in arrivals.values())
    last = max(max(a) for a in arrivals.values())
    result = {
        "commit": git_commit(),
        "daemons": args.daemons,
        "database": args.database,
        "command": " ".join(sys.argv[1:]),
        "messages": len(committed),
        "pushed": len(arrivals),
        "pushed_twice": sum(1 for a in arrivals.values() if len(a) > 1),
        "receiver_failures": len(receiver.failures),
        "cpu_seconds": cpu,
        "pushes_per_second": round(len(receiver.received) / max(last - first, 1e-9), 1),
        "latency_ms": {
            "p50": round(percentile(latencies, 0.5) * 1000, 1),
            "p99": round(percentile(latencies, 0.99) * 1000, 1),
            "max": round(max(latencies) * 1000, 1),
        },
    }
    print(json.dumps(result, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as out:
        out.write(json.dumps(result) + "\n")
    return 0 if result["pushed_twice"] == 0 and result["pushed"] == len(committed) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
