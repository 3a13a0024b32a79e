"""A RabbitMQ cluster started from Debian's ``rabbitmq-server``, on loopback.

Each node is its own Erlang VM (``name@localhost``) with ports of its own (AMQP, MQTT,
distribution), its own data and log directories, and a private ``epmd`` on a free port
(``ERL_EPMD_PORT``, bound to 127.0.0.1) so that clusters of parallel test sessions do
not see each other. The nodes share one Erlang cookie and find each other through
``classic_config`` peer discovery: the first boots, the others boot once it listens
and join it, without any ``rabbitmqctl join_cluster`` round. The cluster is ready when
every node answers an MQTT CONNECT with CONNACK 0; a node that does not within
``MQTT_WAIT`` is restarted once (a RabbitMQ 3.10 node was seen to refuse MQTT for
minutes after forming a cluster).

What the nodes run is production's configuration (``docs/operations.md``): their main
``rabbitmq.conf`` is the repository's ``broker/rabbitmq-node/rabbitmq.conf``, the file
compose.yaml mounts in its nodes (``rabbitmq_mqtt`` with persistent sessions in quorum
queues, anonymous MQTT off, ...), their plugins its ``enabled_plugins``, and what
differs per deployment is ``broker.rabbitmq.render_cluster_config``'s, in
``RABBITMQ_CONFIG_FILES``: listeners, peers, and the service accounts (bridge,
operator) loaded from a definitions file at boot, so no ``rabbitmqctl`` call (2-3 s
each: it boots a VM) is on the startup path. Given a :class:`Deployment`, that second
file is a deployment's own instead (compose's ``rabbitmq-init`` writes it), and the
nodes carry its names and listen on RabbitMQ's default ports.

Booting three VMs on two shared cores takes 20-30 s, so the tests start one cluster
per session (``tests/conftest.py``); :attr:`RabbitCluster.startup_seconds` says how
long it took.

Given a :class:`tests.support.netns.Switch`, node ``i`` runs in host ``i``'s network
namespace instead (``name@<host name>``, listening on the host's address, an ``epmd``
of its own there), so that a test can cut one node off from the others and from every
client (:meth:`Switch.cut`): a network partition, not a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.rabbitmq import (
    ENABLED_PLUGINS,
    SHARED_CONFIG,
    NodePorts,
    definitions,
    render_cluster_config,
)
from core.dynsec import Credentials
from core.supervisor import Child

from . import packets
from .netns import Switch
from .services import LOOPBACK, _run_as, _service_account, _workdir, chown_tree, free_port

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
#: Seconds a node of a freshly formed cluster may take to accept MQTT sessions before
#: it is restarted (``RabbitCluster.wait_ready``).
MQTT_WAIT = 45.0
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
EPMD = "epmd"


#: RabbitMQ's own ports, where a :class:`Deployment`'s nodes listen.
DEFAULT_AMQP_PORT = 5672
DEFAULT_MQTT_PORT = 1883
#: Where a node's configuration is copied, in its directory: the main file (a copy of
#: ``broker/rabbitmq-node/rabbitmq.conf``) and the plugins.
MAIN_CONFIG_NAME = "rabbitmq.conf"


@dataclass(frozen=True)
class Deployment:
    """Nodes configured as a deployment configures them rather than by this module:
    what compose.yaml's ``rabbitmq-init`` wrote. Each node listens on RabbitMQ's default
    ports, so each needs a host of its own (a :class:`Switch`, whose host names are the
    host parts of ``names``)."""

    #: Every node's name, ``rabbit@<host>``, in the order of the switch's hosts.
    names: list[str]
    #: ``RABBITMQ_CONFIG_FILES``: the deployment's cluster config (a glob).
    config_files: str
    #: The Erlang cookie the nodes share.
    cookie: str
    #: The bridge's account, which the deployment's definitions file holds.
    bridge: Credentials


@dataclass
class RabbitNode:
    """One node of the cluster: its name, ports and process."""

    name: str
    amqp_port: int
    mqtt_port: int
    dist_port: int
    workdir: Path
    child: Child
    #: Where it listens: loopback, or its namespace's address.
    host: str = LOOPBACK

    @property
    def ports(self) -> list[tuple[str, int]]:
        return [(self.host, self.amqp_port), (self.host, self.mqtt_port)]

    def start(self) -> None:
        self.child.ports = self.ports
        self.child.start()

    def kill(self) -> None:
        """SIGKILL the node's whole process group (the VM and its helpers), as a crash
        or a power cut would."""
        process = self.child.process
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop(self, timeout: float = 30.0) -> None:
        process = self.child.process
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


@dataclass
class RabbitCluster:
    """A running cluster; ``nodes[i].mqtt_port`` is where devices connect."""

    workdir: Path
    account: pwd.struct_passwd | None
    private_workdir: bool
    epmd_port: int
    #: One, or one per namespace.
    epmds: list[Child]
    nodes: list[RabbitNode]
    bridge: Credentials
    #: An operator's account (full rights); a :class:`Deployment` has none.
    admin: Credentials | None
    startup_seconds: float = 0.0
    env: dict[str, str] = field(default_factory=dict)
    switch: Switch | None = None

    @property
    def host(self) -> str:
        """The first node's address (every node's, on loopback)."""
        return self.nodes[0].host

    @property
    def mqtt_addresses(self) -> list[tuple[str, int]]:
        return [(node.host, node.mqtt_port) for node in self.nodes]

    def ctl(self, *args: str, node: int = 0, timeout: float = 60.0) -> str:
        """``rabbitmqctl -n <node> args`` (a VM of its own: seconds per call); in
        namespaces, from the switch's last host, which no test cuts off."""
        argv, popen = _launch(
            self.switch,
            len(self.nodes),
            self.account,
            [CTL, "-n", self.nodes[node].name],
            hostname=None if self.switch is None else self.switch.names[len(self.nodes)],
        )
        result = self._run([*argv, *args], popen, timeout)
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {result.stderr or result.stdout}")
        return str(result.stdout)

    def run_on(
        self, node: int, argv: list[str], timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """``argv`` where node ``node`` runs, as its account and under its host name, as
        a container's health check runs beside its node: RabbitMQ's CLI tools (by
        name, or from RabbitMQ's own bin directory) then address that node by default.
        Needs a switch."""
        if self.switch is None:
            raise ValueError("a host of the node's own needs a switch")
        tool = Path(CTL).with_name(argv[0])
        command, popen = _launch(
            self.switch,
            node,
            self.account,
            [str(tool) if tool.exists() else argv[0], *argv[1:]],
            hostname=self.nodes[node].name.split("@", 1)[1],
        )
        return self._run(command, popen, timeout)

    def _run(
        self, command: list[str], popen: dict[str, Any], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command,
            env=self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **popen,
        )

    def running_nodes(self, node: int = 0) -> list[str]:
        status = json.loads(self.ctl("cluster_status", "--formatter", "json", node=node))
        return sorted(status["running_nodes"])

    def wait_running(self, timeout: float) -> bool:
        """Whether every node is running in the cluster (as the first sees it) within
        ``timeout``: a paused or partitioned node is not."""
        want = sorted(node.name for node in self.nodes)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                if self.running_nodes() == want:
                    return True
            time.sleep(0.5)
        return False

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Every node accepts AMQP and MQTT sessions and the first sees all of them
        running."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            node.child.wait_ready(max(1.0, deadline - time.monotonic()))
        if not self.wait_running(max(1.0, deadline - time.monotonic())):
            raise TimeoutError(f"cluster not formed: {self.running_nodes()} running")
        for index, node in enumerate(self.nodes):
            why = self._wait_mqtt_session(node, min(deadline, time.monotonic() + MQTT_WAIT))
            if why is None:
                continue
            # Seen in CI: a node of a freshly formed cluster closed every MQTT connection
            # before its CONNACK for minutes, while the others took them. A restart of
            # that node (its data kept) is what an operator would do.
            print(f"{node.name} accepted no MQTT session ({why}): restarting it", flush=True)
            node.stop()
            self.restart_node(index, max(1.0, deadline - time.monotonic()))
            why = self._wait_mqtt_session(node, deadline)
            if why is not None:
                raise TimeoutError(f"{node.name} accepted no MQTT session: {why}")

    def _wait_mqtt_session(self, node: RabbitNode, deadline: float) -> str | None:
        """Until the node answers an MQTT CONNECT of the bridge's account with CONNACK
        0 (None), or why not by ``deadline``. Listening is not enough: a node closed the
        bridge's first connection before any CONNACK right after the cluster formed (in
        CI); a bridge started on it tries until its startup timeout, then exits 69."""
        last = "no answer"
        hello = packets.connect(
            f"probe-{secrets.token_hex(4)}", self.bridge.username, self.bridge.password
        )
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((node.host, node.mqtt_port), timeout=5) as sock:
                    sock.sendall(hello)
                    connack = sock.recv(4)
                    if connack == bytes([0x20, 2, 0, 0]):
                        sock.sendall(packets.DISCONNECT_BYTES)
                        return None
                    last = f"answered {connack!r}"
            except OSError as exc:
                last = str(exc)
            time.sleep(0.5)
        return last

    def restart_node(self, index: int, timeout: float = 120.0) -> None:
        """Start a stopped or killed node again (its data kept) and wait until it is
        back in the cluster."""
        node = self.nodes[index]
        node.start()
        node.child.wait_ready(timeout)
        if not self.wait_running(timeout):
            raise TimeoutError(f"{node.name} did not rejoin the cluster")

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        for epmd in self.epmds:
            epmd.stop(5)
        if self.private_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _launch(
    switch: Switch | None,
    host: int,
    account: pwd.struct_passwd | None,
    argv: list[str],
    hostname: str | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """``argv`` as ``account``, on loopback or in host ``host``'s namespace: the command
    and the ``subprocess`` arguments to run it with. ``ip netns exec`` needs root, so
    there the drop to ``account`` is ``setpriv``'s, after it.

    ``hostname``: run it under that host name (a UTS namespace of its own). The CLI is
    an Erlang node named after the machine, and the nodes it asks connect back to it (a
    ``list_queues`` streams rows from every node): in the namespaces that name must
    resolve to where the CLI runs, which the machine's own name cannot."""
    if switch is None:
        return argv, _run_as(account)
    prefix = switch.run_in(host)
    if hostname is not None:
        rename = 'echo "$0" > /proc/sys/kernel/hostname && exec "$@"'
        prefix += ["unshare", "--uts", "sh", "-c", rename, hostname]
    if account is not None:
        prefix += [
            "setpriv",
            f"--reuid={account.pw_uid}",
            f"--regid={account.pw_gid}",
            "--clear-groups",
        ]
    return [*prefix, *argv], {}


def nodes_directory(base_dir: Path, name: str) -> Path:
    """A fresh directory for files the nodes read (a :class:`Deployment`'s config): where
    their account reaches it (outside ``base_dir`` when they run as one). What root
    writes into it goes to the nodes with :func:`hand_to_nodes`."""
    directory, _ = _workdir(base_dir, name, _service_account("rabbitmq"))
    return directory


def hand_to_nodes(directory: Path) -> None:
    """Everything under ``directory`` owned by the nodes' account."""
    chown_tree(directory, _service_account("rabbitmq"))


def start_rabbitmq_cluster(
    base_dir: Path,
    size: int = 3,
    *,
    auth_http_url: str | None = None,
    timeout: float = 120.0,
    switch: Switch | None = None,
    deployment: Deployment | None = None,
) -> RabbitCluster:
    """Start ``size`` nodes at once and return when they form one cluster.

    Args:
        auth_http_url: where RabbitMQ's HTTP auth backend asks about users that are not
            service accounts (the history API's ``/broker-auth``); None: service
            accounts only.
        switch: run node ``i`` in the switch's host ``i``; ``rabbitmqctl`` runs in one
            more, its last.
        deployment: configure the nodes as it says (``auth_http_url`` is then its
            business); needs ``switch``.
    """
    if deployment is not None and (switch is None or len(deployment.names) != size):
        raise ValueError("a deployment's nodes need a host each: a switch of `size` hosts")
    started = time.monotonic()
    account = _service_account("rabbitmq")
    workdir, private = _workdir(base_dir, "rabbitmq", account)
    cookie = workdir / ".erlang.cookie"
    cookie.write_text(secrets.token_hex(16) if deployment is None else deployment.cookie)
    cookie.chmod(0o400)
    admin: Credentials | None = None
    if deployment is None:
        bridge = Credentials("mqchat-bridge", secrets.token_urlsafe(24))
        admin = Credentials("mqchat-admin", secrets.token_urlsafe(24))
        defs = workdir / "definitions.json"
        defs.write_text(json.dumps(definitions(bridge, admin)))
    else:
        bridge = deployment.bridge
    epmd_port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "LANG": "C.UTF-8",
        "ERL_EPMD_ADDRESS": LOOPBACK,
        "ERL_EPMD_PORT": str(epmd_port),
    }

    def host_of(index: int) -> str:
        return LOOPBACK if switch is None else switch.address(index)

    def child(index: int, name: str, argv: list[str], log: Path, **options: Any) -> Child:
        command, popen = _launch(switch, index, account, argv)
        return Child(
            name, command, options.pop("env", env), log, popen={"umask": 0o077, **popen}, **options
        )

    # epmd: one on loopback for all, or one in each namespace (the CLI's too), where the
    # others ask for that node's distribution port.
    epmds = [
        child(
            index,
            "epmd",
            [EPMD, "-port", str(epmd_port), "-address", ",".join(dict.fromkeys((LOOPBACK, host)))],
            workdir / f"epmd{index}.log",
            cwd=workdir,
        )
        for index, host in enumerate(
            [LOOPBACK] if switch is None else [switch.address(i) for i in range(len(switch.names))]
        )
    ]
    tag = secrets.token_hex(3)
    nodes: list[RabbitNode] = []
    for index in range(1, size + 1):
        node_dir = workdir / f"node{index}"
        node_dir.mkdir()
        if deployment is not None:
            name = deployment.names[index - 1]
        elif switch is None:
            name = f"mqchat{index}-{tag}@localhost"
        else:
            name = f"mqchat{index}-{tag}@{switch.names[index - 1]}"
        node_env = env | {
            "RABBITMQ_NODENAME": name,
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONFIG_FILE": str(node_dir / MAIN_CONFIG_NAME),
            "RABBITMQ_CONFIG_FILES": (
                str(node_dir / "conf.d" / "*.conf")
                if deployment is None
                else deployment.config_files
            ),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(node_dir / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(node_dir / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(node_dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(node_dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node_dir / "log"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(node_dir / "plugins-expand"),
            "RABBITMQ_PID_FILE": str(node_dir / "rabbitmq.pid"),
        }
        nodes.append(
            RabbitNode(
                name=name,
                amqp_port=free_port() if deployment is None else DEFAULT_AMQP_PORT,
                mqtt_port=free_port() if deployment is None else DEFAULT_MQTT_PORT,
                dist_port=int(node_env["RABBITMQ_DIST_PORT"]),
                workdir=node_dir,
                child=child(
                    index - 1,
                    name,
                    [SERVER],
                    node_dir / "server.log",
                    env=node_env,
                    cwd=node_dir,
                    own_session=True,  # its VM and helpers in one group: kill() takes them all
                ),
                host=host_of(index - 1),
            )
        )
    peers = [node.name for node in nodes]
    for node in nodes:
        # The repository's files, as compose.yaml mounts them (copied: the nodes' account
        # may not reach the checkout).
        shutil.copyfile(SHARED_CONFIG, node.workdir / MAIN_CONFIG_NAME)
        shutil.copyfile(ENABLED_PLUGINS, node.workdir / "enabled_plugins")
        (node.workdir / "rabbitmq-env.conf").write_text("")
        if deployment is None:
            ports = NodePorts(node.host, node.amqp_port, node.mqtt_port)
            (node.workdir / "conf.d").mkdir()
            (node.workdir / "conf.d" / "node.conf").write_text(
                render_cluster_config(peers, defs, auth_http_url, ports)
                + "log.file.level = info\nlog.console = false\n"
            )
    chown_tree(workdir, account)
    cluster = RabbitCluster(
        workdir=workdir,
        account=account,
        private_workdir=private,
        epmd_port=epmd_port,
        epmds=epmds,
        nodes=nodes,
        bridge=bridge,
        admin=admin,
        env=env,
        switch=switch,
    )
    try:
        for index, epmd in enumerate(epmds):
            epmd.ports = [(host_of(index), epmd_port)]
            epmd.start_ready(10)
        # The first node alone, then the others, which find it running and join it: all
        # at once, they raced ("Could not auto-cluster ... tables_not_present").
        nodes[0].start()
        nodes[0].child.wait_ready(timeout)
        for node in nodes[1:]:
            node.start()
        cluster.wait_ready(timeout)
    except BaseException:
        cluster.close()
        raise
    cluster.startup_seconds = time.monotonic() - started
    return cluster
