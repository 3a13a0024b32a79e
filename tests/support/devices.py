"""A device as a stock MQTT client: subscribed to its user's ``down/#``, keeping what
arrives per kind, with the uplinks a group test sends (``up``, ``op``, ``send``).

Shared by tests/test_groups.py and tests/test_group_receipts.py: the contract alone,
no SDK.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

from core.mqtt import Incoming, LinkConfig, MqttLink
from protocol import topics

from .stack import Stack, password_of

WAIT = 15.0


class Device:
    """One device of a user: a stock client subscribed to its ``down/#``, keeping what
    arrives per kind."""

    def __init__(self, stack: Stack, user: str) -> None:
        self.stack = stack
        self.user = user
        self.link: MqttLink | None = None
        self.kinds: dict[str, asyncio.Queue[dict[str, Any]]] = {
            kind: asyncio.Queue() for kind in topics.DOWN_KINDS
        }

    def on_message(self, m: Incoming) -> None:
        kind = m.topic.rsplit("/", 1)[-1]
        self.kinds[kind].put_nowait(json.loads(m.payload))

    async def start(self, *, client_id: str | None = None, clean: bool = True) -> Device:
        if clean:
            self.link = await self.stack.raw(
                self.user, client_id=client_id, on_message=self.on_message
            )
        else:
            self.link = MqttLink(
                LinkConfig(
                    host=self.stack.host,
                    port=self.stack.port,
                    username=self.user,
                    password=password_of(self.user),
                    client_id=client_id or f"{self.user}:persistent",
                    clean_session=False,
                ),
                on_message=self.on_message,
            )
            await self.link.connect()
        await self.link.subscribe(topics.down_all(self.user), qos=1)
        return self

    async def close(self) -> None:
        assert self.link is not None
        await self.link.close()

    async def up(self, kind: str, **payload: Any) -> None:
        assert self.link is not None
        await self.link.publish(
            f"chat/v1/u/{self.user}/up/{kind}", json.dumps(payload).encode(), qos=1
        )

    async def op(self, op: str, **fields: Any) -> dict[str, Any]:
        """A group change, answered: its ``sent`` receipt."""
        fields.setdefault("id", f"op-{secrets.token_hex(4)}")
        await self.up("group", op=op, **fields)
        receipt = await self.next("receipt")
        assert (receipt["status"], receipt["id"]) == ("sent", fields["id"]), receipt
        return receipt

    async def refused(self, op: str, **fields: Any) -> str:
        fields.setdefault("id", f"op-{secrets.token_hex(4)}")
        await self.up("group", op=op, **fields)
        error = await self.next("error")
        assert error["id"] == fields["id"], error
        return str(error["code"])

    async def send(self, conversation: str, body: str) -> dict[str, Any]:
        message_id = f"m-{secrets.token_hex(4)}"
        await self.up("msg", id=message_id, conversation=conversation, body=body)
        receipt = await self.next("receipt")
        assert (receipt["status"], receipt["id"]) == ("sent", message_id), receipt
        return receipt

    async def next(self, kind: str) -> dict[str, Any]:
        return await asyncio.wait_for(self.kinds[kind].get(), WAIT)

    async def messages(self, count: int) -> list[dict[str, Any]]:
        return [await self.next("msg") for _ in range(count)]


async def devices(stack: Stack, *users: str) -> list[Device]:
    await stack.add_users(*users)
    return [await Device(stack, user).start() for user in users]
