"""The load benchmark still counts right: a tiny run on the embedded stack loses nothing.

``bench.load`` is not run in CI at full size; this keeps its machinery (stack start,
bulk accounts, generator processes, the open-loop schedule, the counting of received
messages and receipts, the merged histograms) from rotting silently.
"""

from __future__ import annotations

from bench.load import Settings, StepPlan, generated_load


def test_a_small_open_loop_run_is_counted_exactly() -> None:
    settings = Settings(users=20, workers=2, bridges=1, step_seconds=2, drain=20)
    with generated_load("embedded", settings, settings.users) as gen:
        assert len(gen.stack.users) == 20
        result = gen.run(StepPlan("smoke", "chat", 100, 2, settings.drain))

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
