"""Chat load: open-loop latency and durable throughput of mqchat, against the raw broker.

    python -m bench.load short        # every scenario, small: under 5 minutes
    python -m bench.load full         # the same, longer steps, 1,000 users on both stacks
    python -m bench.load latency      # (1) 1,000 msg/s, 1,000 users, mosquitto+PostgreSQL
    python -m bench.load throughput   # (2) step the rate up on mosquitto+PostgreSQL, then raw
    python -m bench.load embedded     # (3) the same on amqtt+SQLite
    python -m bench.load raw          # the raw broker alone
    python -m bench.load flood        # one user floods, 100 others chat

Every command starts its own stack from binaries (``bench._stack``), creates the
users, connects each as a real authenticated MQTT connection from generator processes
(``bench._gen``), and runs steps at a constant offered rate: message ``k`` is due at
``t0 + k / rate`` whatever happened before (open loop), and every latency is measured
from that intended time, so a stall is counted, not hidden. Percentiles come from HDR
histograms (1 µs to 10 min, 3 significant digits). A message not received by the end of
the drain time is lost; one received twice is a duplicate.

The raw-broker baseline uses the same connections, topics and payload sizes without the
bridge: each sender publishes a downlink-shaped payload straight to the recipient's
``down/msg``. Each chat message costs the broker three relays (uplink, downlink,
receipt) where a raw one costs one, so the broker-bound ceiling of mqchat is about a
third of the raw rate.

Results are appended as JSON lines to ``bench/results/load.jsonl`` (one per step, with
the machine, the commit, the command and the load average) and, with
``--write-docs``, rendered into the "Chat load" section of ``docs/benchmarks.md``
together with a plot in ``docs/img/``. Bounded: every step has a fixed number of
messages and a drain timeout; stepping stops at the first failed step or the last rate.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Annotated, Any

import typer
from hdrh.histogram import HdrHistogram

from bench._disk import DiskProbe
from bench._gen import (
    SLOTS,
    WINDOW_NS,
    Worker,
    join_or_kill,
    new_histogram,
    percentiles,
    spawn,
)
from bench._report import git_commit
from bench._stack import PASSWORD, Stack, log, running_stack
from clients.cli.options import grouped

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "load.jsonl"
METRICS_COST_PLOT = ROOT / "docs" / "img" / "metrics-cost.png"
DOCS = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "img" / "chat-load-latency.png"
TIMELINE_PLOT = ROOT / "docs" / "img" / "chat-load-timeline.png"
DOCS_BEGIN = "<!-- chat-load:results:begin (written by python -m bench.load --write-docs) -->"
DOCS_END = "<!-- chat-load:results:end -->"

#: A step passes when p99 end-to-end is under this and nothing is lost or duplicated.
P99_LIMIT_MS = 100.0
#: A timeline window whose worst latency is above this is part of a stall.
STALL_MS = 50.0
#: Share of one core above which a generator process counts as saturated.
GENERATOR_SATURATED = 0.9
#: The bridge's own default, for the flood scenario (the others lift it).
DEFAULT_MESSAGE_RATE = "20/second;600/minute"
UNLIMITED_MESSAGE_RATE = "100000/second"


# -- where and when ------------------------------------------------------------------


def stalls(worst_ms: list[float], window_s: float, start_wall: float) -> list[dict[str, Any]]:
    """The runs of consecutive windows whose worst latency is over ``STALL_MS``.

    Each: its offset in the step's schedule, its length, its worst latency and the UTC
    wall-clock time it began, to line it up with the daemons' logs.
    """
    found: list[dict[str, Any]] = []
    begin: int | None = None
    for index, worst in enumerate([*worst_ms, 0.0]):
        if worst > STALL_MS and begin is None:
            begin = index
        elif worst <= STALL_MS and begin is not None:
            at = start_wall + begin * window_s
            found.append(
                {
                    "at_s": round(begin * window_s, 1),
                    "for_s": round((index - begin) * window_s, 1),
                    "worst_ms": max(worst_ms[begin:index]),
                    "at": datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds"),
                }
            )
            begin = None
    return found


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "ram_gib": round(memory_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- percentiles ---------------------------------------------------------------------


def merged(encoded: list[str]) -> HdrHistogram:
    histogram = new_histogram()
    for item in encoded:
        histogram.decode_and_add(item.encode())
    return histogram


# -- the generator processes -----------------------------------------------------------


@dataclass
class StepPlan:
    label: str
    mode: str  # "chat" | "raw"
    rate: float
    duration: float
    drain: float
    #: Chat over the first ``pairs`` pairs (None: all of them).
    pairs: int | None = None
    #: One more pair where the first user floods at this rate.
    flood_rate: float | None = None


@dataclass
class Generator:
    """The generator processes and the users each one owns (whole pairs)."""

    stack: Stack
    workers: int
    processes: list[Any] = field(default_factory=list)
    pipes: list[Connection] = field(default_factory=list)
    pairs_of: list[list[tuple[str, str]]] = field(default_factory=list)
    steps_run: int = 0
    #: The users to pair up (default: all of the stack's); ``bench.groups`` keeps its
    #: group members out of the 1:1 pairs.
    users: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        users = self.users or self.stack.users
        pairs = [(users[i], users[i + 1]) for i in range(0, len(users) - 1, 2)]
        self.all_pairs = pairs
        self.pairs_of = [pairs[w :: self.workers] for w in range(self.workers)]
        self.progress = multiprocessing.get_context("spawn").Array(
            "q", self.workers * len(SLOTS), lock=False
        )

    def start(self) -> None:
        host, port = self.stack.host, self.stack.port
        for index in range(self.workers):
            users = [u for pair in self.pairs_of[index] for u in pair]
            worker = partial(Worker, index, host, port, users, PASSWORD, self.progress)
            process, pipe = spawn(f"bench-gen-{index}", worker)
            self.processes.append(process)
            self.pipes.append(pipe)
        started = time.perf_counter()
        answers = self._all({"op": "connect"}, timeout=600, label="connecting")
        connected = sum(a["connected"] for a in answers)
        log(
            f"  {connected} users connected and subscribed from {self.workers} generator"
            f" processes in {time.perf_counter() - started:.1f} s"
        )

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._all({"op": "stop"}, timeout=30, label="closing")
        join_or_kill(self.processes)
        self.processes, self.pipes = [], []

    def _all(self, command: dict[str, Any], *, timeout: float, label: str) -> list[dict[str, Any]]:
        for pipe in self.pipes:
            pipe.send(command)
        return self._collect(timeout=timeout, label=label)

    def _collect(
        self, *, timeout: float, label: str, total: int = 0, rate: float = 0
    ) -> list[dict[str, Any]]:
        answers: dict[int, dict[str, Any]] = {}
        started = time.monotonic()
        last_print = started
        while len(answers) < len(self.pipes):
            for index, pipe in enumerate(self.pipes):
                if index not in answers and pipe.poll(0.05):
                    answers[index] = pipe.recv()
            now = time.monotonic()
            if now - started > timeout:
                raise RuntimeError(f"{label}: generator did not answer within {timeout} s")
            for index, process in enumerate(self.processes):
                if index not in answers and not process.is_alive():
                    raise RuntimeError(f"{label}: generator process {index} died")
            if total and now - last_print >= 2:
                last_print = now
                sent, received, receipts, errors = (
                    sum(self.progress[w * len(SLOTS) + s] for w in range(self.workers))
                    for s in range(len(SLOTS))
                )
                log(
                    f"    {label}: offered {rate:,.0f}/s  sent {sent:,}/{total:,}"
                    f"  received {received:,}  receipts {receipts:,}  errors {errors:,}"
                    f"  elapsed {now - started:.0f} s"
                )
        failed = [a["error"] for a in answers.values() if not a.get("ok")]
        if failed:
            raise RuntimeError(f"{label}: {failed}")
        return [answers[i] for i in range(len(self.pipes))]

    def run(self, plan: StepPlan) -> dict[str, Any]:
        """Run one step on every worker at once; the merged result."""
        self.steps_run += 1
        tag = f"s{self.steps_run}"
        chat_pairs = self.all_pairs[: plan.pairs] if plan.pairs else self.all_pairs
        flood_pair = self.all_pairs[-1] if plan.flood_rate else None
        if flood_pair is not None and flood_pair in chat_pairs:
            raise ValueError("the flooding pair must not be one of the chatting pairs")
        start_at = time.time() + 0.5
        total = 0
        chatting = set(chat_pairs)
        for index, pipe in enumerate(self.pipes):
            mine = [p for p in self.pairs_of[index] if p in chatting]
            rate = plan.rate * len(mine) / len(chat_pairs)
            total += int(rate * plan.duration) if mine else 0
            spec: dict[str, Any] = {
                "tag": tag,
                "mode": plan.mode,
                "pairs": mine,
                "rate": rate,
                "duration": plan.duration,
                "drain": plan.drain,
                "start_at": start_at,
            }
            if flood_pair is not None and flood_pair in self.pairs_of[index]:
                spec["flood"] = {"rate": plan.flood_rate, "pair": flood_pair}
            pipe.send({"op": "step", "spec": spec})
        load_at_start = load_average()
        meter = _cpu_meter(self.stack, self.processes)
        with DiskProbe(self.stack.base) as disk:
            answers = self._collect(
                timeout=plan.duration + plan.drain + 60,
                label=plan.label,
                total=total,
                rate=plan.rate,
            )
        cpu = meter.used()
        result = self._merge(plan, answers, cpu, load_at_start, len(chat_pairs) * 2)
        result["steal_pct"] = round(100 * meter.steal_share(), 1)
        result["disk_flush"] = disk.summary()
        start_wall = result["timeline"]["start_wall"]
        result["disk_stalls"] = [
            {"at_s": round(at - start_wall, 2), "ms": round(ms, 1)} for at, ms in disk.stalls
        ]
        for stall in result["stalls"]:
            # A message due in the stall waited for any flush under way between its
            # due time and its arrival.
            begin = start_wall + stall["at_s"]
            end = begin + stall["for_s"] + stall["worst_ms"] / 1000
            stall["disk_flush_ms"] = round(disk.worst_between(begin, end), 1)
        return result

    def quiesce(self, quiet: float = 0.5, limit: float = 10) -> bool:
        """Let stragglers of a failed step arrive before the next step starts.

        True if the traffic stopped within ``limit`` seconds.
        """
        answers = self._all(
            {"op": "quiesce", "quiet": quiet, "limit": limit}, timeout=limit + 30, label="quiesce"
        )
        waited = max(a["seconds"] for a in answers)
        if waited > quiet + 1:
            log(f"    waited {waited:.1f} s for stragglers of the last step")
        return bool(waited < limit)

    def settle(self, bridges: int, message_rate: str, passed: bool) -> None:
        """After a step: make sure nothing of it is still in flight.

        A passed step delivered everything; only late duplicates could follow. A failed
        step may leave minutes of uplinks queued for the bridge (arriving in bursts of
        one batch, so a pause does not mean it is over). That step is already counted,
        its late messages as lost; its backlog is left behind in the broker by
        restarting the bridges under new client ids, so that it cannot slow down the
        next step.
        """
        if not passed:
            log("    failed step: restarting the bridges on fresh sessions (backlog dropped)")
            self.stack.start_bridges(bridges, message_rate, fresh_session=True)
        self.quiesce(quiet=1.0, limit=15)

    def _merge(
        self,
        plan: StepPlan,
        answers: list[dict[str, Any]],
        cpu: dict[str, float],
        load_at_start: list[float],
        users: int,
    ) -> dict[str, Any]:
        def total(key: str, items: list[dict[str, Any]]) -> int:
            return sum(int(a[key] or 0) for a in items)

        errors: dict[str, int] = {}
        for answer in answers:
            for code, n in answer["errors"].items():
                errors[code] = errors.get(code, 0) + n
        wall = max(a["wall_seconds"] for a in answers)
        send_seconds = max(a["send_seconds"] for a in answers)
        e2e = percentiles(merged([a["e2e"] for a in answers]))
        result: dict[str, Any] = {
            "label": plan.label,
            "mode": plan.mode,
            "offered_rate": plan.rate,
            "duration_s": plan.duration,
            "drain_s": plan.drain,
            "users_chatting": users,
            "scheduled": total("scheduled", answers),
            "sent": total("sent", answers),
            "received": total("received", answers),
            "lost": total("lost", answers),
            "duplicates": total("duplicates", answers),
            "stale": total("stale", answers),
            "errors": errors,
            "e2e": e2e,
            "puback": percentiles(merged([a["puback"] for a in answers])),
            "send_seconds": round(send_seconds, 2),
            "wall_seconds": round(wall, 2),
            # What got through, whatever the latency: the ceiling when no step passes.
            "delivered_per_s": round(total("received", answers) / wall, 1) if wall else 0.0,
            "max_send_lag_ms": max(a["max_send_lag_ms"] for a in answers),
            "load_at_start": load_at_start,
        }
        # Every worker's schedule starts at the same wall-clock moment (within a
        # millisecond or so): window i of one is window i of all.
        windows = max(len(a["worst_by_window_us"]) for a in answers)
        worst_ms = [
            max(a["worst_by_window_us"][i] for a in answers if i < len(a["worst_by_window_us"]))
            / 1000
            for i in range(windows)
        ]
        window_s = WINDOW_NS / 1e9
        start_wall = min(a["t0_wall"] for a in answers)
        result["timeline"] = {"window_s": window_s, "start_wall": start_wall, "worst_ms": worst_ms}
        result["stalls"] = stalls(worst_ms, window_s, start_wall)
        if plan.mode == "chat":
            result["sent_receipt"] = percentiles(merged([a["sent_receipt"] for a in answers]))
            result["receipts_missing"] = total("receipts_missing", answers)
            result["receipt_duplicates"] = total("receipt_duplicates", answers)
        cpu_generator = [round(a["cpu_seconds"] / a["wall_seconds"], 3) for a in answers]
        result["cpu_cores"] = {
            "generator_per_process": cpu_generator,
            **{part: round(seconds / wall, 3) for part, seconds in cpu.items()},
        }
        # A generator process near a full core cannot keep its schedule: the step then
        # measures the generator as much as the system.
        result["generator_saturated"] = max(cpu_generator) >= GENERATOR_SATURATED
        result["passed"] = (
            result["lost"] == 0
            and result["duplicates"] == 0
            and e2e.get("count", 0) > 0
            and float(e2e["p99_ms"]) < P99_LIMIT_MS
        )
        floods = [a["flood"] for a in answers if "flood" in a]
        if floods:
            flood = floods[0]
            result["flood"] = {
                "offered_rate": plan.flood_rate,
                "sent": flood["sent"],
                "accepted": flood["received"],
                "errors": flood["errors"],
                "e2e_accepted": percentiles(merged([flood["e2e"]])),
                "cut_off": flood.get("cut_off", False),
            }
        return result


def _cpu_meter(stack: Stack, processes: list[Any]) -> Any:
    from bench._stack import CpuMeter

    pids = stack.pids()
    pids["generator"] = [p.pid for p in processes if p.pid is not None]
    return CpuMeter(pids)


# -- reporting -------------------------------------------------------------------------


@dataclass
class Run:
    """One invocation: where results go and what every line carries."""

    command: str
    results: Path
    started: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    machine: dict[str, Any] = field(default_factory=machine)
    commit: str = field(default_factory=git_commit)
    load_at_start: list[float] = field(default_factory=load_average)
    records: list[dict[str, Any]] = field(default_factory=list)

    def record(self, scenario: str, stack: Stack, bridges: int, result: dict[str, Any]) -> None:
        line = {
            "run": self.started,
            "scenario": scenario,
            "stack": stack.kind,
            "bridges": bridges if result["mode"] == "chat" else 0,
            "users_connected": len(stack.users),
            **result,
            "machine": self.machine,
            "commit": self.commit,
            "command": self.command,
            "load_at_run_start": self.load_at_start,
        }
        self.records.append(line)
        self.results.parent.mkdir(parents=True, exist_ok=True)
        with self.results.open("a") as out:
            out.write(json.dumps(line) + "\n")
        e2e = result["e2e"]
        receipt = result.get("sent_receipt", {})
        disk = result.get("disk_flush", {})
        verdict = "ok" if result["passed"] else "FAILED"
        log(
            f"  => {result['label']}: {verdict}  sent {result['sent']:,}"
            f"  lost {result['lost']}  dup {result['duplicates']}"
            f"  e2e p50 {e2e.get('p50_ms', math.nan):.1f} p99 {e2e.get('p99_ms', math.nan):.1f}"
            f" p99.9 {e2e.get('p999_ms', math.nan):.1f} max {e2e.get('max_ms', math.nan):.1f} ms"
            + (f"  sent-receipt p99 {receipt['p99_ms']:.1f} ms" if receipt.get("count") else "")
            + f"  cpu {result['cpu_cores']}  steal {result.get('steal_pct', 0):.1f}%"
            + f"  disk flush p99 {disk.get('p99_ms', math.nan):.1f} max"
            f" {disk.get('max_ms', math.nan):.1f} ms"
        )
        for stall in result.get("stalls", [])[:5]:
            log(
                f"     stall at {stall['at_s']:.1f} s of the step ({stall['at']}):"
                f" {stall['for_s']:.1f} s, worst {stall['worst_ms']:.0f} ms;"
                f" slowest disk flush meanwhile {stall.get('disk_flush_ms', 0):.0f} ms"
            )


# -- scenarios -------------------------------------------------------------------------


@dataclass
class Settings:
    users: int
    workers: int
    bridges: int
    step_seconds: float
    drain: float


def scenario_latency(run: Run, gen: Generator, s: Settings, rate: float, seconds: float) -> None:
    """(1) Latency at a fixed rate with every user connected."""
    log(f"(1) latency at {rate:,.0f} msg/s, {len(gen.stack.users)} users ({gen.stack.kind})")
    result = gen.run(StepPlan(f"latency {rate:,.0f}/s", "chat", rate, seconds, s.drain))
    run.record("latency", gen.stack, s.bridges, result)
    gen.settle(s.bridges, UNLIMITED_MESSAGE_RATE, result["passed"])


def scenario_steps(
    run: Run, gen: Generator, s: Settings, rates: list[float], scenario: str, mode: str
) -> float:
    """Step the offered rate up until a step fails; the highest passing rate (0: none)."""
    log(f"{scenario}: {mode} on {gen.stack.kind}, rates {[int(r) for r in rates]}")
    ceiling = 0.0
    for rate in rates:
        result = gen.run(StepPlan(f"{mode} {rate:,.0f}/s", mode, rate, s.step_seconds, s.drain))
        run.record(scenario, gen.stack, s.bridges, result)
        gen.settle(s.bridges, UNLIMITED_MESSAGE_RATE, result["passed"] or mode == "raw")
        if not result["passed"]:
            break
        ceiling = rate
    log(f"  {scenario}: highest passing rate {ceiling:,.0f} msg/s ({mode}, {gen.stack.kind})")
    return ceiling


def scenario_raw(run: Run, gen: Generator, s: Settings, ceiling: float, steps: int) -> float:
    """The broker alone, going up 1.5x a step until a step fails.

    On mosquitto from 3x mqchat's ceiling (at least 1,000 msg/s): to show the
    generator is not the wall. On amqtt from 2x mqchat's ceiling (at least 250 msg/s):
    amqtt's own relay ceiling, which bounds the embedded stack's.
    """
    mosquitto = gen.stack.kind == "production"
    start = max(1000.0, 3 * ceiling) if mosquitto else max(250.0, 2 * ceiling)
    rates = [round(start * 1.5**n, -2) for n in range(steps)]
    return scenario_steps(run, gen, s, rates, "raw", "raw")


def scenario_flood(
    run: Run, gen: Generator, s: Settings, pairs: int, rate: float, flood_rate: float
) -> None:
    """One user floods far above the rate limit while ``2 * pairs`` users chat."""
    stack = gen.stack
    log(
        f"flood: {pairs * 2} users chat at {rate:,.0f} msg/s; one user floods at"
        f" {flood_rate:,.0f} msg/s; bridge limit {DEFAULT_MESSAGE_RATE!r}"
    )
    stack.start_bridges(s.bridges, DEFAULT_MESSAGE_RATE, fresh_session=True)
    try:
        for label, flood in (("without flood", None), ("with flood", flood_rate)):
            plan = StepPlan(f"flood: {label}", "chat", rate, s.step_seconds, s.drain, pairs, flood)
            result = gen.run(plan)
            run.record("flood", stack, s.bridges, result)
            gen.settle(s.bridges, DEFAULT_MESSAGE_RATE, result["passed"])
    finally:
        stack.start_bridges(s.bridges, UNLIMITED_MESSAGE_RATE, fresh_session=True)


@contextlib.contextmanager
def generated_load(kind: str, s: Settings, users: int) -> Iterator[Generator]:
    """A stack with ``users`` accounts, its bridges and a connected generator."""
    log(f"starting the {kind} stack")
    keep = os.environ.get("MQCHAT_BENCH_KEEP_LOGS")
    with running_stack(kind, Path(keep) if keep else None) as stack:
        seconds = _run_async(stack.add_users(users))
        log(f"  {users} accounts created in {seconds:.1f} s")
        stack.start_bridges(s.bridges, UNLIMITED_MESSAGE_RATE)
        log(f"  {s.bridges} bridge process(es) consuming")
        gen = Generator(stack, min(s.workers, max(1, users // 2)))
        try:
            gen.start()
            warm_up(gen)
            yield gen
        finally:
            gen.stop()


def warm_up(gen: Generator, rate: float = 500) -> None:
    """One message each way in every pair, not recorded: every conversation exists after.

    A 1:1 conversation is created by its first message; a chat service under load has
    its conversations already, so their creation is kept out of the measured steps.
    """
    messages = 2 * len(gen.all_pairs)
    result = gen.run(StepPlan("warm-up", "chat", rate, messages / rate, 60))
    gen.quiesce()
    log(
        f"  warm-up: {result['received']:,}/{result['sent']:,} messages received"
        f" (p99 {result['e2e'].get('p99_ms', math.nan):.0f} ms), not recorded"
    )


def _run_async(coroutine: Any) -> Any:
    import asyncio

    return asyncio.run(coroutine)


# -- the suites ------------------------------------------------------------------------


@dataclass
class Suite:
    latency_seconds: float
    step_seconds: float
    drain: float
    production_rates: list[float]
    embedded_rates: list[float]
    embedded_users: int
    raw_steps: int
    flood_pairs: int
    flood_rate: float
    flood_chat_rate: float


SHORT = Suite(
    latency_seconds=10,
    step_seconds=6,
    drain=4,
    production_rates=[100, 250, 500, 1000, 2000, 3000, 4000, 6000],
    embedded_rates=[100, 250, 500, 1000, 1500, 2000],
    embedded_users=100,
    raw_steps=3,
    flood_pairs=50,
    flood_rate=500,
    flood_chat_rate=50,
)
FULL = Suite(
    latency_seconds=60,
    step_seconds=30,
    drain=10,
    production_rates=[100, 250, 500, 1000, 1500, 2000, 3000, 4000, 5000, 6000, 8000, 10000],
    embedded_rates=[100, 250, 500, 1000, 1500, 2000, 3000],
    embedded_users=1000,
    raw_steps=6,
    flood_pairs=100,
    flood_rate=1000,
    flood_chat_rate=200,
)


def run_suite(run: Run, suite: Suite, s: Settings) -> None:
    with generated_load("production", s, s.users) as gen:
        scenario_latency(run, gen, s, 1000, suite.latency_seconds)
        ceiling = scenario_steps(run, gen, s, suite.production_rates, "throughput", "chat")
        scenario_raw(run, gen, s, ceiling, suite.raw_steps)
        scenario_flood(run, gen, s, suite.flood_pairs, suite.flood_chat_rate, suite.flood_rate)
    with generated_load("embedded", s, suite.embedded_users) as gen:
        ceiling = scenario_steps(run, gen, s, suite.embedded_rates, "embedded", "chat")
        scenario_raw(run, gen, s, ceiling, suite.raw_steps)


# -- the CLI ---------------------------------------------------------------------------

app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])

Users = Annotated[int, typer.Option(help="connected users (accounts), in pairs")]
Workers = Annotated[int, typer.Option(help="generator processes")]
Bridges = Annotated[int, typer.Option(help="bridge processes (MQCHAT_BRIDGE_PARTITIONS)")]
WriteDocs = Annotated[bool, typer.Option(help="render docs/benchmarks.md and the plot")]
ResultsPath = Annotated[Path, typer.Option(help="JSON lines are appended here")]
StackKind = Annotated[str, typer.Option(help="production (mosquitto) or embedded (amqtt)")]


@dataclass
class LoadOptions:
    """The options every load command takes (``grouped`` gives them to each)."""

    users: Users = 1000
    workers: Workers = 2
    results: ResultsPath = RESULTS

    def settings(self, bridges: int, step_seconds: float, drain: float = 10) -> Settings:
        return Settings(self.users, self.workers, bridges, step_seconds, drain)


def _finish(run: Run, write_docs: bool) -> None:
    from bench._report import render_markdown, write_docs_section, write_plot, write_timeline

    summary = render_markdown(run.records)
    log("\n" + summary)
    if write_docs:
        write_plot(run.records, PLOT)
        latency = [r for r in run.records if r["scenario"] == "latency" and "disk_stalls" in r]
        if latency:
            write_timeline(latency[0], TIMELINE_PLOT)
        write_docs_section(DOCS, summary, DOCS_BEGIN, DOCS_END)
        log(f"wrote {PLOT.relative_to(ROOT)} and the Chat load section of docs/benchmarks.md")


def _start(results: Path) -> Run:
    command = shlex.join(["python", "-m", "bench.load", *sys.argv[1:]])
    if os.environ.get("MQCHAT_BENCH_BRIDGE_TREE"):
        tree = os.environ["MQCHAT_BENCH_BRIDGE_TREE"]
        command = f"MQCHAT_BENCH_BRIDGE_TREE={tree} {command}  # bridge at {git_commit(tree)}"
    run = Run(command, results)
    log(
        f"machine: {run.machine['cores']} cores, {run.machine['cpu']}, {run.machine['ram_gib']}"
        f" GiB RAM; commit {run.commit}; load average {run.load_at_start}"
    )
    return run


def _suite_command(name: str, suite: Suite, summary: str) -> None:
    """``python -m bench.load <name>``: every scenario, with ``suite``'s steps."""

    @grouped(LoadOptions, "options")
    def command(
        bridges: Bridges = 1, write_docs: WriteDocs = False, *, options: LoadOptions
    ) -> None:
        run = _start(options.results)
        started = time.monotonic()
        run_suite(run, suite, options.settings(bridges, suite.step_seconds, suite.drain))
        log(f"{name} suite done in {time.monotonic() - started:.0f} s")
        _finish(run, write_docs)

    app.command(name, help=summary)(command)


