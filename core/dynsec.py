"""mosquitto in production: its config, its dynamic-security accounts, their ACLs.

Why dynamic security and not ``acl_file``: the topic table gives every user rules
that name the user (``chat/v1/u/{user}/up/#``). mosquitto 2.0.11's dynsec plugin does
not substitute ``%u`` in ACL topics, and once dynsec is loaded an ``acl_file`` is not
consulted. A password file with ``pattern`` rules would need a file rewrite and a
broker reload for every new account; dynsec takes accounts over MQTT
(``$CONTROL/dynamic-security/v1``), saves them itself, and a new account can connect
the moment the command is answered. So every account gets a role of its own whose
topics are literal.

How the roles map to :mod:`protocol.acl` (publish -> ``publishClientSend``, subscribe
-> ``subscribePattern``, which only grants a filter that the pattern covers, so ``+``
and ``#`` in a subscription do not reach past the user's own tree)::

    client           roles
    mqchat-admin     mqchat-admin   publish $CONTROL/dynamic-security/#, read responses
    mqchat-bridge    mqchat-bridge  BRIDGE_RULES
    {user}           user:{user}    USER_RULES that name {user}, {user} filled in
                     mqchat-user    USER_RULES that name nobody (presence of everyone)

Everything else is denied by ``defaultACLAccess`` (publish, subscribe); receiving
stays allowed, because one can only receive what one could subscribe to. Those
defaults do not cover topics that start with ``$``: without an explicit
``publishClientReceive`` the admin would never see dynsec's answers.

A publish to a forbidden topic is acknowledged and silently dropped (MQTT 3.1.1 has
no way to refuse it); a forbidden subscription gets SUBACK 0x80.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from clients.mqtt import Incoming, LinkConfig, MqttError, MqttLink
from protocol import acl, topics

log = logging.getLogger(__name__)

#: mosquitto's own admin API, not part of the chat protocol.
CONTROL_TOPIC: Final = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC: Final = f"{CONTROL_TOPIC}/response"

ADMIN_ROLE: Final = "mqchat-admin"
BRIDGE_ROLE: Final = "mqchat-bridge"
#: The rules every account shares (those of USER_RULES that do not name the user).
USER_ROLE: Final = "mqchat-user"

#: What dynsec itself uses for accounts made over $CONTROL (PBKDF2-SHA512, 12-byte
#: salt, 101 iterations); the bootstrap accounts are hashed the same way.
PBKDF2_ITERATIONS: Final = 101
SALT_BYTES: Final = 12

_ACL_TYPE: Final[dict[acl.Action, str]] = {
    "publish": "publishClientSend",
    "subscribe": "subscribePattern",
}


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


class ProvisioningError(Exception):
    """The broker answered a dynsec command with an error, or did not answer in time."""

    def __init__(self, command: str, error: str) -> None:
        super().__init__(f"dynsec {command} failed: {error}")
        self.command = command
        self.error = error


def user_role(username: str) -> str:
    """The name of the role that holds one user's own topics."""
    return f"user:{username}"


# -- the config file ---------------------------------------------------------------


@dataclass(frozen=True)
class TlsListeners:
    """Where the TLS listeners of :func:`render_config` go, and their certificate."""

    port: int
    ws_port: int
    certfile: Path
    keyfile: Path


#: Settings a commented-out TLS example in mosquitto.conf may hold (``#listener 8883``:
#: no space after the '#', unlike a prose comment).
_TLS_EXAMPLE_RE: Final = re.compile(
    r"^#(listener|protocol|certfile|keyfile|cafile|tls_version|require_certificate)\b"
)


