"""The SDK's public surface is deliberate: exactly these names, each documented; and
every failure it raises is an ``MqchatError`` with a documented, stable code.

An app imports ``mqchat`` and nothing behind it; adding or removing a name is a
change to the API, so it changes the snapshot ``tests/data/sdk_public_api.txt``, the
CHANGELOG and docs/sdk.md with it, as API-report tools pin a library's surface.
The errors are provoked for real: refusals by the bridge and the broker of each stack,
the history API's answers, an address nobody listens on, and an HTTP server that is
not the API.
"""

from __future__ import annotations

import asyncio
import http.server
import inspect
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import mqchat
from mqchat import (
    ChatClient,
    ConnectError,
    ConnectRefused,
    HistoryClient,
    HistoryError,
    MessageRefused,
    MqchatError,
    SendTimeout,
    _exceptions,
)
from protocol import MAX_BODY_CHARS, errors

from .support.services import free_port
from .support.stack import Stack, password_of

DOCS = Path(__file__).resolve().parents[1] / "docs"
WAIT = 30.0

#: The public API, one name a line: the snapshot an API change updates on purpose.
PUBLIC_API = Path(__file__).resolve().parent / "data" / "sdk_public_api.txt"


def documented_codes(doc: str) -> set[str]:
    """The codes in the first column of a doc's error table (``| `code` | ...``)."""
    text = (DOCS / doc).read_text()
    errors_section = text.split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z0-9_]+)` \|", errors_section, re.M))


def test_all_is_exactly_the_public_api() -> None:
    pinned = PUBLIC_API.read_text().split()
    assert pinned == sorted(set(pinned)), f"{PUBLIC_API.name}: one name a line, sorted, once"
    public = set(pinned)
    exported = set(mqchat.__all__)
    assert exported == public, (
        f"mqchat.__all__ is not the API pinned in tests/data/{PUBLIC_API.name} "
        f"(added: {sorted(exported - public)}, removed: {sorted(public - exported)}). "
        "If the change is deliberate, edit that file to match, and say it in CHANGELOG.md "
        "and docs/sdk.md."
    )
    assert len(mqchat.__all__) == len(public)
    exposed = {name for name in vars(mqchat) if not name.startswith("_")}
    assert exposed == public, "a public name outside __all__ (or __all__ names a missing one)"


def own_docstring(obj: object) -> str:
    doc = obj.__doc__ or ""
    # A dataclass without a docstring gets its signature as one.
    name = getattr(obj, "__name__", "")
    return "" if doc.startswith(f"{name}(") else doc.strip()


def test_every_public_name_and_method_has_a_docstring() -> None:
    missing = [name for name in mqchat.__all__ if not own_docstring(getattr(mqchat, name))]
    for name in ("ChatClient", "HistoryClient"):
        cls = getattr(mqchat, name)
        for attr, value in vars(cls).items():
            method = inspect.isfunction(value) or isinstance(value, property)
            if method and not attr.startswith("_") and not (value.__doc__ or "").strip():
                missing.append(f"{name}.{attr}")
    assert missing == []


def test_one_error_tree() -> None:
    for name in mqchat.__all__:
        value = getattr(mqchat, name)
        if isinstance(value, type) and issubclass(value, BaseException):
            assert issubclass(value, mqchat.MqchatError), name
    assert issubclass(mqchat.ConnectRefused, mqchat.ConnectError)
    # The tree drawn in _exceptions.py names every class in it.
    for name in ("MessageRefused", "HistoryError", "SendTimeout", "ConnectError", "ConnectRefused"):
        assert f"── {name}" in (_exceptions.__doc__ or ""), name


def test_the_sdk_codes_are_its_own_and_documented() -> None:
    """The SDK's codes never cross the wire, so they are not protocol codes, and they
    must not shadow one; docs/sdk.md lists them, docs/protocol.md the server's."""
    assert _exceptions.SDK_ERROR_CODES.isdisjoint(errors.ERROR_CODES)
    assert documented_codes("sdk.md") == _exceptions.SDK_ERROR_CODES
    assert documented_codes("protocol.md") == errors.ERROR_CODES


# -- every error, provoked ---------------------------------------------------------


def documented(error: MqchatError) -> str:
    """The error's code, once checked to be in docs/protocol.md's or docs/sdk.md's table."""
    assert error.code in documented_codes("protocol.md") | documented_codes("sdk.md"), error
    return error.code


async def test_refusals_by_the_bridge_and_the_broker(stack: Stack) -> None:
    await stack.add_users("alice", "bob")
    alice = await stack.client("alice")

    with pytest.raises(MessageRefused) as refused:
        await alice.send("hi", to="nobody", id="m-unknown", timeout=WAIT)
    assert (documented(refused.value), refused.value.id) == ("unknown_recipient", "m-unknown")

    # Checked before sending, as the bridge would.
    with pytest.raises(MessageRefused) as refused:
        await alice.send("x" * (MAX_BODY_CHARS + 1), to="bob", id="m-long")
    assert (documented(refused.value), refused.value.id) == ("body_too_large", "m-long")
    with pytest.raises(MessageRefused) as refused:
        await alice.send("hi", to="bob", conversation="c_1")
    assert documented(refused.value) == "invalid_payload"

    # No time to wait at all: the message stays in the outbox and still lands.
    with pytest.raises(SendTimeout) as late:
        await alice.send("in a moment", to="bob", id="m-late", timeout=0)
    assert (documented(late.value), late.value.id) == ("send_timeout", "m-late")
    assert "m-late" in alice.pending
    stored = await alice.send("in a moment", to="bob", id="m-late", timeout=WAIT)
    assert stored.id == "m-late"

    # A refusal nobody awaits (an ack) arrives on .errors.
    await alice.mark_read("c_1", 1)
    queued = await asyncio.wait_for(alice.errors.get(), WAIT)
    assert isinstance(queued, MessageRefused)
    assert documented(queued) == "unknown_conversation"

    intruder = ChatClient(
        host=stack.host, port=stack.port, username="alice", password="not-hers", device="x"
    )
    with pytest.raises(ConnectRefused) as connect_refused:
        await intruder.connect()
    await intruder.close()
    assert documented(connect_refused.value) == "connect_refused"
    assert connect_refused.value.reason  # the broker's own words, which differ per broker
    assert isinstance(connect_refused.value, ConnectError)


async def test_the_history_apis_answers(embedded: Stack) -> None:
    await embedded.add_users("alice")
    api = await embedded.start_api()

    history = HistoryClient(api, "alice", password_of("alice"))
    with pytest.raises(HistoryError) as unknown:
        await history.presence("nobody")
    assert (unknown.value.status, documented(unknown.value)) == (404, "unknown_user")
    await history.close()

    wrong = HistoryClient(api, "alice", "not-her-password")
    with pytest.raises(HistoryError) as unauthorized:
        await wrong.conversations()
    assert (unauthorized.value.status, documented(unauthorized.value)) == (401, "unauthorized")
    await wrong.close()

    # connect() reads the device's cursors first: the API's refusal is raised as it is.
    client = ChatClient(
        host=embedded.host,
        port=embedded.port,
        username="alice",
        password=password_of("alice"),
        history=HistoryClient(api, "alice", "not-her-password"),
    )
    with pytest.raises(HistoryError) as at_connect:
        await client.connect()
    assert documented(at_connect.value) == "unauthorized"
    await client.close()


async def test_nobody_listening() -> None:
    port = free_port()
    broker = ChatClient(host="127.0.0.1", port=port, username="alice", password="secret-pw")
    with pytest.raises(ConnectError) as unreachable:
        await broker.connect()
    await broker.close()
    assert documented(unreachable.value) == "unreachable"

    history = HistoryClient(f"http://127.0.0.1:{port}", "alice", "secret-pw")
    with pytest.raises(ConnectError) as unreachable:
        await history.conversations()
    await history.close()
    assert documented(unreachable.value) == "unreachable"


class _NotTheApi(http.server.BaseHTTPRequestHandler):
    """What a proxy in front of a stopped API says: an error page, not the API's body."""

    def do_POST(self) -> None:
        body = b"<html>502 Bad Gateway</html>"
        self.send_response(502)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def not_the_api() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotTheApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(WAIT)


async def test_an_answer_that_is_not_the_apis(not_the_api: str) -> None:
    history = HistoryClient(not_the_api, "alice", "secret-pw")
    with pytest.raises(HistoryError) as odd:
        await history.conversations()
    await history.close()
    assert (odd.value.status, documented(odd.value)) == (502, "unexpected_response")
    assert "Bad Gateway" in odd.value.detail
