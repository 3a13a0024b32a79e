"""The mqchat SDK for Python: one device's chat connection, the history API, one error tree.

::

    import asyncio

    import mqchat


    async def main() -> None:
        history = mqchat.HistoryClient("http://127.0.0.1:8000", "alice", "alices-password")
        async with mqchat.ChatClient(
            host="127.0.0.1", port=1883, username="alice", password="alices-password",
            device="laptop", history=history,
        ) as me:
            try:
                sent = await me.send("hi", to="bob", timeout=30)  # returns once stored
            except mqchat.MqchatError as exc:  # .code: stable, to switch on
                print(exc.code, exc.detail)
            async for message in me.messages():  # in seq order, each once
                print(f"{message.sender}: {message.body}")


    asyncio.run(main())

A device that should not hand the account password to the broker (a shared machine,
anything that stores it) signs in over HTTP instead, and connects with short-lived MQTT
credentials fetched on every (re)connect::

    me = mqchat.ChatClient.sign_in(
        "http://127.0.0.1:8000", "alice", "alices-password",
        host="127.0.0.1", port=1883, device="laptop",
    )

The names below are the whole public API (``tests/test_sdk_api.py`` pins them to the
snapshot ``tests/data/sdk_public_api.txt``); the ``_``-modules behind them may change.
docs/sdk.md has the guide and the error codes.
"""

from core.mqtt import tls_context
from protocol import DownTyping, Presence, Receipt

from ._client import ChatClient, ChatMessage, Sent
from ._exceptions import (
    ConnectError,
    ConnectRefused,
    HistoryError,
    MessageRefused,
    MqchatError,
    SendTimeout,
)
from ._history import ConversationState, GroupMember, HistoryClient, MqttCredential

__all__ = [
    "ChatClient",
    "ChatMessage",
    "ConnectError",
    "ConnectRefused",
    "ConversationState",
    "DownTyping",
    "GroupMember",
    "HistoryClient",
    "HistoryError",
    "MessageRefused",
    "MqchatError",
    "MqttCredential",
    "Presence",
    "Receipt",
    "SendTimeout",
    "Sent",
    "tls_context",
]
