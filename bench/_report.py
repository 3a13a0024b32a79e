"""Turning the step records of one ``bench.load`` run into tables and a plot; and the
commit every benchmark's record names."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def git_commit(tree: Path | str = ROOT) -> str:
    """``abc1234``, ``abc1234+dirty`` with changes to tracked files, or ``unknown``."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=tree, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _ms(stats: dict[str, Any], key: str) -> str:
    value = stats.get(key)
    return "-" if value is None else f"{value:,.1f}"


def _cores(record: dict[str, Any]) -> str:
    cpu = record["cpu_cores"]
    generator = "+".join(f"{c:.2f}" for c in cpu["generator_per_process"])
    parts = [f"gen {generator}", f"broker {cpu.get('broker', 0):.2f}"]
    if record["mode"] == "chat":
        parts.append(f"bridge {cpu.get('bridge', 0):.2f}")
        if cpu.get("database"):
            parts.append(f"db {cpu['database']:.2f}")
    if "steal_pct" in record:  # older records have none
        parts.append(f"steal {record['steal_pct']:.0f}%")
    return ", ".join(parts)


def _row(record: dict[str, Any]) -> str:
    e2e = record["e2e"]
    receipt = record.get("sent_receipt", {})
    verdict = "pass" if record["passed"] else "**fail**"
    return (
        f"| {record['scenario']} | {record['stack']} | {record['mode']} "
        f"| {record['offered_rate']:,.0f} | {record['sent']:,} | {record['lost']:,} "
        f"| {record['duplicates']} | {_ms(e2e, 'p50_ms')} | {_ms(e2e, 'p99_ms')} "
        f"| {_ms(e2e, 'p999_ms')} | {_ms(e2e, 'max_ms')} | {_ms(receipt, 'p99_ms')} "
        f"| {record['max_send_lag_ms']:,.1f} | {_ms(record.get('disk_flush', {}), 'max_ms')} "
        f"| {_cores(record)} "
        f"| {record['load_at_start'][0]:.2f} | {verdict} |"
    )


def _of(records: list[dict[str, Any]], scenario: str, stack: str) -> list[dict[str, Any]]:
    return [r for r in records if r["scenario"] == scenario and r["stack"] == stack]


def run_table(
    records: list[dict[str, Any]], columns: str, align: str, row: Callable[[dict[str, Any]], str]
) -> list[str]:
    """The lines that open a run's report (``bench.load``'s, ``bench.groups``'): the
    machine, the commit and the command of the first record, then the markdown table
    of every record, ``row`` rendering one, and a blank line."""
    first = records[0]
    m = first["machine"]
    return [
        f"Run {first['run']}, commit `{first['commit']}`: {m['cores']} cores ({m['cpu']}),"
        f" {m['ram_gib']} GiB RAM, Python {m['python']}; load average at start"
        f" {first['load_at_run_start']}.",
        "",
        f"Command: `{first['command']}`",
        "",
        columns,
        align,
        *(row(r) for r in records),
        "",
    ]


def render_markdown(records: list[dict[str, Any]]) -> str:
    if not records:
        return "(no results)"
    lines = run_table(
        records,
        "| scenario | stack | mode | offered msg/s | sent | lost | dup | p50 ms | p99 ms "
        "| p99.9 ms | max ms | `sent` p99 ms | gen lag max ms | disk flush max ms "
        "| CPU cores used | load 1m | verdict |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
        _row,
    )

    def rates(scenario: str, stack: str, passed: bool | None = None) -> list[float]:
        """Offered rates of the steps of ``scenario`` on ``stack`` (that passed, or not)."""
        return [
            r["offered_rate"]
            for r in _of(records, scenario, stack)
            if passed is None or r["passed"] == passed
        ]

    def best(scenario: str, stack: str) -> float:
        return max(rates(scenario, stack, passed=True), default=0.0)

    def delivered(stack: str) -> float:
        per_second = [
            r.get("delivered_per_s", 0.0)
            for r in records
            if r["stack"] == stack and r["mode"] == "chat" and r["scenario"] != "flood"
        ]
        return max(per_second, default=0.0)

    durable = best("throughput", "production")
    embedded = best("embedded", "embedded")
    raw = best("raw", "production")
    raw_tried = rates("raw", "production")
    raw_amqtt = best("raw", "embedded")
    raw_amqtt_tried = rates("raw", "embedded")
    summary = []
    got_through = delivered("production")
    summary.append(
        "sustainable durable throughput (mosquitto + PostgreSQL, p99 < 100 ms, nothing"
        f" lost): {durable:,.0f} msg/s; most delivered per second in any step, whatever"
        f" the latency: {got_through:,.0f} msg/s"
    )
    if any(r["scenario"] == "embedded" for r in records):
        summary.append(
            f"embedded (amqtt + SQLite): {embedded:,.0f} msg/s sustainable;"
            f" most delivered per second: {delivered('embedded'):,.0f} msg/s"
        )
    if raw_tried:
        ceiling = durable or got_through
        ratio = f"{raw / ceiling:.1f}x mqchat's {ceiling:,.0f} msg/s" if ceiling else "mqchat: none"
        summary.append(
            f"raw mosquitto, same connections and payloads: passed up to {raw:,.0f} msg/s"
            f" ({ratio}; steps tried {', '.join(f'{r:,.0f}' for r in raw_tried)})"
        )
    if raw_amqtt_tried:
        # A chat message is four relays where a raw one is one; amqtt's ceiling lies
        # between its highest passing step and its first failing one.
        failed = rates("raw", "embedded", passed=False)
        bound = f"{raw_amqtt / 4:,.0f}" + (f"-{min(failed) / 4:,.0f}" if failed else "+")
        summary.append(
            f"raw amqtt, same connections and payloads: passed up to {raw_amqtt:,.0f} msg/s"
            f" (steps tried {', '.join(f'{r:,.0f}' for r in raw_amqtt_tried)}); at four relays"
            f" per chat message that bounds the embedded stack near {bound} msg/s"
            f" (measured: {embedded:,.0f})"
        )
    floods = [r for r in records if r["scenario"] == "flood"]
    if len(floods) == 2:
        quiet, loud = floods
        flood = loud.get("flood", {})
        summary.append(
            f"flood: the others' p99 {quiet['e2e'].get('p99_ms', 0):.1f} ms without,"
            f" {loud['e2e'].get('p99_ms', 0):.1f} ms with one user sending"
            f" {flood.get('offered_rate', 0):,.0f} msg/s ({flood.get('accepted', 0):,} of"
            f" {flood.get('sent', 0):,} accepted, errors {flood.get('errors', {})})"
        )
    saturated = [r["label"] for r in records if r.get("generator_saturated")]
    summary.append(
        f"generator saturated (a process at >= 90% of a core) in: {', '.join(saturated)}"
        if saturated
        else "no generator process reached 90% of a core in any step"
    )
    lines += [f"- {item}" for item in summary]
    return "\n".join(lines) + "\n"