def render_config(
    template_text: str,
    *,
    host: str,
    port: int,
    ws_port: int,
    data_dir: Path,
    plugins: Mapping[str, Path] | None = None,
    tls: TlsListeners | None = None,
) -> str:
    """Move the production config to another place, changing nothing else.

    The MQTT listener goes to ``host:port``, the websockets listener to
    ``host:ws_port``, persistence and the dynsec file into ``data_dir``, and the log
    to stderr. ``plugins`` maps a plugin's file name to the path to load it from
    instead (dynsec on machines of another architecture, the client-id plugin from
    the build directory); other plugin lines stay. With ``tls``, the commented-out
    TLS example of the template is turned on (unless it already is) and moved to
    ``tls``'s ports and files. Tests run what this returns, so the production file is
    the one under test.

    Raises:
        ValueError: the template does not have exactly one MQTT and one websockets
            listener (and, with ``tls``, one of each over TLS); or it has TLS
            listeners and ``tls`` is not given.
    """
    lines = template_text.splitlines()
    if tls is not None and "mqtt+tls" not in _listener_kinds(lines).values():
        lines = [_TLS_EXAMPLE_RE.sub(r"\1", line) for line in lines]
    listener_kinds = _listener_kinds(lines)
    expected = ["mqtt", "websockets"]
    if tls is not None:
        expected += ["mqtt+tls", "websockets+tls"]
    if sorted(listener_kinds.values()) != sorted(expected):
        raise ValueError(
            f"expected listeners {', '.join(expected)}; "
            f"found {', '.join(sorted(listener_kinds.values())) or 'none'}"
        )
    ports = {"mqtt": port, "websockets": ws_port}
    if tls is not None:
        ports |= {"mqtt+tls": tls.port, "websockets+tls": tls.ws_port}
    out: list[str] = []
    for index, line in enumerate(lines):
        key, value = _setting(line)
        if key == "listener":
            out.append(f"listener {ports[listener_kinds[index]]} {host}")
        elif key in ("certfile", "keyfile") and tls is not None:
            out.append(f"{key} {getattr(tls, key).as_posix()}")
        elif key == "persistence_location":
            out.append(f"persistence_location {data_dir.as_posix().rstrip('/')}/")
        elif key == "plugin_opt_config_file":
            out.append(f"plugin_opt_config_file {(data_dir / Path(value).name).as_posix()}")
        elif key == "plugin" and plugins and Path(value).name in plugins:
            out.append(f"plugin {plugins[Path(value).name].as_posix()}")
        elif key == "log_dest":
            continue
        else:
            out.append(line)
    out.append("log_dest stderr")
    return "\n".join(out) + "\n"


def _setting(line: str) -> tuple[str, str]:
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return "", ""
    key, _, value = stripped.partition(" ")
    return key, value.strip()


def _listener_kinds(lines: list[str]) -> dict[int, str]:
    """Line index of every ``listener`` -> its protocol, with ``+tls`` if it has a cert."""
    starts = [i for i, line in enumerate(lines) if _setting(line)[0] == "listener"]
    kinds: dict[int, str] = {}
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        block = [_setting(line) for line in lines[start + 1 : end]]
        kind = "websockets" if ("protocol", "websockets") in block else "mqtt"
        if any(key == "certfile" for key, _ in block):
            kind += "+tls"
        kinds[start] = kind
    return kinds


# -- the initial dynsec file ---------------------------------------------------------


def dynsec_bootstrap(*, admin: Credentials, bridge: Credentials) -> dict[str, Any]:
    """The dynamic-security.json a fresh broker starts from: two service accounts.

    User accounts are added later over MQTT by :class:`DynsecProvisioner`.

    Raises:
        ValueError: a service name is one a user could register, or both are equal.
    """
    for service in (admin, bridge):
        if topics.is_valid_username(service.username):
            raise ValueError(
                f"service account {service.username!r} could collide with a user; "
                "give it a name users cannot take, such as one with a '-'"
            )
    if admin.username == bridge.username:
        raise ValueError("the admin and bridge accounts must differ")
    return {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": True,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": [
            _client_entry(admin, ADMIN_ROLE),
            _client_entry(bridge, BRIDGE_ROLE),
        ],
        "groups": [],
        "roles": [
            {
                "rolename": ADMIN_ROLE,
                "acls": [
                    _acl_entry("publishClientSend", "$CONTROL/dynamic-security/#"),
                    _acl_entry("subscribePattern", RESPONSE_TOPIC),
                    # defaultACLAccess does not apply to topics starting with '$'.
                    _acl_entry("publishClientReceive", RESPONSE_TOPIC),
                ],
            },
            {"rolename": BRIDGE_ROLE, "acls": _acl_entries(acl.BRIDGE_RULES, user=None)},
            {
                "rolename": USER_ROLE,
                "acls": _acl_entries(
                    (rule for rule in acl.USER_RULES if not _names_user(rule)), user=None
                ),
            },
        ],
    }


def write_dynsec_bootstrap(path: Path, *, admin: Credentials, bridge: Credentials) -> None:
    """Write :func:`dynsec_bootstrap` to ``path``, readable by its owner only.

    Raises:
        FileExistsError: ``path`` exists; it holds every account, so it is never
            overwritten.
    """
    text = json.dumps(dynsec_bootstrap(admin=admin, bridge=bridge), indent=2) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def hash_password(password: str) -> dict[str, Any]:
    """The ``password``/``salt``/``iterations`` fields dynsec checks a password with."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, PBKDF2_ITERATIONS)
    return {
        "password": base64.b64encode(digest).decode("ascii"),
        "salt": base64.b64encode(salt).decode("ascii"),
        "iterations": PBKDF2_ITERATIONS,
    }


def user_acls(username: str) -> list[dict[str, Any]]:
    """The ACL entries of ``user:{username}``: the user's own rules, name filled in."""
    return _acl_entries((rule for rule in acl.USER_RULES if _names_user(rule)), user=username)


