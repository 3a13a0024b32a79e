"""The group load generator: one process, a share of the members, every delivery timed.

A group step has one sender and n receivers (the members; the sender's own device is
one of them, as the bridge publishes to every member). Each receiving process keeps,
per message ``k``, how many of its members got it and the worst latency among them;
the main process merges those into "send to the last member's device" per message,
the figure a group is judged by. Latency runs from the intended send time
``t0 + k / rate`` (open loop, as in ``bench._gen``), carried in the message id
``{tag}.{k}.{intended_ns}``: ``time.monotonic_ns`` is one clock for every process of
the machine, so a receiver in another process needs no shared state to time it.

Modes of a step:

* ``chat``: the sender publishes ``up/msg`` with the group's ``conversation``; the
  bridge stores it and publishes it to each member's ``down/msg`` (what mqchat does);
* ``member-raw``: no bridge; the sender publishes a downlink-shaped payload to each
  member's ``down/msg`` itself, n publishes per message (the bridge's fan-out, minus
  the bridge);
* ``topic-raw``: no bridge; the sender publishes once to a group topic that every
  member's session subscribes to (the alternative fan-out, measured at the broker).

Per member the ``seq`` of each delivery must be one more than the last (raw modes
number their payloads the same way): anything else is counted as out of order.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from protocol import topics

from ._gen import (
    BODY,
    HIST_MAX_US,
    Command,
    Tally,
    Worker,
    new_histogram,
    raw_downlink,
    send_on_schedule,
)

#: The bench-only topics of the ``topic-raw`` fan-out (allowed on the bench's brokers).
GROUP_TOPICS = "bench/g/#"


def group_topic(name: str) -> str:
    """Ends in ``/msg`` as a downlink does: receivers tell kinds by the last level."""
    return f"bench/g/{name}/msg"


@dataclass
class GroupStep(Tally):
    """What one process saw of one group step."""

    members: list[str]
    index: dict[str, int] = field(default_factory=dict)
    got: bytearray = field(default_factory=bytearray)
    count: array[int] = field(default_factory=lambda: array("l"))
    worst_us: array[int] = field(default_factory=lambda: array("q"))
    last_seq: dict[str, int] = field(default_factory=dict)
    deliveries: HdrHistogram = field(default_factory=new_histogram)
    received: int = 0
    out_of_order: int = 0

    def __post_init__(self) -> None:
        self.index = {user: i for i, user in enumerate(self.members)}
        self.got = bytearray(len(self.members) * self.total)
        self.count = array("l", bytes(8 * self.total))
        self.worst_us = array("q", bytes(8 * self.total))

    @property
    def expected(self) -> int:
        return self.total * len(self.members)


class GroupWorker(Worker):
    """``bench._gen.Worker``'s connections, with group steps and group ops."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.group: GroupStep | None = None
        #: Ids of ``up/group`` ops in flight -> the future of their receipt.
        self.ops: dict[str, asyncio.Future[dict[str, Any]]] = {}

    def commands(self) -> dict[str, Command]:
        return super().commands() | {
            "group_op": self._group_op,
            "subscribe_group": self._subscribe_group,
            "group_step": self._group_step,
            "quiesce": self._quiesce_group,
        }

    async def _group_op(self, command: dict[str, Any]) -> dict[str, Any]:
        return {"answer": await self.group_op(command["user"], command["payload"], 60)}

    async def _subscribe_group(self, command: dict[str, Any]) -> dict[str, Any]:
        return {"subscribed": await self.subscribe_group(command["members"], command["name"])}

    async def _group_step(self, command: dict[str, Any]) -> dict[str, Any]:
        return await self.run_group_step(command["spec"])

    async def _quiesce_group(self, command: dict[str, Any]) -> dict[str, Any]:
        self.group = None
        return await self._quiesce(command)

    def _received(self, user: str, kind: str, payload: dict[str, Any], now: int) -> None:
        message_id = str(payload.get("id", ""))
        if kind == "msg":
            self._delivered(user, message_id, int(payload.get("seq", 0)), now)
        elif kind in ("receipt", "error") and message_id in self.ops:
            future = self.ops.pop(message_id)
            if not future.done():
                future.set_result({"kind": kind, **payload})
        elif kind == "error" and self.group is not None:
            self.group.count_error(str(payload.get("code")))

    def _delivered(self, user: str, message_id: str, seq: int, now: int) -> None:
        step = self.group
        if step is None:
            return
        tag, _, rest = message_id.partition(".")
        member = step.index.get(user)
        if tag != step.tag or member is None:
            step.stale += 1
            return
        number, _, intended = rest.partition(".")
        k = int(number)
        if not 0 <= k < step.total:
            return
        slot = member * step.total + k
        if step.got[slot]:
            step.duplicates += 1
            return
        step.got[slot] = 1
        last = step.last_seq.get(user)
        if last is not None and seq != last + 1:
            step.out_of_order += 1
        step.last_seq[user] = max(seq, last or 0)
        latency_us = min(HIST_MAX_US, max(1, (now - int(intended)) // 1000))
        step.deliveries.record_value(latency_us)
        step.count[k] += 1
        if latency_us > step.worst_us[k]:
            step.worst_us[k] = latency_us
        step.received += 1
        if step.received >= step.expected:
            self.step_complete.set()

    async def group_op(self, user: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Publish an ``up/group`` op as ``user``; its receipt (or error) payload."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.ops[payload["id"]] = future
        self.links[user].publish(topics.up(user, "group"), json.dumps(payload).encode())
        return await asyncio.wait_for(future, timeout)

    async def subscribe_group(self, members: list[str], name: str) -> int:
        """Subscribe the sessions of ``members`` held here to the group topic ``name``."""
        mine = [m for m in members if m in self.links]
        for user in mine:
            granted = await asyncio.wait_for(
                self.links[user].subscribe([(group_topic(name), 1)]), 60
            )
            if 0x80 in granted[2:]:
                raise PermissionError(f"{user}: subscription to {group_topic(name)} refused")
        return len(mine)

    def _group_publish(self, spec: dict[str, Any], k: int, intended: int) -> None:
        mode, sender = spec["mode"], spec["sender"]
        message_id = f"{spec['tag']}.{k}.{intended}"
        link = self.links[sender]
        if mode == "chat":
            body = {"id": message_id, "conversation": spec["conversation"], "body": BODY}
            link.publish(topics.up_msg(sender), json.dumps(body).encode())
            return
        downlink = raw_downlink(message_id, sender, k + 1)
        if mode == "topic-raw":
            link.publish(group_topic(spec["topic"]), downlink)
        else:
            for member in spec["members"]:
                link.publish(topics.down_msg(member), downlink)

    async def run_group_step(self, spec: dict[str, Any]) -> dict[str, Any]:
        gc.collect()
        gc.disable()  # as in bench._gen: no collection pause charged to the system
        try:
            return await self._run_group_step(spec)
        finally:
            gc.enable()

    async def _run_group_step(self, spec: dict[str, Any]) -> dict[str, Any]:
        total = int(spec["rate"] * spec["duration"])
        members = [m for m in spec["members"] if m in self.links]
        step = GroupStep(spec["tag"], total, members)
        # Counting starts before the common start: the sender's process may wake first,
        # and its first message must not reach this one's members as a stray.
        self.group = step
        self.step_complete.clear()
        await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
        cpu_before, wall_before = os.times(), time.monotonic()
        t0 = time.monotonic_ns()
        if spec["sender"] in self.links:
            interval = max(1, int(1e9 / spec["rate"]))
            await send_on_schedule(
                step, t0, interval, lambda k, intended: self._group_publish(spec, k, intended)
            )
        # Every process, the sender's or not, waits out the schedule and then the drain.
        ends = t0 + int(spec["duration"] * 1e9)
        wait = max(0.0, (ends - time.monotonic_ns()) / 1e9) + spec["drain"]
        if step.received < step.expected:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.step_complete.wait(), wait)
        cpu_after = os.times()
        return {
            "members_here": len(members),
            "sent": step.sent,
            "received": step.received,
            "count": step.count.tolist(),
            "worst_us": step.worst_us.tolist(),
            "deliveries": step.deliveries.encode().decode(),
            "duplicates": step.duplicates,
            "out_of_order": step.out_of_order,
            "stale": step.stale,
            "errors": step.errors,
            "max_send_lag_ms": step.max_send_lag_us / 1000,
            "wall_seconds": time.monotonic() - wall_before,
            "cpu_seconds": (cpu_after.user - cpu_before.user)
            + (cpu_after.system - cpu_before.system),
        }
