"""Durable chat on a RabbitMQ cluster: 1 node against 3, two bridges, bounded.

    python -m bench.rabbitmq_cluster --nodes 1
    python -m bench.rabbitmq_cluster --nodes 3

Starts PostgreSQL and ``nodes`` RabbitMQ nodes from their binaries
(``tests.support.stack.start_rabbitmq_stack``: accounts through the history API, two
bridges on the AMQP uplink queues), connects ``pairs`` pairs of SDK devices spread over
the nodes, and sends open loop: message ``k`` of a sender is due at ``t0 + k / rate``
and its latency is measured from then to the moment its recipient's device shows it,
so a stall is counted. Bounded: ``seconds`` of sending (at most 60), then at most 30 s
to drain; a message not shown by then is lost. One process drives every device, so on
a small machine the Python client side is a bound of its own: read the numbers as
preliminary and as a comparison between the two cluster sizes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from hdrh.histogram import HdrHistogram

from bench._report import git_commit
from bench._stack import log
from mqchat import ChatClient
from store import make_engine, migrate
from tests.support.services import start_postgres
from tests.support.stack import TEMPLATE_DATABASE, Stack, password_of, start_rabbitmq_stack

app = typer.Typer(add_completion=False)

RESULTS = Path(__file__).parent / "results" / "rabbitmq.jsonl"


async def run(nodes: int, pairs: int, rate: float, seconds: float) -> dict[str, object]:
    base = Path(tempfile.mkdtemp(prefix="mqchat-bench-rabbit-"))
    postgres = start_postgres(base / "pg")
    try:
        postgres.create_database(TEMPLATE_DATABASE)
        engine = make_engine(postgres.url(TEMPLATE_DATABASE))
        migrate(engine)
        engine.dispose()
        started = time.monotonic()
        stack = await start_rabbitmq_stack(base / "stack", postgres, nodes)
        boot = time.monotonic() - started
        try:
            return await _chat(stack, nodes, pairs, rate, seconds) | {"boot_s": round(boot, 1)}
        finally:
            await stack.close()
    finally:
        postgres.close()


async def _chat(
    stack: Stack, nodes: int, pairs: int, rate: float, seconds: float
) -> dict[str, object]:
    cluster = stack.rabbitmq
    assert cluster is not None
    users = await stack.new_users(*(f"u{i}" for i in range(2 * pairs)))
    addresses = cluster.mqtt_addresses
    clients: dict[str, ChatClient] = {}
    for index, user in enumerate(users):
        node = index % len(addresses)
        clients[user] = ChatClient(
            host=addresses[node][0],
            port=addresses[node][1],
            username=user,
            password=password_of(user),
            device="bench",
            other_brokers=addresses[node + 1 :] + addresses[:node],
            presence_interval=None,
        )
        await clients[user].connect()
        if (index + 1) % 50 == 0 or index + 1 == len(users):
            log(f"  {index + 1}/{len(users)} devices connected")
    senders = users[::2]
    partner = dict(zip(users[::2], users[1::2], strict=True))
    due: dict[str, float] = {}
    shown = HdrHistogram(1, 600_000_000, 3)  # microseconds
    received = 0
    per_sender = int(seconds * rate)
    expected = per_sender * len(senders)
    done = asyncio.Event()

    async def receive(client: ChatClient) -> None:
        nonlocal received
        async for message in client.messages():
            when = due.pop(f"{message.sender}/{message.id}", None)
            if when is not None:
                shown.record_value(max(1, int((time.monotonic() - when) * 1e6)))
                received += 1
                if received == expected:
                    done.set()

    receivers = [asyncio.create_task(receive(clients[partner[s]])) for s in senders]
    sends: set[asyncio.Task[object]] = set()
    t0 = time.monotonic() + 0.5

    async def send_all(sender: str) -> None:
        for k in range(per_sender):
            at = t0 + k / rate
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            message_id = f"m{k}"
            due[f"{sender}/{message_id}"] = at
            task = asyncio.create_task(
                clients[sender].send(str(k), to=partner[sender], id=message_id, timeout=60)
            )
            sends.add(task)
            task.add_done_callback(sends.discard)

    log(f"  sending {rate:g} msg/s from each of {len(senders)} senders for {seconds:g} s")
    await asyncio.gather(*(send_all(s) for s in senders))
    log(f"  sent; {received}/{expected} shown, draining")
    sent_end = time.monotonic()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), 30)
    elapsed = time.monotonic() - t0
    for task in receivers:
        task.cancel()
    for client in clients.values():
        await client.close()
    return {
        "nodes": nodes,
        "bridges": 1 + len(stack.more_bridges),
        "devices": len(users),
        "offered_msg_s": round(rate * len(senders)),
        "shown": received,
        "expected": expected,
        "lost_or_late": expected - received,
        "delivered_msg_s": round(received / elapsed),
        "sending_s": round(sent_end - t0, 1),
        "p50_ms": shown.get_value_at_percentile(50) / 1000,
        "p99_ms": shown.get_value_at_percentile(99) / 1000,
        "max_ms": shown.get_max_value() / 1000,
        "load_avg": os.getloadavg()[0],
    }


@app.command()
def main(
    nodes: Annotated[int, typer.Option(min=1, max=3)] = 3,
    pairs: Annotated[int, typer.Option(min=1, max=200)] = 20,
    rate: Annotated[float, typer.Option(help="messages a second per sender")] = 5.0,
    seconds: Annotated[float, typer.Option(min=1, max=60)] = 15.0,
    results: Annotated[Path, typer.Option(help="a JSON line is appended here")] = RESULTS,
) -> None:
    result = asyncio.run(run(nodes, pairs, rate, seconds))
    record = {
        "run": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": shlex.join(["python", "-m", "bench.rabbitmq_cluster", *sys.argv[1:]]),
    } | result
    with results.open("a") as out:
        out.write(json.dumps(record) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    app()