def write_docs_section(path: Path, body: str, begin: str, end: str) -> None:
    """Replace the text between the markers (they must exist)."""
    text = path.read_text()
    head, found, rest = text.partition(begin)
    _, found_end, tail = rest.partition(end)
    if not found or not found_end:
        raise RuntimeError(f"{path} lacks the markers {begin!r} ... {end!r}")
    path.write_text(f"{head}{begin}\n\n{body}\n{end}{tail}")


def write_plot(records: list[dict[str, Any]], path: Path) -> None:
    series = {
        "mqchat, mosquitto + PostgreSQL": [
            r
            for r in records
            if r["stack"] == "production" and r["scenario"] in ("latency", "throughput")
        ],
        "mqchat, amqtt + SQLite": [r for r in records if r["scenario"] == "embedded"],
        "raw mosquitto (no bridge)": _of(records, "raw", "production"),
        "raw amqtt (no bridge)": _of(records, "raw", "embedded"),
    }
    fig, ax = _figure((8, 5))
    for (name, rows), color in zip(series.items(), ("C0", "C1", "C2", "C3"), strict=True):
        rows = sorted((r for r in rows if r["e2e"].get("count")), key=lambda r: r["offered_rate"])
        if not rows:
            continue
        rates = [r["offered_rate"] for r in rows]
        ax.plot(rates, [r["e2e"]["p99_ms"] for r in rows], "o-", color=color, label=f"{name} p99")
        ax.plot(rates, [r["e2e"]["p50_ms"] for r in rows], "s--", color=color, label=f"{name} p50")
    ax.axhline(100, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered rate (messages/s, open loop)")
    ax.set_ylabel("end-to-end latency from intended send (ms)")
    first = records[0] if records else {}
    ax.set_title(f"mqchat chat load, commit {first.get('commit', '?')}", fontsize=10)
    _save(fig, ax, path)


def write_timeline(record: dict[str, Any], path: Path) -> None:
    """One step over time: the worst latency per window, and the disk probe's slow flushes."""
    timeline = record["timeline"]
    window = timeline["window_s"]
    worst = timeline["worst_ms"]
    fig, ax = _figure((8, 4))
    ax.plot(
        [i * window for i in range(len(worst))],
        worst,
        color="C0",
        linewidth=1,
        label=f"worst e2e of the messages due in each {window * 1000:.0f} ms",
    )
    stalls = record.get("disk_stalls", [])
    if stalls:
        ax.scatter(
            [s["at_s"] for s in stalls],
            [s["ms"] for s in stalls],
            color="C3",
            marker="v",
            zorder=3,
            label="a flush of the disk probe that took over 25 ms (at its start)",
        )
    ax.axhline(100, color="grey", linewidth=0.8, linestyle=":")
    ax.axhline(20, color="grey", linewidth=0.8, linestyle="--")
    ax.set_yscale("log")
    ax.set_xlabel("seconds into the step (schedule time)")
    ax.set_ylabel("ms")
    ax.set_title(
        f"{record['label']} on {record['stack']}, commit {record['commit']}:"
        f" p99 {record['e2e'].get('p99_ms', 0):.1f} ms",
        fontsize=10,
    )
    _save(fig, ax, path)


def _figure(size: tuple[float, float]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size, dpi=110)


def _save(fig: Any, ax: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