_suite_command("short", SHORT, "Every scenario, small steps: under 5 minutes.")
_suite_command("full", FULL, "Every scenario, 30-second steps, 1,000 users on both stacks.")


@app.command()
@grouped(LoadOptions, "options")
def latency(
    rate: float = 1000, seconds: float = 30, bridges: Bridges = 1, *, options: LoadOptions
) -> None:
    """(1) latency at a fixed rate on mosquitto+PostgreSQL."""
    with _one_run(options, "production", bridges, seconds) as (run, gen, s):
        scenario_latency(run, gen, s, rate, seconds)


@contextlib.contextmanager
def _one_run(
    options: LoadOptions, stack: str, bridges: int, step_seconds: float
) -> Iterator[tuple[Run, Generator, Settings]]:
    """A command's run on a fresh ``stack`` with ``options.users`` connected; its table
    after."""
    if stack not in ("production", "embedded"):
        raise typer.BadParameter("production (mosquitto) or embedded (amqtt)", param_hint="--stack")
    s = options.settings(bridges, step_seconds)
    run = _start(options.results)
    with generated_load(stack, s, s.users) as gen:
        yield run, gen, s
    _finish(run, False)


def _rates(text: str) -> list[float]:
    return [float(r) for r in text.split(",") if r.strip()]


