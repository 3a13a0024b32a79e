"""mosquitto's dynamic-security accounts and their ACLs, for whoever manages accounts.

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
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from protocol import acl, topics

from .mqtt import Incoming, LinkConfig, MqttError, MqttLink

log = logging.getLogger(__name__)

#: mosquitto's own admin API, not part of the chat protocol.
CONTROL_TOPIC: Final = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC: Final = f"{CONTROL_TOPIC}/response"
#: Our plugin's (broker/mosquitto_clientid): revocations of MQTT credentials.
MQCHAT_CONTROL_TOPIC: Final = "$CONTROL/mqchat/v1"
MQCHAT_RESPONSE_TOPIC: Final = f"{MQCHAT_CONTROL_TOPIC}/response"

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
        self._plugin_subscribed = False

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

    async def revoke_credentials(self, username: str, generation: int) -> None:
        """Tell our plugin that the user's MQTT credentials below ``generation`` are
        revoked; it drops the user's connections. Returns once the plugin answered.

        Raises:
            ProvisioningError: no answer (the plugin is not loaded, or is too old).
        """
        _check_username(username)
        if not self._plugin_subscribed:
            try:
                await self._link.subscribe(MQCHAT_RESPONSE_TOPIC, qos=1)
            except MqttError as exc:
                raise ProvisioningError("revoke", f"{MQCHAT_RESPONSE_TOPIC}: {exc}") from exc
            self._plugin_subscribed = True
        correlation = uuid.uuid4().hex
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[correlation] = answer
        command = f"revoke {username} {generation} {correlation}"
        try:
            async with asyncio.timeout(self.timeout):
                await self._link.publish(MQCHAT_CONTROL_TOPIC, command.encode(), qos=1)
                await answer
        except TimeoutError:
            raise ProvisioningError(
                "revoke",
                f"no answer within {self.timeout} s on {MQCHAT_RESPONSE_TOPIC}: is "
                "mqchat_clientid_bind (this version) loaded?",
            ) from None
        except MqttError as exc:
            raise ProvisioningError("revoke", str(exc)) from exc
        finally:
            self._waiting.pop(correlation, None)

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
        if message.topic == MQCHAT_RESPONSE_TOPIC:
            # "revoked <username> <generation> <correlation>"
            words = message.payload.decode("utf-8", "replace").split()
            revoked = self._waiting.get(words[-1]) if len(words) == 4 else None
            if revoked is not None and not revoked.done():
                revoked.set_result({})
            return
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
