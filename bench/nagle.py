"""What Nagle's algorithm costs a stock MQTT client in a closed loop.

    python -m bench.nagle                      # mosquitto + PostgreSQL, 3 rounds of 200
    python -m bench.nagle --stack embedded --rounds 5 --write-docs

Two accounts chat through a whole mqchat (broker, bridge, database), each with a plain
paho-mqtt client, as an app developer would write it: the sender publishes one
``up/msg`` (QoS 1), waits until the recipient's client has it, and only then sends the
next (a closed loop, like a person or a request/response device). The same loop runs
with paho as it comes (Nagle's algorithm on) and with ``TCP_NODELAY`` set in paho's
``on_socket_open``, in alternating rounds on the same stack, so the two are compared
under the same conditions. The latency is from the publish call to the recipient's
``on_message``.

Why it matters: with Nagle on, a small write waits while an earlier small segment of the
same connection is unacknowledged, and the broker's delayed ACK holds that
acknowledgement for up to ~40 ms. In a chat round trip the client always has such a
segment outstanding (its PUBACK for the previous ``sent`` receipt), so each message
waits for the delayed ACK.

Results go to ``bench/results/nagle.jsonl``; ``--write-docs`` renders the newest run of
each stack into ``docs/benchmarks.md`` with a plot in ``docs/img/``. Bounded:
``rounds x 2 x messages`` messages, each waited for at most ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from bench._report import _figure, _save, git_commit, write_docs_section
from bench._stack import PASSWORD, log, running_stack
from bench.load import UNLIMITED_MESSAGE_RATE, machine
from protocol import topics

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "nagle.jsonl"
DOCS = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "img" / "nagle-closed-loop.png"
DOCS_BEGIN = "<!-- nagle:results:begin (written by python -m bench.nagle --write-docs) -->"
DOCS_END = "<!-- nagle:results:end -->"
VARIANTS = ("stock paho (Nagle on)", "paho + TCP_NODELAY")
#: Messages at the start of each round left out of its numbers (connection warm-up).
WARMUP = 10


def _nodelay(client: paho.Client, userdata: Any, sock: Any) -> None:
    """What a client author adds: paho's documented socket hook, one option."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Client:
    """One stock paho client with its network thread, connected and subscribed."""

    def __init__(self, host: str, port: int, user: str, *, nodelay: bool) -> None:
        self.user = user
        self.arrived: dict[str, float] = {}
        self._wanted: str | None = None
        self._event = threading.Event()
        self._ready = threading.Event()
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=f"{user}:nagle-{uuid.uuid4().hex[:6]}"
        )
        client.username_pw_set(user, PASSWORD)
        if nodelay:
            client.on_socket_open = _nodelay
        client.on_connect = lambda c, *_: c.subscribe(topics.down_all(user), qos=1)
        client.on_subscribe = lambda *_: self._ready.set()
        client.on_message = self._on_message
        client.connect(host, port)
        client.loop_start()
        if not self._ready.wait(10):
            raise RuntimeError(f"{user} did not connect and subscribe")
        self.client = client

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if message.topic != topics.down_msg(self.user):
            return
        if json.loads(message.payload).get("id") == self._wanted:
            self._event.set()

    def expect(self, message_id: str) -> None:
        self._event.clear()
        self._wanted = message_id

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def one_round(
    host: str,
    port: int,
    sender: str,
    recipient: str,
    messages: int,
    *,
    nodelay: bool,
    timeout: float,
) -> tuple[list[float], int]:
    """``messages`` sends, each after the previous one arrived; (latencies in ms, lost)."""
    receiver = _Client(host, port, recipient, nodelay=nodelay)
    publisher = _Client(host, port, sender, nodelay=nodelay)
    latencies: list[float] = []
    lost = 0
    try:
        for n in range(messages + WARMUP):
            message_id = uuid.uuid4().hex
            payload = json.dumps({"id": message_id, "to": recipient, "body": f"closed loop {n}"})
            receiver.expect(message_id)
            started = time.perf_counter()
            publisher.client.publish(topics.up_msg(sender), payload, qos=1)
            if not receiver.wait(timeout):
                lost += 1
                continue
            if n >= WARMUP:
                latencies.append((time.perf_counter() - started) * 1000)
    finally:
        publisher.close()
        receiver.close()
    return latencies, lost


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def run(stack_kind: str, rounds: int, messages: int, timeout: float) -> dict[str, Any]:
    with running_stack(stack_kind) as stack:
        asyncio.run(stack.add_users(2))
        stack.start_bridges(1, UNLIMITED_MESSAGE_RATE)
        sender, recipient = stack.users
        samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
        round_p50: dict[str, list[float]] = {v: [] for v in VARIANTS}
        lost = dict.fromkeys(VARIANTS, 0)
        for r in range(rounds):
            for variant in VARIANTS:
                latencies, missing = one_round(
                    stack.host,
                    stack.port,
                    sender,
                    recipient,
                    messages,
                    nodelay=variant != VARIANTS[0],
                    timeout=timeout,
                )
                samples[variant] += latencies
                lost[variant] += missing
                p50 = statistics.median(latencies) if latencies else float("nan")
                round_p50[variant].append(p50)
                log(f"  round {r + 1}/{rounds} {variant:<24} p50 {p50:6.1f} ms  lost {missing}")
    out: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": machine(),
        "stack": stack_kind,
        "rounds": rounds,
        "messages_per_round": messages,
        "command": f"python -m bench.nagle --stack {stack_kind} --rounds {rounds}"
        f" --messages {messages}",
        "variants": {},
    }
    for variant in VARIANTS:
        values = samples[variant]
        out["variants"][variant] = {
            "count": len(values),
            "lost": lost[variant],
            "p50_ms": round(statistics.median(values), 2),
            "p99_ms": round(percentile(values, 0.99), 2),
            "round_p50_ms": [round(v, 2) for v in round_p50[variant]],
            "samples_ms": [round(v, 3) for v in values],
        }
    stock, nodelay = (out["variants"][v]["p50_ms"] for v in VARIANTS)
    out["p50_ratio"] = round(stock / nodelay, 1)
    return out


