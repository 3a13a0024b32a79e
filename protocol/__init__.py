"""The mqchat wire contract, protocol v1.

Everyone imports this package; it imports nothing of ours. It owns:

* ``topics``: building and parsing every topic string;
* ``models``: one pydantic model per payload kind;
* ``codec``: ``decode(topic, payload)`` and ``encode(model)``;
* ``errors``: the stable error codes and :class:`ProtocolError`;
* ``acl``: who may publish and subscribe where.

::

    device --up/msg--> broker --> bridge: decode -> persist -> publish down/msg, down/receipt
"""

from . import acl, errors, topics
from .codec import Decoded, Uplink, decode, encode
from .errors import ProtocolError
from .models import (
    MAX_BODY_CHARS,
    MAX_GROUP_NAME_CHARS,
    MAX_PAYLOAD_BYTES,
    ContactPresence,
    DownMessage,
    DownPresence,
    DownTyping,
    ErrorPayload,
    Presence,
    Receipt,
    UpAck,
    UpGroup,
    UpMessage,
    UpPresence,
    UpTyping,
)

VERSION = "v1"

__all__ = [
    "MAX_BODY_CHARS",
    "MAX_GROUP_NAME_CHARS",
    "MAX_PAYLOAD_BYTES",
    "VERSION",
    "ContactPresence",
    "Decoded",
    "DownMessage",
    "DownPresence",
    "DownTyping",
    "ErrorPayload",
    "Presence",
    "ProtocolError",
    "Receipt",
    "UpAck",
    "UpGroup",
    "UpMessage",
    "UpPresence",
    "UpTyping",
    "Uplink",
    "acl",
    "decode",
    "encode",
    "errors",
    "topics",
]