def _steps_command(name: str, stack: str, default_rates: str, summary: str) -> None:
    """``python -m bench.load <name>``: chat steps on ``stack`` up to the first failed
    rate, then ``--raw-steps`` of the raw broker."""

    @grouped(LoadOptions, "options")
    def command(
        rates: str = default_rates,
        seconds: float = 15,
        raw_steps: int = 4,
        bridges: Bridges = 1,
        *,
        options: LoadOptions,
    ) -> None:
        with _one_run(options, stack, bridges, seconds) as (run, gen, s):
            ceiling = scenario_steps(run, gen, s, _rates(rates), name, "chat")
            if raw_steps:
                scenario_raw(run, gen, s, ceiling, raw_steps)

    app.command(name, help=summary)(command)


_steps_command(
    "throughput",
    "production",
    "100,250,500,1000,2000,3000,4000,5000,6000,8000",
    "(2) sustainable durable throughput on mosquitto+PostgreSQL, then the raw broker.",
)


@app.command("metrics-cost")
@grouped(LoadOptions, "options")
def metrics_cost(
    baseline: Annotated[
        Path, typer.Option(help="a checkout of the bridge without metrics, with its own .venv")
    ],
    rate: float = 1000,
    seconds: float = 10,
    rounds: int = 2,
    *,
    options: LoadOptions,
) -> None:
    """What the bridge's metrics cost: the same fixed rate, alternating a bridge without
    metrics (``--baseline``) and this one with /metrics scraped every second."""
    with _one_run(options, "production", 1, seconds) as (run, gen, s):
        for round_ in range(rounds):
            for variant in ("without", "with"):
                scenario_metrics_cost(run, gen, s, rate, seconds, variant, baseline, round_)
    _metrics_cost_summary(run.records)


