"""Push endpoints are URLs a device gives us and the server then POSTs to: untrusted.

Without a check, anyone with an account could make the push daemon send requests
into the operator's own network (SSRF): ``https://10.0.0.5/admin``, the cloud's
metadata address ``169.254.169.254``, ``localhost``. So an endpoint must be
``https``, and every address its host resolves to must be public (not loopback,
private, link-local, multicast, reserved or unspecified) unless the operator's
allowlist names the host or a network holding the address.

The history API checks when a subscription is stored; the push daemon checks again
at every connection, on the addresses it then connects to
(:class:`VettedBackend`), so a name that resolved to a public address at
registration and to a private one later (DNS rebinding) is refused too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final
from urllib.parse import urlsplit

import httpcore
from pydantic import BeforeValidator
from pydantic_settings import NoDecode

MAX_ENDPOINT_CHARS: Final = 2048

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _split_hosts(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


#: A setting naming allowed hosts and networks, comma-separated in its variable
#: (``MQCHAT_PUSH_ALLOW_HOSTS=push.internal,10.1.0.0/16``).
AllowHosts = Annotated[list[str], NoDecode, BeforeValidator(_split_hosts)]


class EndpointRefused(ValueError):
    """An endpoint URL, or an address its host resolved to, that is not allowed."""


@dataclass(frozen=True, slots=True)
class Allowlist:
    """Hosts (exact names) and networks whose private addresses are allowed anyway."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Allowlist:
        """``["push.internal", "127.0.0.1", "10.1.0.0/16"]``; raises ValueError."""
        hosts, networks = set(), []
        for entry in entries:
            text = entry.strip().lower()
            if not text:
                continue
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                hosts.add(text.rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def allows(self, host: str, address: IPAddress) -> bool:
        if host.lower().rstrip(".") in self.hosts:
            return True
        return any(address in network for network in self.networks)


def check_url(url: str) -> tuple[str, int]:
    """The endpoint's host and port, if its form is acceptable.

    Raises:
        EndpointRefused: not ``https``, no host, credentials in it, or too long.
    """
    if len(url) > MAX_ENDPOINT_CHARS:
        raise EndpointRefused(f"endpoint longer than {MAX_ENDPOINT_CHARS} characters")
    try:
        parts = urlsplit(url)
        port = parts.port or 443
    except ValueError as exc:
        raise EndpointRefused(f"endpoint is not a URL: {exc}") from exc
    if parts.scheme != "https":
        raise EndpointRefused("endpoint must be an https:// URL")
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise EndpointRefused("endpoint must name a host, without credentials")
    return parts.hostname, port


def vet(host: str, addresses: Sequence[str], allow: Allowlist) -> list[str]:
    """The addresses of ``addresses`` that may be connected to; refuses if any may not.

    All or nothing: a name that resolves to one public and one private address is a
    rebinding attempt as much as one that resolves to the private one alone.
    """
    if not addresses:
        raise EndpointRefused(f"{host} does not resolve")
    for text in addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        public = address.is_global and not address.is_multicast
        if not public and not allow.allows(host, address):
            raise EndpointRefused(
                f"{host} resolves to {address}, which is not a public address "
                "(the operator's allowlist does not name it)"
            )
    return list(dict.fromkeys(addresses))


def resolve(host: str, port: int, allow: Allowlist) -> list[str]:
    """Blocking resolution and :func:`vet` (for the API, which runs in a thread)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise EndpointRefused(f"{host} does not resolve: {exc}") from exc
    return vet(host, [str(info[4][0]) for info in infos], allow)


def check(url: str, allow: Allowlist) -> None:
    """:func:`check_url` and :func:`resolve`: what the API does before storing."""
    host, port = check_url(url)
    resolve(host, port, allow)


class VettedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's own backend, connecting only to vetted addresses.

    httpcore asks it for ``host:port`` and then starts TLS with ``host`` as the server
    name, so the certificate is still checked against the name while the socket goes
    to the address that was vetted: nothing resolves the name a second time.
    """

    def __init__(self, allow: Allowlist) -> None:
        self._allow = allow
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout
            )
        except (OSError, TimeoutError) as exc:
            raise httpcore.ConnectError(f"{host} does not resolve: {exc}") from exc
        addresses = vet(host, [str(info[4][0]) for info in infos], self._allow)
        return await self._inner.connect_tcp(
            addresses[0],
            port,
            timeout=timeout,
            local_address=local_address,
            socket_options=socket_options,
        )

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
