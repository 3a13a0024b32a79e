"""core.throttle: moving windows per key, with a bound on the keys remembered.

Pure in-process counting, so these are plain unit tests: the windows are short and
the waits are the windows passing, not stand-ins for synchronisation.
"""

from __future__ import annotations

import threading
import time

import pytest

from core.throttle import Throttle


def test_a_full_window_refuses_and_counts_nothing() -> None:
    throttle = Throttle("3/minute")
    assert [throttle.hit("user", "alice") for _ in range(4)] == [True, True, True, False]
    assert not throttle.allowed("user", "alice")
    # Other keys have windows of their own.
    assert throttle.allowed("user", "bob")
    # The oldest of the three leaves the window in about a minute.
    assert 55 <= throttle.retry_after("user", "alice") <= 60
    assert throttle.retry_after("user", "bob") == 0


def test_every_window_must_have_room() -> None:
    throttle = Throttle("2/second;3/minute")
    assert throttle.hit("k")
    assert throttle.hit("k")
    assert not throttle.hit("k"), "the one-second window is full"
    time.sleep(1.05)
    assert throttle.hit("k"), "the second passed; the minute has room for a third"
    time.sleep(1.05)
    assert not throttle.hit("k"), "the minute is full although the second is not"
    assert throttle.retry_after("k") >= 55


def test_the_window_moves() -> None:
    throttle = Throttle("2/second")
    assert throttle.hit("k")
    assert throttle.hit("k")
    assert not throttle.hit("k")
    assert throttle.retry_after("k") == 1
    time.sleep(1.05)
    assert throttle.allowed("k")
    assert throttle.hit("k")


def test_keys_are_bounded_and_forgotten() -> None:
    """Attempted usernames and source addresses come from anyone: memory stays bounded."""
    throttle = Throttle("1/minute", keys=100)
    for n in range(10_000):
        throttle.hit("user", f"u{n}")
    assert len(throttle._events) <= 100
    short = Throttle("1/second")
    short.hit("k")
    time.sleep(1.05)
    assert short.allowed("k")
    short._events.expire()
    assert len(short._events) == 0, "a key is forgotten once its longest window passed"


def test_counts_from_many_threads_exactly() -> None:
    throttle = Throttle("1000/minute")
    results: list[bool] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = [throttle.hit("shared") for _ in range(300)]
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1000
    assert results.count(False) == 200


def test_no_thread_is_started_per_event(monkeypatch: pytest.MonkeyPatch) -> None:
    """limits' memory storage started a timer thread per burst of events (see module)."""
    started: list[threading.Thread] = []
    start = threading.Thread.start

    def counted(thread: threading.Thread) -> None:
        started.append(thread)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", counted)
    throttle = Throttle("1000/second")
    for n in range(500):
        throttle.hit("source", str(n % 7))
    assert started == []