def scenario_metrics_cost(
    run: Run,
    gen: Generator,
    s: Settings,
    rate: float,
    seconds: float,
    variant: str,
    baseline: Path,
    round_: int,
) -> None:
    import threading

    import httpx

    from tests.support.services import LOOPBACK, free_port

    addr = f"{LOOPBACK}:{free_port()}" if variant == "with" else None
    tree = None if variant == "with" else baseline.resolve()
    gen.stack.start_bridges(1, UNLIMITED_MESSAGE_RATE, tree=tree, metrics_addr=addr)
    stop = threading.Event()
    scrapes = 0

    def scrape_every_second() -> None:
        nonlocal scrapes
        while not stop.wait(1.0):
            httpx.get(f"http://{addr}/metrics", timeout=5).raise_for_status()
            scrapes += 1

    scraper = threading.Thread(target=scrape_every_second, daemon=True)
    if addr is not None:
        scraper.start()
    label = f"metrics {variant} {rate:,.0f}/s r{round_ + 1}"
    log(f"metrics cost: {label}")
    try:
        result = gen.run(StepPlan(label, "chat", rate, seconds, s.drain))
    finally:
        stop.set()
        if addr is not None:
            scraper.join(10)
    result["metrics_scrapes"] = scrapes
    run.record(f"metrics-cost-{variant}", gen.stack, 1, result)
    gen.settle(1, UNLIMITED_MESSAGE_RATE, result["passed"])


