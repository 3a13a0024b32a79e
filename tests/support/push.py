"""A real push service for the tests: HTTPS on loopback, checking what a push service
checks and decrypting what only the device could.

:class:`PushReceiver` serves ``https://127.0.0.1:<port>/<path>`` with a certificate made
here (``cryptography``), trusted by the push daemon through ``MQCHAT_PUSH_CA_FILE``
and allowed through ``MQCHAT_PUSH_ALLOW_HOSTS=127.0.0.1``. For every POST it checks
the VAPID JWT (RFC 8292: ES256 signature by the key in ``k``, ``aud`` = this origin,
``exp`` within 24 h, a ``sub``), the headers (``TTL``, ``Urgency``, ``Topic``,
``Content-Encoding: aes128gcm``), and decrypts the body (RFC 8291 + RFC 8188) with the
:class:`DeviceKeys` of the subscription the path belongs to. Each path can be told to
answer with other statuses first (410, 429 with ``Retry-After``).

Nothing here reuses the daemon's crypto (``http_ece``, ``py_vapid``): the decryption
and the signature check are written from the RFCs, so a mistake on either side shows.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from .services import LOOPBACK


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _hkdf(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


@dataclass(frozen=True)
class DeviceKeys:
    """What a browser keeps of a push subscription: its P-256 key pair and auth secret."""

    private: ec.EllipticCurvePrivateKey
    auth: bytes

    @classmethod
    def new(cls) -> DeviceKeys:
        return cls(ec.generate_private_key(ec.SECP256R1()), os.urandom(16))

    @property
    def public_bytes(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )

    def subscription_keys(self) -> dict[str, str]:
        return {"p256dh": b64url(self.public_bytes), "auth": b64url(self.auth)}

    def decrypt(self, body: bytes) -> bytes:
        """RFC 8291 ``aes128gcm``: one record, header ``salt | rs | idlen | keyid``."""
        salt, record_size, id_length = body[:16], int.from_bytes(body[16:20], "big"), body[20]
        sender_key = body[21 : 21 + id_length]
        ciphertext = body[21 + id_length :]
        assert id_length == 65, "keyid must be the sender's uncompressed P-256 key"
        assert len(ciphertext) <= record_size, "one record expected"
        sender = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), sender_key)
        shared = self.private.exchange(ec.ECDH(), sender)
        key_info = b"WebPush: info\x00" + self.public_bytes + sender_key
        ikm = _hkdf(self.auth, shared, key_info, 32)
        cek = _hkdf(salt, ikm, b"Content-Encoding: aes128gcm\x00", 16)
        nonce = _hkdf(salt, ikm, b"Content-Encoding: nonce\x00", 12)
        padded = AESGCM(cek).decrypt(nonce, ciphertext, None)
        unpadded = padded.rstrip(b"\x00")
        assert unpadded[-1:] == b"\x02", "the last record ends with delimiter 0x02"
        return unpadded[:-1]


def verify_vapid(authorization: str, audience: str) -> dict[str, Any]:
    """The claims of a ``vapid t=<jwt>, k=<key>`` header, after checking RFC 8292."""
    scheme, _, params = authorization.partition(" ")
    assert scheme == "vapid", authorization
    parts = dict(p.strip().split("=", 1) for p in params.split(","))
    token, key = parts["t"], parts["k"]
    header_b64, claims_b64, signature_b64 = token.split(".")
    header = json.loads(unb64url(header_b64))
    assert header["alg"] == "ES256", header
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64url(key))
    raw = unb64url(signature_b64)
    assert len(raw) == 64, "ES256 JWS signatures are r || s, 64 bytes"
    signature = encode_dss_signature(
        int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    )
    public.verify(signature, f"{header_b64}.{claims_b64}".encode(), ec.ECDSA(hashes.SHA256()))
    claims: dict[str, Any] = json.loads(unb64url(claims_b64))
    assert claims["aud"] == audience, claims
    assert time.time() < claims["exp"] <= time.time() + 24 * 3600, claims
    assert str(claims["sub"]).startswith(("mailto:", "https:")), claims
    claims["k"] = key
    return claims


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    claims: dict[str, Any]
    payload: dict[str, Any]
    at: float


@dataclass
class _Endpoint:
    keys: DeviceKeys
    #: Statuses to answer before the usual 201, with headers: ``(429, {"Retry-After": "1"})``.
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    tries: int = 0


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for ``127.0.0.1`` and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mqchat test push service")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "push-cert.pem", directory / "push-key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class PushReceiver:
    """The push service: ``endpoint()`` makes a subscription; ``received`` what came."""

    def __init__(self, directory: Path) -> None:
        self.cert_file, key_file = self_signed(directory)
        self._endpoints: dict[str, _Endpoint] = {}
        self.received: list[Received] = []
        #: Every request with its answer: (path, status).
        self.answers: list[tuple[str, int]] = []
        self.failures: list[str] = []
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            # Keep-alive, as a push service: the daemon reuses its connections.
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                receiver._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, key_file)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self.origin = f"https://{LOOPBACK}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def endpoint(
        self, name: str, *script: tuple[int, dict[str, str]], keys: DeviceKeys | None = None
    ) -> tuple[str, DeviceKeys]:
        """A new subscription's URL and the device's keys; ``script``: answers first."""
        keys = keys or DeviceKeys.new()
        with self._changed:
            self._endpoints[f"/{name}"] = _Endpoint(keys, list(script))
        return f"{self.origin}/{name}", keys

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("Content-Length", "0"))
        body = request.rfile.read(length)
        path = request.path
        with self._changed:
            endpoint = self._endpoints.get(path)
        status, headers = 201, {}
        try:
            if endpoint is None:
                status = 404
            elif endpoint.script:
                status, headers = endpoint.script.pop(0)
            else:
                received = self._check(path, request, body, endpoint.keys)
                with self._changed:
                    self.received.append(received)
        except Exception as exc:  # a check failed: the test reads it from failures
            with self._changed:
                self.failures.append(f"{path}: {exc!r}")
            status = 400
        with self._changed:
            self.answers.append((path, status))
            self._changed.notify_all()
        request.send_response(status)
        for name, value in headers.items():
            request.send_header(name, value)
        request.send_header("Content-Length", "0")
        request.end_headers()

    def _check(
        self, path: str, request: BaseHTTPRequestHandler, body: bytes, keys: DeviceKeys
    ) -> Received:
        headers = {name.lower(): value for name, value in request.headers.items()}
        claims = verify_vapid(headers["authorization"], self.origin)
        assert headers["content-encoding"] == "aes128gcm", headers
        assert int(headers["ttl"]) >= 0, headers
        assert headers["urgency"] in {"very-low", "low", "normal", "high"}, headers
        topic = headers["topic"]
        assert len(topic) <= 32, topic
        assert all(c.isalnum() or c in "-_" for c in topic), topic
        payload = json.loads(keys.decrypt(body))
        return Received(path, headers, claims, payload, time.monotonic())

    def wait_for(
        self, predicate: Callable[[PushReceiver], bool], timeout: float, what: str
    ) -> None:
        """Block until ``predicate`` holds (checked at every request), or raise."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"timed out waiting for {what}; answers {self.answers}, "
                        f"failures {self.failures}"
                    )
                self._changed.wait(left)

    def to(self, name: str) -> list[Received]:
        with self._changed:
            return [r for r in self.received if r.path == f"/{name}"]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


async def register(
    api: httpx.AsyncClient, receiver: PushReceiver, device: str, name: str, *script: Any
) -> DeviceKeys:
    """Register ``device`` of the user ``api`` is signed in as for Web Push, at the
    receiver's endpoint ``name`` (``script``: its first answers); the device's keys."""
    endpoint, keys = receiver.endpoint(name, *script)
    response = await api.post(
        f"/v1/devices/{device}/push",
        json={"channel": "webpush", "endpoint": endpoint, "keys": keys.subscription_keys()},
    )
    assert response.status_code == 201, response.text
    return keys
