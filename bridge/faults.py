"""A test-only fault hook: the bridge kills itself at a chosen point of its pipeline.

``MQCHAT_BRIDGE_CRASH_AT=after_commit:7`` ends the process with SIGKILL the 7th time
a batch reaches ``after_commit``, as a power cut at exactly that moment would. Unset
(the default, and the only sane value in production) it costs one comparison per
batch. The points, in the order a batch passes them:

* ``before_commit``: uplinks decoded, nothing written yet;
* ``after_commit``: the batch is committed, nothing published;
* ``after_publish``: the broker acknowledged every publish of the batch, the uplinks
  are not acknowledged yet.

The chaos tests (``tests/test_chaos.py``) use it to prove that a crash at each of
these moments loses, duplicates and reorders nothing.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Final, Literal

log = logging.getLogger(__name__)

CrashPoint = Literal["before_commit", "after_commit", "after_publish"]
CRASH_POINTS: Final = ("before_commit", "after_commit", "after_publish")
#: What ``MQCHAT_BRIDGE_CRASH_AT`` must look like: ``<point>:<n>``, n >= 1.
CRASH_AT_PATTERN: Final = rf"^({'|'.join(CRASH_POINTS)}):[1-9][0-9]*$"


class CrashHook:
    def __init__(self, crash_at: str | None) -> None:
        self.point: str | None = None
        self.at = 0
        if crash_at:
            point, _, count = crash_at.partition(":")
            self.point, self.at = point, int(count)
        self.reached = 0

    def reach(self, point: CrashPoint) -> None:
        if point != self.point:
            return
        self.reached += 1
        if self.reached >= self.at:
            log.warning("crash point %s reached %d times: SIGKILL", point, self.reached)
            os.kill(os.getpid(), signal.SIGKILL)