def latest_per_stack(path: Path = RESULTS) -> list[dict[str, Any]]:
    """The newest recorded run of each stack, production first."""
    latest: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            latest[record["stack"]] = record
    return [latest[k] for k in ("production", "embedded") if k in latest]


def render(records: list[dict[str, Any]]) -> str:
    rows = [
        "| stack | client | messages | p50 | p99 | p50 of each round | lost | ratio of p50s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for record in records:
        for name, v in record["variants"].items():
            each = ", ".join(f"{p:.1f}" for p in v["round_p50_ms"])
            ratio = f"{record['p50_ratio']}x" if name == VARIANTS[0] else ""
            rows.append(
                f"| {record['stack']} | {name} | {v['count']} | {v['p50_ms']:.1f} ms"
                f" | {v['p99_ms']:.1f} ms | {each} ms | {v['lost']} | {ratio} |"
            )
    rows.append("")
    for record in records:
        rows.append(
            f"- `{record['stack']}`: {record['rounds']} alternating rounds of"
            f" {record['messages_per_round']} messages per client, commit"
            f" `{record['commit']}`, {record['when']}: `{record['command']}`"
        )
    rows += ["", f"![closed-loop latency with and without TCP_NODELAY](img/{PLOT.name})"]
    return "\n".join(rows) + "\n"


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """The latency distribution of each client on each stack (empirical CDF)."""
    from matplotlib.ticker import FormatStrFormatter

    fig, ax = _figure((8, 4))
    for record, style in zip(records, ("-", "--"), strict=False):
        for (name, v), color in zip(record["variants"].items(), ("C3", "C0"), strict=True):
            ordered = sorted(v["samples_ms"])
            share = [(i + 1) / len(ordered) for i in range(len(ordered))]
            label = f"{record['stack']}, {name}: p50 {v['p50_ms']:.1f} ms"
            ax.plot(ordered, share, style, color=color, label=label)
    ax.set_xscale("log")
    ax.set_xticks([1, 2, 5, 10, 20, 50, 100, 200])
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(FormatStrFormatter(""))
    ax.set_xlabel("publish to arrival at the recipient (ms), closed loop")
    ax.set_ylabel("share of messages")
    ax.set_title("stock paho vs TCP_NODELAY through mqchat", fontsize=10)
    _save(fig, ax, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", choices=("production", "embedded"), default="production")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per message")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    log(f"closed loop on {args.stack}: {args.rounds} rounds x {len(VARIANTS)} variants")
    record = run(args.stack, args.rounds, args.messages, args.timeout)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as out:
        out.write(json.dumps(record) + "\n")
    for name, v in record["variants"].items():
        log(f"{name:<24} p50 {v['p50_ms']:.1f} ms  p99 {v['p99_ms']:.1f} ms  lost {v['lost']}")
    log(f"ratio of medians: {record['p50_ratio']}x")
    if args.write_docs:
        records = latest_per_stack()
        plot(records, PLOT)
        write_docs_section(DOCS, render(records), DOCS_BEGIN, DOCS_END)
        log(f"wrote {DOCS} and {PLOT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