def _metrics_cost_summary(records: list[dict[str, Any]]) -> None:
    """Bridge CPU per delivered message, with and without, and the cost in percent."""
    per_message: dict[str, list[float]] = {"with": [], "without": []}
    for record in records:
        variant = record["scenario"].removeprefix("metrics-cost-")
        if variant in per_message and record["delivered_per_s"]:
            per_message[variant].append(
                record["cpu_cores"]["bridge"] / record["delivered_per_s"] * 1e6
            )
    if not all(per_message.values()):
        return
    without = statistics.median(per_message["without"])
    with_ = statistics.median(per_message["with"])
    log(
        f"bridge CPU per message, median: without metrics {without:.0f} µs, with {with_:.0f} µs"
        f" ({100 * (with_ - without) / without:+.1f}%); runs"
        f" {[round(v) for v in per_message['without']]} / {[round(v) for v in per_message['with']]}"
    )
    _plot_metrics_cost(per_message, records[0].get("commit", "?"), METRICS_COST_PLOT)


def _plot_metrics_cost(per_message: dict[str, list[float]], commit: str, path: Path) -> None:
    from bench._report import _figure, _save

    fig, ax = _figure((6, 3.5))
    rounds = range(1, len(per_message["without"]) + 1)
    width = 0.38
    for offset, variant, color in ((-width / 2, "without", "C7"), (width / 2, "with", "C0")):
        ax.bar([r + offset for r in rounds], per_message[variant], width, color=color,
               label=f"{variant} metrics")  # fmt: skip
    ax.set_xticks(list(rounds), [f"round {r}" for r in rounds])
    ax.set_ylabel("bridge CPU per message (µs)")
    ax.set_title(f"what the bridge's metrics cost at a fixed rate, commit {commit}", fontsize=9)
    _save(fig, ax, path)


