"""The history API as the SDK uses it: a token, the caller's conversations, pages of
messages, someone's presence, MQTT credentials.

The broker's queue is a cache. A device that was away longer than its session lived,
or for more messages than the broker queues, gets the rest from here, by
per-conversation cursor; a gap in ``seq`` seen live is filled from here too.

Raises :class:`HistoryError` for the API's errors and :class:`ConnectError` when it
cannot be reached (``_exceptions.py`` draws the tree).
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

import httpx

import protocol

from ._exceptions import UNEXPECTED_RESPONSE, UNREACHABLE, ConnectError, HistoryError


@dataclass(frozen=True, slots=True)
class ConversationState:
    """Where a conversation stands: catching up reads it to skip what is already here.

    ``kind`` is ``direct`` or ``group``; a group has a ``name``, and ``member`` is
    False for one the user left or was removed from (``members`` is then empty).
    """

    id: str
    last_seq: int
    kind: str = "direct"
    name: str | None = None
    members: tuple[str, ...] = ()
    member: bool = True


@dataclass(frozen=True, slots=True)
class MqttCredential:
    """What ``POST /v1/mqtt-credentials`` answers: connect to MQTT with exactly these
    (``password`` is the short-lived credential, not the account's); it is accepted
    for new connections until ``expires_at``."""

    username: str
    client_id: str
    password: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class GroupMember:
    """A member of a group now: ``role`` is ``admin`` or ``member``; they read the group
    from ``since_seq`` on."""

    username: str
    role: str
    since_seq: int


class HistoryClient:
    """A signed-in view of the history API for one user.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000`` or ``https://chat.example:8443``.
        page_size: messages per request when catching up (the API caps it at 200).
        verify: for ``https``: the context to verify the server with
            (``core.mqtt.tls_context(ca_file)`` for a private CA); ``True`` trusts
            the system's CAs.
    """

    def __init__(
        self,
        base_url: str,
        username: str,
        password: str,
        *,
        page_size: int = 200,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self._http = httpx.AsyncClient(base_url=base_url, timeout=10.0, verify=verify)
        self._username = username
        self._password = password
        self._token: str | None = None
        self._token_expires = 0.0
        self.page_size = page_size

    async def close(self) -> None:
        """Close the HTTP connections; :meth:`ChatClient.close` calls it for its own."""
        await self._http.aclose()

    async def conversations(self) -> list[ConversationState]:
        """Every conversation of the user (groups left included), with its last seq."""
        data = await self._get("/v1/conversations")
        return [
            ConversationState(
                c["id"],
                c["last_message"]["seq"] if c["last_message"] else 0,
                kind=c["kind"],
                name=c.get("name"),
                members=tuple(c["members"]),
                member=c.get("member", True),
            )
            for c in data
        ]

    async def cursors(self, device: str) -> dict[str, int]:
        """This device's delivered cursor per conversation, as the bridge stored it."""
        data = await self._get(f"/v1/devices/{device}/cursors")
        return {c["conversation"]: int(c["delivered"]) for c in data["cursors"]}

    async def messages_between(
        self, conversation: str, after: int, before: int | None = None
    ) -> list[protocol.DownMessage]:
        """Every message with ``after < seq (< before)``, ascending, across pages."""
        out: list[protocol.DownMessage] = []
        while True:
            params: dict[str, Any] = {"after": after, "limit": self.page_size}
            if before is not None:
                params["before"] = before
            data = await self._get(f"/v1/conversations/{conversation}/messages", params)
            page = [protocol.DownMessage.model_validate(m) for m in data["messages"]]
            out.extend(page)
            if not data["has_more"] or not page:
                return out
            after = page[-1].seq

    async def members(self, conversation: str) -> list[GroupMember]:
        """A conversation's members now, with their roles, by name.

        Raises:
            HistoryError: ``unknown_conversation`` if the user is not a member now.
        """
        data = await self._get(f"/v1/conversations/{quote(conversation, safe='')}/members")
        return [GroupMember(m["username"], m["role"], int(m["since_seq"])) for m in data]

    async def presence(self, username: str) -> protocol.Presence | None:
        """A user's presence, as the same model as MQTT's ``chat/v1/presence/{user}``.

        None if no device of theirs was ever seen.

        Raises:
            HistoryError: ``unknown_user`` for a name with no (enabled) account.
        """
        data = await self._get(f"/v1/users/{quote(username, safe='')}/presence")
        if data["at"] is None:
            return None
        return protocol.Presence(state=data["state"], at=data["at"])

    async def mqtt_credential(self, device: str) -> MqttCredential:
        """A short-lived password for MQTT, for client id ``{username}:{device}`` only.

        Raises:
            HistoryError: ``unknown_route`` if the server issues none (connect with the
                account password there), ``unauthorized``, ...
        """
        data = await self._call("POST", "/v1/mqtt-credentials", json={"device": device})
        return MqttCredential(
            username=str(data["username"]),
            client_id=str(data["client_id"]),
            password=str(data["password"]),
            expires_at=datetime.fromisoformat(data["expires_at"]),
        )

    async def _get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return await self._call("GET", path, params=params)

    async def _call(self, method: str, path: str, **options: Any) -> Any:
        headers = {"Authorization": f"Bearer {await self._bearer()}"}
        response = await self._request(method, path, headers=headers, **options)
        if response.status_code == 401:  # expired meanwhile: once more with a new one
            self._token = None
            headers = {"Authorization": f"Bearer {await self._bearer()}"}
            response = await self._request(method, path, headers=headers, **options)
        return self._json(response)

    async def _request(self, method: str, path: str, **options: Any) -> httpx.Response:
        # httpx's own errors stay inside: an app catches the SDK's tree only.
        try:
            return await self._http.request(method, path, **options)
        except httpx.TransportError as exc:
            raise ConnectError(
                UNREACHABLE, f"history API at {self._http.base_url}: {exc!r}"
            ) from exc

    async def _bearer(self) -> str:
        if self._token is None or time.monotonic() > self._token_expires:
            response = await self._request(
                "POST",
                "/v1/tokens",
                data={"username": self._username, "password": self._password},
            )
            body = self._json(response)
            self._token = str(body["access_token"])
            # Renew a minute early rather than fail a request on the boundary.
            self._token_expires = time.monotonic() + float(body["expires_in"]) - 60
        return self._token

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                code, detail = str(error["code"]), str(error["detail"])
            except (ValueError, KeyError, TypeError):
                # Not the API's error body: something in front of it answered.
                code, detail = UNEXPECTED_RESPONSE, response.text[:200]
            raise HistoryError(response.status_code, code, detail)
        try:
            return response.json()
        except ValueError:
            raise HistoryError(
                response.status_code, UNEXPECTED_RESPONSE, response.text[:200]
            ) from None
