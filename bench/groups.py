"""Groups under load: time to the last member, 1:1 beside it, and what fan-out costs.

    python -m bench.groups all              # every scenario below, one stack: ~8 minutes
    python -m bench.groups all --seconds 3 --sizes 4,8 --pairs 10 --pair-rate 50  # smoke

Scenarios, each on one fresh stack (``--stack production``: mosquitto + PostgreSQL,
durable; ``embedded``: amqtt + SQLite), every member a real authenticated connection:

* ``a``/``b`` (latency): a 256-member group at 20 msg/s and a 1,024-member group at
  5 msg/s. Per message, the latency to the *last* member's device (the max over members
  of receive time minus intended send time, open loop as in ``bench.load``); for every
  member nothing lost, duplicated or out of ``seq`` order;
* ``c`` (mixed): 1:1 chat at ``--pair-rate`` over pairs of other users, alone and then
  beside the 256-member group's load, in the same run; the ratio of the two 1:1 p99s;
* ``d`` (cost): the bridge's CPU seconds per group message by group size (read from
  /proc for the bridge process, its idle use subtracted), against the broker's own
  relay cost per delivery in the same run;
* ``e`` (fan-out): the broker alone at each size, the bridge's way (the sender publishes
  to every member's ``down/msg``) against one publish to a group topic every member's
  session subscribes to: time to the last receiver and broker CPU per delivery.

Results go to ``bench/results/load.jsonl`` (one line per step, scenario ``group-*``,
with the load average at the step's start: the machine is shared, so compare ratios
within one run), and with ``--write-docs`` into the "Groups" section of
``docs/benchmarks.md`` with a plot. Bounded: a fixed number of messages per step and a
drain timeout.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Annotated, Any

import typer

from bench._gen import SLOTS, join_or_kill, new_histogram, percentiles, spawn
from bench._group_gen import GroupWorker
from bench._report import _ms, run_table
from bench._stack import PASSWORD, CpuMeter, Stack, log, running_stack
from bench.load import (
    RESULTS,
    UNLIMITED_MESSAGE_RATE,
    Generator,
    Run,
    StepPlan,
    load_average,
    merged,
    warm_up,
)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "img" / "groups-fanout.png"
DOCS_BEGIN = "<!-- groups:results:begin (written by python -m bench.groups --write-docs) -->"
DOCS_END = "<!-- groups:results:end -->"
#: The 1:1 p99 beside group load may be at most this times the 1:1 p99 alone.
MIXED_RATIO_TARGET = 1.5
#: Seconds of an idle bridge measured before the cost steps, subtracted from them.
IDLE_SECONDS = 3.0


@dataclass
class GroupGenerator:
    """The group generator processes (``bench._group_gen``) and the members each holds."""

    stack: Stack
    users: list[str]
    workers: int
    processes: list[Any] = field(default_factory=list)
    pipes: list[Connection] = field(default_factory=list)
    steps_run: int = 0

    def __post_init__(self) -> None:
        self.users_of = [self.users[w :: self.workers] for w in range(self.workers)]
        self.owner = {u: w for w, users in enumerate(self.users_of) for u in users}

    def start(self) -> None:
        host, port = self.stack.host, self.stack.port
        for index in range(self.workers):
            # A group step reports only at its end: a private list stands in for the
            # progress slots the 1:1 generators share with the main process.
            progress = [0] * len(SLOTS) * (index + 1)
            users = self.users_of[index]
            worker = partial(GroupWorker, index, host, port, users, PASSWORD, progress)
            process, pipe = spawn(f"bench-group-gen-{index}", worker)
            self.processes.append(process)
            self.pipes.append(pipe)
        started = time.perf_counter()
        connected = sum(a["connected"] for a in self._all({"op": "connect"}, 600))
        log(
            f"  {connected} group members connected from {self.workers} processes"
            f" in {time.perf_counter() - started:.1f} s"
        )

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._all({"op": "stop"}, 30)
        join_or_kill(self.processes)

    def _ask(self, index: int, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.pipes[index].send(command)
        return self._answer(index, timeout)

    def _answer(self, index: int, timeout: float) -> dict[str, Any]:
        if not self.pipes[index].poll(timeout):
            raise RuntimeError(f"group generator {index} did not answer within {timeout} s")
        answer: dict[str, Any] = self.pipes[index].recv()
        if not answer.get("ok"):
            raise RuntimeError(f"group generator {index}: {answer.get('error')}")
        return answer

    def _all(self, command: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
        for pipe in self.pipes:
            pipe.send(command)
        return [self._answer(i, timeout) for i in range(len(self.pipes))]

    def create_group(self, creator: str, members: list[str], name: str) -> str:
        """Create a group of ``creator`` and ``members``; its conversation id."""
        payload = {"id": f"create-{name}", "op": "create", "name": name, "members": members}
        answer = self._ask(
            self.owner[creator], {"op": "group_op", "user": creator, "payload": payload}, 90
        )["answer"]
        if answer["kind"] != "receipt":
            raise RuntimeError(f"creating group {name}: {answer}")
        return str(answer["conversation"])

    def subscribe_group(self, members: list[str], name: str) -> None:
        self._all({"op": "subscribe_group", "members": members, "name": name}, 120)

    def quiesce(self, quiet: float = 1.0, limit: float = 30) -> None:
        self._all({"op": "quiesce", "quiet": quiet, "limit": limit}, limit + 30)

    def begin(self, spec: dict[str, Any]) -> None:
        """Start a step on every process (members and the sender); ``finish`` collects."""
        self.steps_run += 1
        spec = {"tag": f"g{self.steps_run}", "start_at": time.time() + 0.5, **spec}
        self.spec = spec
        for pipe in self.pipes:
            pipe.send({"op": "group_step", "spec": spec})

    def finish(self) -> dict[str, Any]:
        spec = self.spec
        timeout = spec["duration"] + spec["drain"] + 60
        answers = [self._answer(i, timeout) for i in range(len(self.pipes))]
        return merge_group(spec, answers)

    def run(self, spec: dict[str, Any]) -> dict[str, Any]:
        self.begin(spec)
        return self.finish()


def merge_group(spec: dict[str, Any], answers: list[dict[str, Any]]) -> dict[str, Any]:
    """One step's answers into its record: per message, the last member's latency."""
    n = len(spec["members"])
    total = int(spec["rate"] * spec["duration"])
    counts = [sum(a["count"][k] for a in answers) for k in range(total)]
    worst = [max(a["worst_us"][k] for a in answers) for k in range(total)]
    last_member = new_histogram()
    for k in range(total):
        if counts[k] == n:
            last_member.record_value(max(1, worst[k]))
    sent = sum(a["sent"] for a in answers)
    lost_deliveries = sent * n - sum(counts)
    duplicates = sum(a["duplicates"] for a in answers)
    out_of_order = sum(a["out_of_order"] for a in answers)
    errors: dict[str, int] = {}
    for answer in answers:
        for code, count in answer["errors"].items():
            errors[code] = errors.get(code, 0) + count
    e2e = percentiles(last_member)
    return {
        "label": spec["label"],
        "mode": spec["mode"],
        "members": n,
        "offered_rate": spec["rate"],
        "duration_s": spec["duration"],
        "sent": sent,
        "received": sent - sum(1 for k in range(sent) if counts[k] < n),
        # A message is lost when any member misses it; ``lost_deliveries`` counts copies.
        "lost": sum(1 for k in range(sent) if counts[k] < n),
        "lost_deliveries": lost_deliveries,
        "duplicates": duplicates,
        "out_of_order": out_of_order,
        "errors": errors,
        "e2e": e2e,
        "per_delivery": percentiles(merged([a["deliveries"] for a in answers])),
        "max_send_lag_ms": max(a["max_send_lag_ms"] for a in answers),
        "wall_seconds": round(max(a["wall_seconds"] for a in answers), 2),
        "generator_cpu_s": [round(a["cpu_seconds"], 2) for a in answers],
        "passed": sent == total and lost_deliveries == 0 and duplicates == 0 and out_of_order == 0,
    }


# -- the run ---------------------------------------------------------------------------


@dataclass
class Plan:
    sizes: list[int]
    seconds: float
    drain: float
    latency: list[tuple[int, float]]  # (members, msg/s) of scenarios a and b
    mixed_size: int
    pairs: int
    pair_rate: float
    cost_deliveries: float  # member deliveries/s of the cost and fan-out steps
    cost_rate_cap: float
    fanout_sizes: list[int]
    workers: int
    scenarios: str


@dataclass
class Bench:
    run: Run
    stack: Stack
    plan: Plan
    groups: GroupGenerator
    pairs: Generator | None
    conversations: dict[int, str] = field(default_factory=dict)

    def members(self, size: int) -> list[str]:
        return self.groups.users[:size]

    def metered(self, result_of: Any) -> tuple[dict[str, Any], dict[str, float], float]:
        """Run ``result_of()`` under a CPU meter; (its result, CPU seconds by part, wall)."""
        pids = self.stack.pids()
        pids["generator"] = [p.pid for p in self.groups.processes if p.pid is not None]
        if self.pairs is not None:
            pids["generator"] += [p.pid for p in self.pairs.processes if p.pid is not None]
        load = load_average()
        meter = CpuMeter(pids)
        started = time.monotonic()
        result: dict[str, Any] = result_of()
        wall = time.monotonic() - started
        cpu = meter.used()
        result["load_at_start"] = load
        result["steal_pct"] = round(100 * meter.steal_share(), 1)
        result["cpu_seconds"] = {part: round(s, 3) for part, s in cpu.items()}
        result["cpu_cores"] = {
            "generator_per_process": [],
            **{part: round(s / wall, 3) for part, s in cpu.items()},
        }
        return result, cpu, wall

    def spec(self, label: str, size: int, rate: float, mode: str = "chat") -> dict[str, Any]:
        """A step of the first ``size`` members, the first of them sending ``rate`` msg/s.

        ``chat`` goes to the group created for ``size`` (``group_bench`` creates one
        for every size a chat step uses); ``topic-raw`` to the group topic ``size``.
        """
        members = self.members(size)
        spec = {
            "label": label,
            "mode": mode,
            "members": members,
            "sender": members[0],
            "topic": str(size),
            "rate": rate,
            "duration": self.plan.seconds,
            "drain": self.plan.drain,
        }
        if mode == "chat":
            spec["conversation"] = self.conversations[size]
        return spec

    def group_step(
        self, scenario: str, label: str, size: int, rate: float, mode: str = "chat"
    ) -> dict[str, Any]:
        spec = self.spec(label, size, rate, mode)
        result, _, _ = self.metered(lambda: self.groups.run(spec))
        self.record(scenario, result)
        self.groups.quiesce()
        return result

    def record(self, scenario: str, result: dict[str, Any]) -> None:
        self.run.record(scenario, self.stack, 1, result)
        if "out_of_order" in result:
            log(
                f"     members {result['members']}: lost deliveries {result['lost_deliveries']}"
                f"  out of order {result['out_of_order']}  per-delivery p99"
                f" {result['per_delivery'].get('p99_ms', math.nan):.1f} ms"
                f"  load {result['load_at_start']}"
            )

    # -- scenarios ----------------------------------------------------------------------

    def scenario_latency(self) -> None:
        for size, rate in self.plan.latency:
            log(f"(a/b) a {size}-member group at {rate:g} msg/s, {self.plan.seconds:g} s")
            self.group_step("group-latency", f"group {size} at {rate:g}/s", size, rate)

    def scenario_mixed(self) -> None:
        pairs = self.pairs
        if pairs is None:
            return
        size = self.plan.mixed_size
        rate = dict(self.plan.latency).get(size, 20.0)
        seconds = self.plan.seconds
        log(
            f"(c) 1:1 at {self.plan.pair_rate:g} msg/s over {len(pairs.all_pairs)} pairs,"
            f" alone, then beside a {size}-member group at {rate:g} msg/s"
        )
        plan = StepPlan("1:1 alone", "chat", self.plan.pair_rate, seconds, self.plan.drain)
        alone = pairs.run(plan)
        self.run.record("group-mixed", self.stack, 1, alone)
        pairs.quiesce()
        self.groups.begin(self.spec(f"group {size} at {rate:g}/s beside 1:1", size, rate))
        beside = pairs.run(StepPlan("1:1 beside the group", "chat", plan.rate, seconds, plan.drain))
        group = self.groups.finish()
        group["load_at_start"] = beside["load_at_start"]
        alone_p99 = float(alone["e2e"].get("p99_ms", math.nan))
        beside_p99 = float(beside["e2e"].get("p99_ms", math.nan))
        ratio = beside_p99 / alone_p99 if alone_p99 else math.nan
        beside["p99_ratio_to_alone"] = round(ratio, 2)
        beside["p99_ratio_target"] = MIXED_RATIO_TARGET
        self.run.record("group-mixed", self.stack, 1, beside)
        group["cpu_cores"] = beside["cpu_cores"]  # one meter over both loads
        self.record("group-mixed", group)
        verdict = "within" if ratio <= MIXED_RATIO_TARGET else "NOT within"
        log(
            f"  => 1:1 p99 {alone_p99:.1f} ms alone, {beside_p99:.1f} ms beside the group:"
            f" {ratio:.2f}x ({verdict} {MIXED_RATIO_TARGET}x)"
        )
        pairs.quiesce()
        self.groups.quiesce()

    def rate_for(self, size: int) -> float:
        return min(self.plan.cost_rate_cap, self.plan.cost_deliveries / size)

    def scenario_cost(self) -> None:
        _idle, cpu, wall = self.metered(lambda: (time.sleep(IDLE_SECONDS), {})[1])
        idle_bridge = cpu.get("bridge", 0.0) / wall
        log(f"(d) bridge CPU per group message by size; idle bridge {idle_bridge:.3f} cores")
        for size in self.plan.sizes:
            rate = self.rate_for(size)
            spec = self.spec(f"cost: group {size} at {rate:g}/s", size, rate)
            result, cpu, wall = self.metered(lambda spec=spec: self.groups.run(spec))
            sent = max(1, result["sent"])
            bridge = max(0.0, cpu.get("bridge", 0.0) - idle_bridge * wall)
            result["idle_bridge_cores"] = round(idle_bridge, 4)
            result["bridge_cpu_ms_per_message"] = round(1000 * bridge / sent, 3)
            result["bridge_cpu_us_per_delivery"] = round(1e6 * bridge / (sent * size), 2)
            result["broker_cpu_us_per_delivery"] = round(
                1e6 * cpu.get("broker", 0.0) / (sent * size), 2
            )
            result["database_cpu_ms_per_message"] = round(1000 * cpu.get("database", 0.0) / sent, 3)
            self.record("group-cost", result)
            log(
                f"     bridge {result['bridge_cpu_ms_per_message']:.2f} ms CPU per message"
                f" ({result['bridge_cpu_us_per_delivery']:.1f} us per member delivery);"
                f" broker {result['broker_cpu_us_per_delivery']:.1f} us per delivery"
            )
            self.groups.quiesce()

    def scenario_fanout(self) -> None:
        log("(e) fan-out at the broker alone: per-member publishes vs one group topic")
        for size in self.plan.fanout_sizes:
            members = self.members(size)
            if self.stack.mosquitto is not None:
                self.groups.subscribe_group(members, str(size))
            rate = self.rate_for(size)
            # amqtt's subscription index only routes chat/v1 topics, so the group topic
            # is measured on mosquitto alone.
            modes = ("member-raw", "topic-raw") if self.stack.mosquitto else ("member-raw",)
            for mode in modes:
                spec = self.spec(f"fan-out {mode}: {size} at {rate:g}/s", size, rate, mode)
                result, cpu, _wall = self.metered(lambda spec=spec: self.groups.run(spec))
                deliveries = max(1, result["sent"] * size)
                broker = cpu.get("broker", 0.0)
                result["broker_cpu_us_per_delivery"] = round(1e6 * broker / deliveries, 2)
                # The broker's relay ceiling at one core, from its cost per delivery.
                result["broker_deliveries_per_core_s"] = round(deliveries / broker) if broker else 0
                result["publisher_cpu_s"] = result["generator_cpu_s"][self.groups.owner[members[0]]]
                self.record("group-fanout", result)
                log(
                    f"     broker {result['broker_cpu_us_per_delivery']:.1f} us CPU per delivery"
                    f" ({result['broker_deliveries_per_core_s']:,} deliveries per core-second);"
                    f" publisher {result['publisher_cpu_s']:.2f} s CPU"
                )
                self.groups.quiesce()


@contextlib.contextmanager
def group_bench(run: Run, kind: str, plan: Plan) -> Iterator[Bench]:
    """A stack with the group members and the 1:1 users connected, the groups created."""
    mixed = [plan.mixed_size] if "c" in plan.scenarios else []
    largest = max([*plan.sizes, *plan.fanout_sizes, *(s for s, _ in plan.latency), *mixed])
    log(f"starting the {kind} stack")
    keep = os.environ.get("MQCHAT_BENCH_KEEP_LOGS")
    with running_stack(kind, Path(keep) if keep else None) as stack:
        users = largest + 2 * plan.pairs
        seconds = _run_async(stack.add_users(users))
        log(f"  {users} accounts created in {seconds:.1f} s")
        stack.start_bridges(1, UNLIMITED_MESSAGE_RATE)
        groups = GroupGenerator(stack, stack.users[:largest], plan.workers)
        pairs = Generator(stack, plan.workers, users=stack.users[largest:]) if plan.pairs else None
        try:
            groups.start()
            if pairs is not None:
                pairs.start()
                warm_up(pairs)
            bench = Bench(run, stack, plan, groups, pairs)
            chat_sizes = {*plan.sizes, *(s for s, _ in plan.latency)}
            if "c" in plan.scenarios:
                chat_sizes.add(plan.mixed_size)
            for size in sorted(chat_sizes):
                members = bench.members(size)
                started = time.perf_counter()
                conversation = groups.create_group(members[0], members[1:], f"g{size}")
                bench.conversations[size] = conversation
                groups.quiesce()
                log(f"  group of {size} created in {time.perf_counter() - started:.1f} s")
            yield bench
        finally:
            if pairs is not None:
                pairs.stop()
            groups.stop()


def _run_async(coroutine: Any) -> Any:
    import asyncio

    return asyncio.run(coroutine)


def run_plan(run: Run, kind: str, plan: Plan) -> None:
    with group_bench(run, kind, plan) as bench:
        if "a" in plan.scenarios or "b" in plan.scenarios:
            bench.scenario_latency()
        if "c" in plan.scenarios:
            bench.scenario_mixed()
        if "d" in plan.scenarios:
            bench.scenario_cost()
        if "e" in plan.scenarios:
            bench.scenario_fanout()


# -- reporting -------------------------------------------------------------------------


def _row(r: dict[str, Any]) -> str:
    """A group step, or a 1:1 step of the mixed scenario (``users_chatting``, no order)."""
    e2e = r["e2e"]
    return (
        f"| {r['scenario']} | {r['label']} | {r.get('members', r.get('users_chatting', '-'))}"
        f" | {r['offered_rate']:,.0f} | {r['sent']:,} | {r['lost']:,} | {r['duplicates']}"
        f" | {r.get('out_of_order', '-')} | {_ms(e2e, 'p50_ms')} | {_ms(e2e, 'p99_ms')}"
        f" | {_ms(e2e, 'max_ms')} | {r.get('bridge_cpu_ms_per_message', '-')}"
        f" | {r.get('broker_cpu_us_per_delivery', '-')} | {r['load_at_start'][0]:.2f}"
        f" | {'pass' if r['passed'] else '**fail**'} |"
    )


def render_markdown(records: list[dict[str, Any]]) -> str:
    if not records:
        return "(no results)"
    lines = run_table(
        records,
        "| scenario | step | members | msg/s | sent | lost | dup | out of order "
        "| p50 ms | p99 ms | max ms | bridge ms CPU/msg | broker µs CPU/delivery "
        "| load 1m | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        _row,
    )
    for r in records:
        if "p99_ratio_to_alone" in r:
            lines.append(
                f"- 1:1 p99 beside the group / alone: {r['p99_ratio_to_alone']:.2f}x"
                f" (target {r['p99_ratio_target']}x)"
            )
    return "\n".join(lines) + "\n"


def write_plot(records: list[dict[str, Any]], path: Path) -> None:
    from bench._report import _figure, _save

    fig, ax = _figure((8, 5))
    series = {
        "mqchat (the bridge publishes per member)": ("group-cost", "chat", "C0"),
        "broker alone, per-member publishes": ("group-fanout", "member-raw", "C1"),
        "broker alone, one group topic": ("group-fanout", "topic-raw", "C2"),
    }
    for name, (scenario, mode, color) in series.items():
        rows = sorted(
            (r for r in records if r["scenario"] == scenario and r["mode"] == mode),
            key=lambda r: r["members"],
        )
        rows = [r for r in rows if r["e2e"].get("count")]
        if rows:
            sizes = [r["members"] for r in rows]
            ax.plot(
                sizes, [r["e2e"]["p99_ms"] for r in rows], "o-", color=color, label=f"{name} p99"
            )
            ax.plot(
                sizes, [r["e2e"]["p50_ms"] for r in rows], "s--", color=color, label=f"{name} p50"
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("group members (all connected)")
    ax.set_ylabel("send to the last member's device (ms)")
    first = records[0] if records else {}
    ax.set_title(f"mqchat group fan-out, commit {first.get('commit', '?')}", fontsize=10)
    _save(fig, ax, path)


# -- the CLI ---------------------------------------------------------------------------

app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@app.command("all")
def all_scenarios(
    stack: Annotated[str, typer.Option(help="production (mosquitto) or embedded (amqtt)")] = (
        "production"
    ),
    scenarios: Annotated[str, typer.Option(help="which of a,b,c,d,e to run")] = "abcde",
    seconds: Annotated[float, typer.Option(help="seconds of sending per step")] = 20,
    drain: float = 10,
    latency: Annotated[str, typer.Option(help="a/b: members:rate,...")] = "256:20,1024:5",
    sizes: Annotated[str, typer.Option(help="d: group sizes")] = "16,64,256,1024",
    fanout_sizes: Annotated[str, typer.Option(help="e: group sizes")] = "64,256,1024",
    mixed_size: Annotated[int, typer.Option(help="c: the group beside 1:1")] = 256,
    pairs: Annotated[int, typer.Option(help="c: 1:1 pairs (0: no scenario c)")] = 100,
    pair_rate: Annotated[float, typer.Option(help="c: 1:1 msg/s")] = 500,
    deliveries: Annotated[float, typer.Option(help="d/e: member deliveries/s")] = 5120,
    rate_cap: Annotated[float, typer.Option(help="d/e: at most this many msg/s")] = 20,
    workers: Annotated[int, typer.Option(help="generator processes of each kind")] = 2,
    write_docs: Annotated[bool, typer.Option(help="render docs/benchmarks.md")] = False,
    results: Annotated[Path, typer.Option(help="JSON lines are appended here")] = RESULTS,
) -> None:
    """Every scenario (or those named) on one stack."""
    if stack not in ("production", "embedded"):
        raise typer.BadParameter("production (mosquitto) or embedded (amqtt)", param_hint="--stack")
    latency_steps = [(int(a), float(b)) for a, b in (x.split(":") for x in latency.split(","))]
    if "a" not in scenarios and "b" not in scenarios:
        latency_steps = []
    plan = Plan(
        sizes=_ints(sizes) if "d" in scenarios else [],
        seconds=seconds,
        drain=drain,
        latency=latency_steps,
        mixed_size=mixed_size,
        pairs=pairs if "c" in scenarios else 0,
        pair_rate=pair_rate,
        cost_deliveries=deliveries,
        cost_rate_cap=rate_cap,
        fanout_sizes=_ints(fanout_sizes) if "e" in scenarios else [],
        workers=workers,
        scenarios=scenarios,
    )
    run = Run(shlex.join(["python", "-m", "bench.groups", *sys.argv[1:]]), results)
    log(
        f"machine: {run.machine['cores']} cores, {run.machine['cpu']}; commit {run.commit};"
        f" load average {run.load_at_start}"
    )
    started = time.monotonic()
    run_plan(run, stack, plan)
    log(f"done in {time.monotonic() - started:.0f} s")
    _finish(run.records, write_docs)


def _finish(records: list[dict[str, Any]], write_docs: bool) -> None:
    summary = render_markdown(records)
    log("\n" + summary)
    if write_docs:
        from bench._report import write_docs_section

        write_plot(records, PLOT)
        write_docs_section(DOCS, summary, DOCS_BEGIN, DOCS_END)
        log(f"wrote {PLOT.relative_to(ROOT)} and the Groups section of docs/benchmarks.md")


@app.command()
def report(
    run_started: Annotated[str, typer.Argument(help="the run's start time (its 'run' field)")],
    results: Annotated[Path, typer.Option(help="the JSON lines of the run")] = RESULTS,
) -> None:
    """Render the table and the plot of an earlier run into docs/benchmarks.md."""
    records = [
        record
        for record in (json.loads(line) for line in results.read_text().splitlines() if line)
        if record["run"] == run_started and str(record["scenario"]).startswith("group-")
    ]
    if not records:
        raise typer.BadParameter(f"no group run {run_started!r} in {results}")
    _finish(records, True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