@app.command()
@grouped(LoadOptions, "options")
def raw(
    rates: str = "2000,4000,6000,8000,12000",
    seconds: float = 10,
    stack: StackKind = "production",
    *,
    options: LoadOptions,
) -> None:
    """The raw broker alone (no bridge): how fast it relays this traffic."""
    with _one_run(options, stack, 1, seconds) as (run, gen, s):
        scenario_steps(run, gen, s, _rates(rates), "raw", "raw")


_steps_command(
    "embedded",
    "embedded",
    "100,250,500,1000,1500,2000,3000",
    "(3) sustainable throughput on the embedded stack (amqtt + SQLite), then raw amqtt.",
)


@app.command()
@grouped(LoadOptions, "options")
def flood(
    chatting: int = 100,
    rate: float = 100,
    flood_rate: float = 500,
    seconds: float = 15,
    stack: StackKind = "production",
    bridges: Bridges = 1,
    *,
    options: LoadOptions,
) -> None:
    """One user floods far above the bridge's rate limit while others chat."""
    with _one_run(options, stack, bridges, seconds) as (run, gen, s):
        scenario_flood(run, gen, s, chatting // 2, rate, flood_rate)


@app.command()
def report(
    run_started: Annotated[str, typer.Argument(help="the run's start time (its 'run' field)")],
    results: ResultsPath = RESULTS,
) -> None:
    """Render the table and the plot of an earlier run from its JSON lines into docs/."""
    records = [
        record
        for record in (json.loads(line) for line in results.read_text().splitlines() if line)
        if record["run"] == run_started
    ]
    if not records:
        raise typer.BadParameter(f"no run {run_started!r} in {results}")
    run = Run(records[0]["command"], results, records=records)
    _finish(run, True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