def _client_entry(credentials: Credentials, role: str) -> dict[str, Any]:
    return {
        "username": credentials.username,
        **hash_password(credentials.password),
        "roles": [{"rolename": role}],
    }


def _names_user(rule: acl.Rule) -> bool:
    return "{user}" in rule.pattern


def _acl_entries(rules: Iterable[acl.Rule], *, user: str | None) -> list[dict[str, Any]]:
    entries = []
    for rule in rules:
        topic = rule.pattern if user is None else rule.for_user(user)
        entries.append(_acl_entry(_ACL_TYPE[rule.action], topic))
    return entries


def _acl_entry(acl_type: str, topic: str) -> dict[str, Any]:
    return {"acltype": acl_type, "topic": topic, "priority": 0, "allow": True}


# -- accounts over $CONTROL ----------------------------------------------------------


class DynsecProvisioner:
    """Creates, changes and removes user accounts on a running mosquitto.

    Each command is sent alone and answered on :data:`RESPONSE_TOPIC`; the answer is
    matched by ``correlationData``. dynsec applies a command (and saves its file)
    before it answers, so when a method returns the change is live.

    Args:
        config: how to connect as the admin account; every provisioner needs a
            client id of its own (a second connection with the same id drops the
            first).
        timeout: seconds to wait for each answer.
    """

    def __init__(self, config: LinkConfig, *, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._link = MqttLink(config, on_message=self._on_response)
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def __aenter__(self) -> Self:
        await self._link.connect()
        try:
            await self._link.subscribe(RESPONSE_TOPIC, qos=1)
        except BaseException:
            await self._link.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._link.close()

    async def create_user(self, username: str, password: str) -> None:
        """Create the account and its role; it can connect when this returns.

        Raises:
            ValueError: not a valid username, or an empty password.
            ProvisioningError: the broker refused (e.g. the account exists).
        """
        _check_username(username)
        if not password:
            raise ValueError("empty password")
        role = user_role(username)
        await self._run({"command": "createRole", "rolename": role, "acls": user_acls(username)})
        try:
            await self._run(
                {
                    "command": "createClient",
                    "username": username,
                    "password": password,
                    "roles": [{"rolename": role}, {"rolename": USER_ROLE}],
                }
            )
        except ProvisioningError:
            with contextlib.suppress(ProvisioningError):
                await self._run({"command": "deleteRole", "rolename": role})
            raise

    async def delete_user(self, username: str) -> None:
        """Remove the account (dropping its live connections) and then its role."""
        _check_username(username)
        await self._run({"command": "deleteClient", "username": username})
        await self._run({"command": "deleteRole", "rolename": user_role(username)})

    async def set_password(self, username: str, password: str) -> None:
        """Change the password; live connections are dropped and must log in anew."""
        _check_username(username)
        if not password:
            raise ValueError("empty password")
        await self._run(
            {"command": "setClientPassword", "username": username, "password": password}
        )

    async def disable_user(self, username: str) -> None:
        """Refuse the account's connections from now on, dropping the live ones."""
        _check_username(username)
        await self._run({"command": "disableClient", "username": username})

    async def enable_user(self, username: str) -> None:
        _check_username(username)
        await self._run({"command": "enableClient", "username": username})

    async def _run(self, command: dict[str, Any]) -> dict[str, Any]:
        name = str(command["command"])
        correlation = uuid.uuid4().hex
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[correlation] = answer
        payload = json.dumps({"commands": [{**command, "correlationData": correlation}]})
        try:
            async with asyncio.timeout(self.timeout):
                await self._link.publish(CONTROL_TOPIC, payload.encode("utf-8"), qos=1)
                response = await answer
        except TimeoutError:
            raise ProvisioningError(name, f"no answer within {self.timeout} s") from None
        except MqttError as exc:
            raise ProvisioningError(name, str(exc)) from exc
        finally:
            self._waiting.pop(correlation, None)
        if "error" in response:
            raise ProvisioningError(name, str(response["error"]))
        return response

    def _on_response(self, message: Incoming) -> None:
        if message.topic != RESPONSE_TOPIC:
            return
        try:
            responses = json.loads(message.payload)["responses"]
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable dynsec response: %r", message.payload[:200])
            return
        for response in responses if isinstance(responses, list) else []:
            if not isinstance(response, dict):
                continue
            answer = self._waiting.get(str(response.get("correlationData")))
            if answer is not None and not answer.done():
                answer.set_result(response)


def _check_username(username: str) -> None:
    # The name becomes part of topic strings and a role name; refuse anything else
    # before it reaches the broker.
    if not topics.is_valid_username(username):
        raise ValueError(f"not a valid username: {username!r}")
