"""Every error the SDK raises, one tree, each with a stable ``.code`` to switch on::

    MqchatError              .code, .detail
    ├── MessageRefused       the bridge refused an uplink (``down/error``), or the SDK
    │                        refused a message before sending it, as the bridge would (.id)
    ├── HistoryError         the history API answered with an error status (.status)
    ├── SendTimeout          no ``sent`` receipt in time; the message stays in the outbox (.id)
    └── ConnectError         the broker or the history API cannot be reached, or the
        │                    connection dropped before it was ready
        └── ConnectRefused   the broker refused to connect this user (.reason)

A code the server sends is one of ``protocol.errors.ERROR_CODES`` (``unknown_recipient``,
``unauthorized``, ...), the same on MQTT and HTTP (docs/protocol.md, "Errors"). The
SDK's own failures, which never cross the wire, have the codes below
(docs/sdk.md, "Errors"); none of them is a server code.
"""

from __future__ import annotations

from typing import Final

#: No ``sent`` receipt within ``send(timeout=...)``.
SEND_TIMEOUT: Final = "send_timeout"
#: The broker answered CONNACK with a refusal (wrong credentials, a disabled account,
#: a throttled sign-in); ``.reason`` says which.
CONNECT_REFUSED: Final = "connect_refused"
#: Nobody answered at the address, TLS failed, or no answer came in time.
UNREACHABLE: Final = "unreachable"
#: The connection was up and dropped before the operation finished.
CONNECTION_LOST: Final = "connection_lost"
#: The history API's address answered an error that is not the API's (a proxy's page).
UNEXPECTED_RESPONSE: Final = "unexpected_response"

#: The codes the SDK gives its own errors, beside the server's.
SDK_ERROR_CODES: Final[frozenset[str]] = frozenset(
    {SEND_TIMEOUT, CONNECT_REFUSED, UNREACHABLE, CONNECTION_LOST, UNEXPECTED_RESPONSE}
)


class MqchatError(Exception):
    """The root of the SDK's errors: ``except MqchatError`` catches every one.

    Attributes:
        code: stable; a server's code (``protocol.errors``) or one of the SDK's own.
        detail: for people, not for matching: its wording may change.
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class MessageRefused(MqchatError):
    """The bridge refused an uplink, or the SDK refused a message before sending it.

    Nothing was stored. Raised by :meth:`ChatClient.send` for its message; a refused
    ack, typing or presence (or a message nobody awaits) goes to
    :attr:`ChatClient.errors` instead.

    Attributes:
        id: the message's id, where the refusal names one.
    """

    def __init__(self, code: str, detail: str, id: str | None = None) -> None:
        super().__init__(code, detail)
        self.id = id


class SendTimeout(MqchatError):
    """No ``sent`` receipt in time. It may or may not be stored: the message stays
    in the outbox and is still resent; sending again with the same ``id`` is safe.

    Attributes:
        id: the message's id, to send it again with.
    """

    def __init__(self, id: str) -> None:
        super().__init__(SEND_TIMEOUT, "no 'sent' receipt yet; still in the outbox")
        self.id = id


class HistoryError(MqchatError):
    """The history API answered with an error status.

    A 5xx is worth retrying later (the SDK's own catch-up does); a 4xx is not.

    Attributes:
        status: the HTTP status.
    """

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(code, detail)
        self.status = status

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.detail}"


class ConnectError(MqchatError):
    """The broker or the history API cannot be reached, or dropped the connection
    before it was ready (``unreachable``, ``connection_lost``). Worth retrying later."""


class ConnectRefused(ConnectError):
    """The broker refused to connect this user: check the credentials.

    Attributes:
        reason: the broker's CONNACK reason (``Not authorized``, ``Server unavailable``).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(CONNECT_REFUSED, f"the broker refused the connection: {reason}")
        self.reason = reason
