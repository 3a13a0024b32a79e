"""Hosts in network namespaces of their own, behind one switch, for tests that cut a
host off the network.

``ip netns`` and a veth pair per host, whose outer end is a port of a Linux bridge in
this namespace; the bridge has the subnet's ``.254`` (the "gateway": where a host
reaches the test's own daemons) and host ``i`` has ``.{i + 1}``. Each host has a name
the others (and programs run in any of the namespaces) resolve: ``ip netns exec``
mounts ``/etc/netns/<namespace>/hosts`` over ``/etc/hosts``, which this module writes.
:meth:`Switch.cut` takes a host's port down: nothing reaches it or leaves it, no
FIN, no RST, as when its cable is pulled; :meth:`Switch.heal` puts it back.

Needs root (``CAP_NET_ADMIN`` and ``CAP_SYS_ADMIN``) and iproute2: the test suite runs
as root in CI, and ``scripts/ensure-system-deps`` installs iproute2.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

NETNS_ETC = Path("/etc/netns")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _free_subnet() -> str:
    """A /24 in 10.254.0.0/16 that no interface here uses, as "10.254.N"."""
    used = subprocess.run(
        ["ip", "-4", "-o", "addr"], check=True, capture_output=True, text=True, timeout=30
    ).stdout
    for _ in range(64):
        candidate = f"10.254.{secrets.randbelow(256)}"
        if f" {candidate}." not in used:
            return candidate
    raise RuntimeError("no free 10.254.N.0/24 for the test's switch")


@dataclass
class Switch:
    """The switch and its hosts; ``namespaces[i]`` is host ``i``'s."""

    subnet: str
    bridge: str
    namespaces: list[str]
    ports: list[str]
    names: list[str]

    @property
    def gateway(self) -> str:
        """This namespace's address on the switch: where hosts reach the test's daemons."""
        return f"{self.subnet}.254"

    def address(self, host: int) -> str:
        return f"{self.subnet}.{host + 1}"

    def run_in(self, host: int) -> list[str]:
        """The prefix that runs a command in host ``host``'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[host]]

    def cut(self, host: int) -> None:
        """Pull host ``host``'s cable: it and the rest no longer reach each other."""
        _ip("link", "set", self.ports[host], "down")

    def heal(self, host: int) -> None:
        _ip("link", "set", self.ports[host], "up")

    def close(self) -> None:
        for namespace in self.namespaces:
            # Deleting a namespace deletes its end of the veth pair, and so the pair.
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "delete", namespace)
            shutil.rmtree(NETNS_ETC / namespace, ignore_errors=True)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "delete", self.bridge)


def _build(switch: Switch) -> None:
    _ip("link", "add", switch.bridge, "type", "bridge")
    _ip("addr", "add", f"{switch.gateway}/24", "dev", switch.bridge)
    _ip("link", "set", switch.bridge, "up")
    hosts = "".join(f"{switch.address(i)}\t{name}\n" for i, name in enumerate(switch.names))
    for i, (namespace, port) in enumerate(zip(switch.namespaces, switch.ports, strict=True)):
        inner = f"{port}i"
        _ip("netns", "add", namespace)
        _ip("link", "add", port, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", namespace)
        _ip("link", "set", port, "master", switch.bridge, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("-n", namespace, "addr", "add", f"{switch.address(i)}/24", "dev", inner)
        _ip("-n", namespace, "link", "set", inner, "up")
        etc = NETNS_ETC / namespace
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n{hosts}")


@contextlib.contextmanager
def switched_hosts(names: Sequence[str]) -> Iterator[Switch]:
    """One namespace per name behind a new switch, removed again on exit."""
    if os.geteuid() != 0:
        raise PermissionError(
            "network namespaces need root: run the RabbitMQ cluster tests as root "
            "(CI does), e.g. sudo make test"
        )
    tag = secrets.token_hex(3)
    switch = Switch(
        subnet=_free_subnet(),
        bridge=f"mqb{tag}",
        namespaces=[f"mqchat-{tag}-{i}" for i in range(len(names))],
        # Interface names are at most 15 characters: "mqv" + 6 + index + "i".
        ports=[f"mqv{tag}{i}" for i in range(len(names))],
        names=list(names),
    )
    try:
        _build(switch)
        yield switch
    finally:
        switch.close()
