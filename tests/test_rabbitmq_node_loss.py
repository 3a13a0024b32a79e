"""A RabbitMQ node, or a bridge, SIGKILLed under load, with the no-loss checker of the
chaos runs.

Six devices in three pairs chat, two on each node, each told the other nodes
(``ChatClient(other_brokers=...)``), through two bridges that share the uplink queues
(``bridge/amqp_source.py``). Mid-run, once 30 sends were acknowledged:

* ``node``: the third node, which holds a third of the devices and replicas of every
  quorum queue, is killed. Its devices reconnect to another node, where their sessions
  (quorum queues) are; it is started again only after the run.
* ``bridge``: the second bridge is killed; its queues keep their uplinks (the senders'
  SDKs resend meanwhile) until it is started again, and it goes on in order.
* ``standby``: a second instance of the second bridge's partition stands by (each
  queue has one active consumer); the active one is killed and not restarted, and the
  standby takes its queues over, from the uplinks it had not acknowledged on.
* ``partition``: the third node is cut off the network (its namespace's cable pulled,
  ``tests/support/netns.py``): no FIN, no RST, its devices and the second bridge hear
  nothing more from it. They give it up after their keepalive (5 s here) or AMQP
  heartbeat, and go on through the other nodes; the node, alone, pauses itself
  (``cluster_partition_handling = pause_minority``). The cable goes back in after
  ``PARTITION_SECONDS`` and the node must rejoin the cluster by itself.

``tests/support/chaos.py``'s ``check`` must find nothing lost, duplicated or reordered.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from bridge.config import BridgeSettings
from core import daemon

from .support.chaos import History, Received, StoredRow, cancel, check, record_shown
from .support.rabbitmq import RabbitCluster
from .support.services import LOOPBACK, free_port
from .support.stack import Stack, bridge_daemon, handled_uplinks, stored

#: One worker boots the session's cluster (20-60 s, three Erlang VMs) and runs them all.
pytestmark = pytest.mark.xdist_group("rabbitmq")

PER_SENDER = 40
PACE = 0.05
SEND_TIMEOUT = 60.0
KILL_AFTER_OK = 30  # acknowledged sends before the kill: it happens under load
QUIET_TIMEOUT = 60.0
#: How long the partitioned node stays cut off: past every keepalive and heartbeat.
PARTITION_SECONDS = 25.0
#: The devices' keepalive in seconds when a partition is what they must notice.
PARTITION_KEEPALIVE = 5


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault", ["node", "bridge", "standby", "partition"])
async def test_killed_under_load_nothing_is_lost(
    rabbitmq_stack: Stack, rabbitmq_cluster: RabbitCluster, fault: str, tmp_path: Path
) -> None:
    users = await rabbitmq_stack.new_users("a1", "b1", "a2", "b2", "a3", "b3")
    partner = {}
    for a, b in zip(users[::2], users[1::2], strict=True):
        partner[a], partner[b] = b, a
    nodes = rabbitmq_cluster.mqtt_addresses
    victim = len(nodes) - 1
    clients = {}
    #: What the victim node's devices saw of their connection.
    seen: dict[str, list[bool]] = {}
    # Silence is all a partition shows: a keepalive short enough to notice it in time.
    options = {"keepalive": PARTITION_KEEPALIVE} if fault == "partition" else {}
    for index, user in enumerate(users):
        node = index % len(nodes)
        events = seen.setdefault(user, []) if node == victim else []
        clients[user] = await rabbitmq_stack.client(
            user,
            host=nodes[node][0],
            port=nodes[node][1],
            **options,
            other_brokers=nodes[node + 1 :] + nodes[:node],
            # The broker's queue is a cache: a gap is filled from the history API.
            history=rabbitmq_stack.history(user),
            on_connection=lambda up, _, events=events: events.append(up),
        )
    bridge = rabbitmq_stack.more_bridges[0]
    assert isinstance(bridge.settings, BridgeSettings)
    standby = None
    if fault == "standby":
        settings = daemon.replace(
            bridge.settings,
            client_id="mqchat-bridge-2-standby",
            metrics_addr=f"{LOOPBACK}:{free_port()}",
        )
        standby = bridge_daemon(tmp_path, settings, "bridge-2-standby")
        await asyncio.to_thread(standby.start_ready)

    history = History()
    received: list[Received] = []
    receivers = [
        asyncio.create_task(record_shown(f"{user}/phone", client, received))
        for user, client in clients.items()
    ]
    killed_at: list[float] = []
    rejoined = False

    async def send_all(sender: str) -> None:
        for n in range(PER_SENDER):
            await history.send(clients[sender], sender, partner[sender], n, SEND_TIMEOUT)
            await asyncio.sleep(PACE)

    async def kill() -> None:
        while sum(op.kind == "ok" for op in history.ops) < KILL_AFTER_OK:
            await asyncio.sleep(0.05)
        if fault == "node":
            rabbitmq_cluster.nodes[victim].kill()
        elif fault == "partition":
            assert rabbitmq_cluster.switch is not None
            rabbitmq_cluster.switch.cut(victim)
            try:
                await asyncio.sleep(PARTITION_SECONDS)
            finally:
                rabbitmq_cluster.switch.heal(victim)
        elif fault == "standby":
            bridge.kill()  # for good: the standby goes on
        else:
            bridge.kill()
            await asyncio.sleep(2.0)  # a while without it: its queues fill
            await asyncio.to_thread(bridge.start_ready)
        killed_at.append(time.monotonic())

    def caught_up() -> bool:
        if any(client.pending for client in clients.values()):
            return False
        shown = {(r.device, r.sender, r.id) for r in received}
        return all(
            (f"{partner[row.sender]}/phone", row.sender, row.client_id) in shown
            for row in stored(rabbitmq_stack, *users)
        )

    try:
        await asyncio.gather(kill(), *(send_all(user) for user in users))
        deadline = time.monotonic() + QUIET_TIMEOUT
        while not await asyncio.to_thread(caught_up) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
    finally:
        await cancel(receivers)
        taken_over = None
        if standby is not None:
            await asyncio.to_thread(standby.stop)
            taken_over = handled_uplinks(standby)
        if fault == "node":
            await asyncio.to_thread(rabbitmq_cluster.restart_node, victim)
        elif fault == "partition":
            rejoined = await asyncio.to_thread(rabbitmq_cluster.wait_running, QUIET_TIMEOUT)
            if not rejoined:  # leave the session's cluster whole for the tests after
                rabbitmq_cluster.nodes[victim].stop()
                await asyncio.to_thread(rabbitmq_cluster.restart_node, victim)
        elif not bridge.alive:
            await asyncio.to_thread(bridge.start_ready)

    rows = [
        StoredRow(r.client_id, r.conversation_id, r.seq, r.sender, r.body, r.pk or 0)
        for r in stored(rabbitmq_stack, *users)
    ]
    report = check(history, received, rows, devices={u: [f"{u}/phone"] for u in users})
    print(report.render())
    assert killed_at, "the node was never killed"
    assert report.ok, report.render()
    assert report.acknowledged == len(users) * PER_SENDER
    if fault in ("node", "partition"):
        # Lost and back, while the node was still dead: on another node.
        assert all(events[:2] == [False, True] for events in seen.values()), seen
    if fault == "partition":
        # Paused while alone (pause_minority), it came back by itself once it could
        # see the others again: no operator, no restart.
        assert rejoined, f"the partitioned node did not rejoin: {rabbitmq_cluster.running_nodes()}"
    if fault in ("node", "partition"):
        # The second bridge published through the lost node: its MQTT link moved on
        # (MQCHAT_BRIDGE_MQTT_OTHER_ADDRESSES) and the downlinks went on from there.
        assert bridge.settings.mqtt_port == nodes[victim][1]
        moved = f"reconnecting {bridge.settings.client_id} to {nodes[0][0]}:{nodes[0][1]}"
        assert moved in bridge.latest_log(), bridge.log_tail()
    if fault == "standby":
        # The killed bridge's queues were the standby's from then on.
        assert taken_over, "the standby handled no uplink"
