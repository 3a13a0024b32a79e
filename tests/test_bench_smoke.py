"""The load benchmark still counts right: a tiny run on the embedded stack loses nothing.

``bench.load`` is not run in CI at full size; this keeps its machinery (stack start,
bulk accounts, generator processes, the open-loop schedule, the counting of received
messages and receipts, the merged histograms) from rotting silently.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import groups, nagle
from bench._report import write_timeline
from bench._stack import WARM_WAL_MB, start_production
from bench.load import Run, Settings, StepPlan, generated_load, stalls
from store import make_engine


@pytest.mark.xdist_group("cpu_heavy")
def test_a_small_open_loop_run_is_counted_exactly(tmp_path: Path) -> None:
    settings = Settings(users=20, workers=2, bridges=1, step_seconds=2, drain=20)
    with generated_load("embedded", settings, settings.users) as gen:
        assert len(gen.stack.users) == 20
        result = gen.run(StepPlan("smoke", "chat", 100, 2, settings.drain))
        # The raw baseline on amqtt: users publish straight to each other's down/msg,
        # which only the bench's entry point of the broker allows.
        raw = gen.run(StepPlan("smoke raw", "raw", 100, 1, settings.drain))

    assert raw["sent"] == raw["received"] == 100
    assert raw["lost"] == 0
    assert raw["errors"] == {}

    assert result["scheduled"] == 200
    assert result["sent"] == 200
    assert result["received"] == 200
    assert result["lost"] == 0
    assert result["duplicates"] == 0
    assert result["receipts_missing"] == 0
    assert result["e2e"]["count"] == 200
    assert result["sent_receipt"]["count"] == 200
    assert result["users_chatting"] == 20
    assert result["cpu_cores"]["bridge"] > 0
    assert 0 <= result["steal_pct"] <= 100  # the machine's, recorded with every step
    # The disk probe flushed beside the step (every 20 ms; the step and its drain last
    # over 2 s), and the timeline covers the schedule: 2 s in 100 ms windows.
    assert result["disk_flush"]["count"] >= 50
    assert 0 < result["disk_flush"]["p50_ms"] <= result["disk_flush"]["max_ms"]
    assert len(result["timeline"]["worst_ms"]) == 20
    # (the histogram keeps three significant digits)
    assert max(result["timeline"]["worst_ms"]) == pytest.approx(result["e2e"]["max_ms"], rel=1e-3)
    assert all(stall["ms"] > 25 for stall in result["disk_stalls"])
    result.update(label="smoke", stack="embedded", commit="test")
    write_timeline(result, tmp_path / "timeline.png")
    assert (tmp_path / "timeline.png").read_bytes().startswith(b"\x89PNG")


def test_stalls_are_the_runs_of_slow_windows_with_their_wall_clock_time() -> None:
    worst_ms = [10.0, 60.0, 70.0, 10.0, 10.0, 200.0, 10.0, 51.0]
    found = stalls(worst_ms, 0.1, start_wall=1_800_000_000.0)  # 2027-01-15T08:00:00Z
    assert found == [
        {"at_s": 0.1, "for_s": 0.2, "worst_ms": 70.0, "at": "2027-01-15T08:00:00.100+00:00"},
        {"at_s": 0.5, "for_s": 0.1, "worst_ms": 200.0, "at": "2027-01-15T08:00:00.500+00:00"},
        # one still going when the step ended
        {"at_s": 0.7, "for_s": 0.1, "worst_ms": 51.0, "at": "2027-01-15T08:00:00.700+00:00"},
    ]
    assert stalls([10.0, 50.0, 20.0], 0.1, start_wall=0.0) == []  # at the limit is no stall


def test_the_bench_postgres_starts_with_its_log_segments_ready(tmp_path: Path) -> None:
    """A fresh cluster would zero-fill each new WAL segment inside a measured commit."""
    stack = start_production(tmp_path)
    try:
        engine = make_engine(stack.database_url)
        with engine.connect() as conn:
            ahead = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_ls_waldir()"
                " WHERE name ~ '^[0-9A-F]{24}$'"
                " AND name > pg_walfile_name(pg_current_wal_lsn())"
            ).scalar_one()
        engine.dispose()
    finally:
        stack.close()
    # 256 MB of log is 16 segments; the one being written and the checkpoint's own
    # use up to two of them.
    assert ahead >= WARM_WAL_MB // 16 - 2
    # Its log stays with the stack's other logs (checkpoints are logged in the bench).
    assert "checkpoint complete" in (tmp_path / "postgres.log").read_text()


def test_the_nagle_bench_runs_both_clients_through_a_whole_stack(tmp_path: Path) -> None:
    """``bench.nagle`` sends every closed-loop message and reports both variants."""
    record = nagle.run("embedded", rounds=1, messages=5, timeout=10)

    for variant in nagle.VARIANTS:
        result = record["variants"][variant]
        assert result["count"] == 5
        assert result["lost"] == 0
        assert 0 < result["p50_ms"] <= result["p99_ms"]
    assert record["p50_ratio"] > 0
    assert "| embedded | stock paho (Nagle on) | 5 |" in nagle.render([record])
    nagle.plot([record], tmp_path / "nagle.png")
    assert (tmp_path / "nagle.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.xdist_group("cpu_heavy")
def test_the_group_bench_times_every_member_and_counts_exactly(tmp_path: Path) -> None:
    """``bench.groups`` at toy size: every scenario runs, every delivery is counted."""
    plan = groups.Plan(
        sizes=[4, 8],
        seconds=1,
        drain=20,
        latency=[(8, 10)],
        mixed_size=8,
        pairs=4,
        pair_rate=20,
        cost_deliveries=40,
        cost_rate_cap=10,
        fanout_sizes=[8],
        workers=2,
        scenarios="abcde",
    )
    run = Run("test", tmp_path / "load.jsonl")
    groups.run_plan(run, "embedded", plan)

    by_label = {r["label"]: r for r in run.records}
    latency = by_label["group 8 at 10/s"]
    assert latency["sent"] == 10
    assert latency["lost"] == latency["lost_deliveries"] == 0
    assert latency["duplicates"] == latency["out_of_order"] == 0
    # One "last member" latency per message, and each at least any member's own.
    assert latency["e2e"]["count"] == 10
    assert latency["per_delivery"]["count"] == 80
    assert latency["e2e"]["max_ms"] >= latency["per_delivery"]["p50_ms"]
    assert by_label["1:1 beside the group"]["p99_ratio_to_alone"] > 0
    assert by_label["group 8 at 10/s beside 1:1"]["passed"]
    cost = by_label["cost: group 4 at 10/s"]
    assert cost["passed"]
    assert cost["bridge_cpu_ms_per_message"] >= 0
    fanout = by_label["fan-out member-raw: 8 at 5/s"]
    assert fanout["passed"]
    assert fanout["lost_deliveries"] == 0
    assert all(r["passed"] for r in run.records if r["scenario"] != "group-mixed")
    assert len((tmp_path / "load.jsonl").read_text().splitlines()) == len(run.records)
    assert "| group-latency | group 8 at 10/s | 8 |" in groups.render_markdown(run.records)
    groups.write_plot(run.records, tmp_path / "groups.png")
    assert (tmp_path / "groups.png").read_bytes().startswith(b"\x89PNG")
