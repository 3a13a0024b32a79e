"""paho-mqtt's client with four of its private methods replaced; with ``core/mqtt.py``
the only module that imports paho.

The replacements live apart from the link that uses them because they are bound to
paho's internals, not to its API: each one overrides a private method of paho-mqtt
2.2's ``Client`` and reads private attributes (``_sock``, ``_in_packet``,
``_out_messages``, ...). ``pyproject.toml`` pins paho to that minor version for this
module, and ``tests/test_paho_overrides.py`` proves each replacement does its job on a
real socket or broker, and checks that the names and signatures it replaces are still
paho's, so that an upgrade fails there, in one place, instead of in production.

To move to a newer paho: read that version's ``_sock_recv``, ``_sock_close``,
``_handle_pubackcomp`` and ``_ssl_wrap_socket``, port (or drop) each override below,
update the expected signatures in the test, then widen the pin.
"""

from __future__ import annotations

import socket
import ssl
import struct
from typing import Any, Final, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

#: What every MQTT 3.1.1 PUBACK reports to ``on_publish``: the protocol has no reason
#: code or properties there, so one shared pair stands for all of them.
PUBACK_SUCCESS: Final = (
    ReasonCode(PacketTypes.PUBACK, "Success"),
    Properties(PacketTypes.PUBACK),  # type: ignore[no-untyped-call]
)


class PahoClient(paho.Client):
    """paho's client that reads ahead, acknowledges 3.1.1 publishes cheaply, and closes
    the socket of a failed TLS handshake.

    Everything else (packet decoding, sessions, keepalive, callbacks) is paho's own;
    ``core.mqtt.MqttLink`` drives it from the asyncio loop.
    """

    #: Bytes asked of the socket per system call: several packets' worth for chat.
    READ_AHEAD = 65536

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._ahead = b""
        self._ahead_pos = 0
        super().__init__(*args, **kwargs)

    def buffered(self) -> int:
        """Bytes read from the socket that paho has not taken yet.

        The event loop cannot see them (the socket is not readable any more), so the
        owner must call ``loop_read`` again while this is not zero.
        """
        return len(self._ahead) - self._ahead_pos

    def drop_socket(self) -> None:
        """Close the connection without DISCONNECT, as a crash would (the will fires).

        paho has no public call for this; ``_sock_close`` is what its own loop uses,
        and it reports the close through ``on_socket_close``.
        """
        self._sock_close()

    def _sock_recv(self, bufsize: int) -> bytes:
        """Read up to :attr:`READ_AHEAD` bytes at once and hand paho its pieces from memory.

        Why: paho's ``_packet_read`` asks for each packet in pieces (the type byte,
        each remaining-length byte, then the body), one ``recv`` each. A busy link (the
        bridge) spent a fifth of its loop in those calls (py-spy); this makes it one
        call per socket wake-up.

        Replaces: ``Client._sock_recv(self, bufsize)`` of paho-mqtt 2.2, which is a
        bare ``self._sock.recv(bufsize)`` that maps TLS want-read/want-write to
        ``BlockingIOError`` and returns ``b""`` on a closed connection. Calling it with
        a bigger ``bufsize`` keeps that mapping.

        If paho changed it: if ``_packet_read`` stopped going through ``_sock_recv``,
        the read-ahead would silently stop (slower, still correct); if it read the
        socket some other way as well, bytes already buffered here would be skipped
        and the stream corrupted. The buffer must be dropped with the socket
        (:meth:`_sock_close`), or a new connection would start with the old one's bytes.
        """
        if self._ahead_pos >= len(self._ahead):
            data = super()._sock_recv(max(bufsize, self.READ_AHEAD))
            if len(data) <= bufsize:
                return data  # all of it wanted (or b"": the connection closed)
            self._ahead, self._ahead_pos = data, 0
        start = self._ahead_pos
        self._ahead_pos = min(start + bufsize, len(self._ahead))
        return self._ahead[start : self._ahead_pos]

    def _sock_close(self) -> None:
        """Forget the bytes read ahead from the connection being closed.

        Why: they belong to that connection; served after a reconnect they would be
        parsed as the start of the new one's stream.

        Replaces: ``Client._sock_close(self)`` of paho-mqtt 2.2 (extends it: paho's
        own close runs after). paho calls it on every way a connection ends and at the
        start of ``reconnect()``.

        If paho changed it: if a reconnect stopped passing through ``_sock_close``,
        stale bytes would reach the new connection's parser (a protocol error, or old
        messages delivered again).
        """
        self._ahead, self._ahead_pos = b"", 0
        super()._sock_close()

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        """Read an MQTT 3.1.1 PUBACK's packet id directly; report :data:`PUBACK_SUCCESS`.

        Why: a 3.1.1 PUBACK is nothing but a packet id, yet paho 2.2 decodes each into
        a new ``ReasonCode`` and ``Properties`` (15 µs, against 0.1 µs for the id
        alone), and the bridge handles three PUBACKs per chat message. PUBCOMP, MQTT 5
        and anything not exactly two bytes long go to paho's own code and checks.

        Replaces: ``Client._handle_pubackcomp(self, cmd)`` of paho-mqtt 2.2, which
        decodes the packet (``_packet.decode_puback``) and, under
        ``_out_message_mutex``, calls ``_do_on_publish(mid, reason, properties)`` once
        for a ``mid`` still in ``_out_messages``.

        If paho changed it: the fast path copies that bookkeeping. If
        ``_do_on_publish`` stopped removing the message and releasing the in-flight
        slot, or the names ``_in_packet``/``_out_messages``/``_out_message_mutex``
        changed, publishes would never complete (the bridge would stall on its
        in-flight limit) or this would raise on every PUBACK.
        """
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or self._protocol != MQTTProtocolVersion.MQTTv311 or len(packet) != 2:
            return super()._handle_pubackcomp(cmd)
        (mid,) = struct.unpack("!H", packet)
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, *PUBACK_SUCCESS)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _ssl_wrap_socket(self, tcp_sock: socket.socket) -> ssl.SSLSocket:
        """Wrap and handshake, closing the socket if the handshake fails.

        Why: paho 2.2 leaves the half-made ``SSLSocket`` open when the handshake fails
        (say, a broker certificate the client does not trust), one descriptor per
        reconnect attempt until the garbage collector finds it. Host names are checked
        by the context itself (``check_hostname``, which ``core.mqtt.LinkConfig``
        insists on), so paho's ``ssl.match_hostname`` fallback is not needed (and
        Python 3.12 removed it).

        Replaces: ``Client._ssl_wrap_socket(self, tcp_sock)`` of paho-mqtt 2.2, which
        ``_create_socket`` calls on the connected TCP socket when TLS is set; it reads
        ``_ssl_context``, ``_host`` and ``_connect_timeout``.

        If paho changed it: if ``_create_socket`` stopped calling it, failed handshakes
        would leak descriptors again (a broker with a bad certificate and a link
        retrying would run the process out of them); if those attributes were
        renamed, every TLS connect would fail here.
        """
        context = self._ssl_context
        if context is None:  # paho calls this only once a context is set
            raise ValueError("no TLS context")
        ssl_sock = context.wrap_socket(
            tcp_sock, server_hostname=self._host, do_handshake_on_connect=False
        )
        try:
            ssl_sock.settimeout(self._connect_timeout)
            ssl_sock.do_handshake()
        except BaseException:
            ssl_sock.close()
            raise
        return ssl_sock
