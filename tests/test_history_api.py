"""The history API on both databases: tokens, conversations, pages, traces, presence, search.

Every test runs on a migrated SQLite file and on a fresh PostgreSQL database copied
from the session's migrated template. Data comes in through the real code paths
(``store.accounts.create``, ``store.messages.persist_batch``); only cursors are written
as rows here, until the bridge that moves them lands. Requests go through the real
app, inside its lifespan, over httpx's ASGI transport.

The world every test starts from::

    alice ── bob        "ab": a direct conversation
    alice ── carol      "ac": a direct conversation
    carol ── dave       "cd": a direct conversation alice is not in
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from sqlalchemy import Engine, column, delete, event, insert, table
from sqlmodel import Session, select

from history_api import ApiSettings, deps
from protocol import DownMessage, UpMessage
from store import accounts, make_engine, migrate, search, tokens
from store.db import alembic_config, reading
from store.messages import persist_batch
from store.tables import Conversation, Device, Member, Message

from .support.history import (
    As,
    add_users,
    as_user,
    at,
    error_of,
    move_cursor,
    postgres_database,
    send,
    send_many,
    serve,
    set_device,
    sign_in,
    sqlite_database,
)
from .support.services import PostgresServer
from .support.stack import password_of

MESSAGE_FIELDS = {"id", "conversation", "seq", "from", "body", "sent_at"}
BEARER_ENDPOINTS = [
    "/v1/conversations",
    "/v1/conversations/c_0123456789/messages",
    "/v1/messages/ab-1",
    "/v1/users/bob/presence",
    "/v1/search?q=hello",
]


# -- databases ---------------------------------------------------------------------


# -- writing data through the real code paths ---------------------------------------


# -- the world and the API ----------------------------------------------------------


@dataclass(frozen=True)
class World:
    ab: str
    ac: str
    cd: str


@pytest.fixture
def world(engine: Engine) -> World:
    add_users(engine, "alice", "bob", "carol", "dave")
    ab = send(engine, "alice", "hello bob", id="ab-1", to="bob").conversation
    ac = send(engine, "alice", "hello carol", id="ac-1", to="carol").conversation
    cd = send(engine, "carol", "hello dave", id="cd-1", to="dave").conversation
    return World(ab=ab, ac=ac, cd=cd)


def seqs(page: dict[str, Any]) -> list[int]:
    return [message["seq"] for message in page["messages"]]


def when(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


# -- tokens ---------------------------------------------------------------------------


async def test_token_signs_in_and_only_its_hash_is_stored(
    client: httpx.AsyncClient, world: World, engine: Engine
) -> None:
    response = await client.post(
        "/v1/tokens",
        data={"grant_type": "password", "username": "alice", "password": password_of("alice")},
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in"}
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 24 * 3600
    assert response.headers["cache-control"] == "no-store"
    alice = As(client, body["access_token"])
    assert [c["id"] for c in await alice.json("/v1/conversations")] == [world.ac, world.ab]
    with Session(engine) as session:
        stored = session.exec(select(tokens.Token)).all()
    assert [row.token_hash for row in stored] == [
        hashlib.sha256(body["access_token"].encode()).hexdigest()
    ]
    assert [row.username for row in stored] == ["alice"]


async def test_token_lifetime_comes_from_settings(database_url: str, world: World) -> None:
    async with serve(ApiSettings(database_url=database_url, token_ttl=90)) as api:
        response = await api.post(
            "/v1/tokens", data={"username": "bob", "password": password_of("bob")}
        )

    assert response.json()["expires_in"] == 90


@pytest.mark.parametrize(
    ("username", "password"),
    [("alice", "wrong-password"), ("nobody", "whatever-pw"), ("al/ice", "alice-secret-pw")],
    ids=["wrong-password", "unknown-user", "invalid-username"],
)
async def test_wrong_credentials_are_401(
    client: httpx.AsyncClient, world: World, username: str, password: str
) -> None:
    response = await client.post("/v1/tokens", data={"username": username, "password": password})

    assert error_of(response) == (401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b'{"username": "alice", "password": "alice-secret-pw"}', "application/json"),
        (b"username=alice", "application/x-www-form-urlencoded"),
        (
            b"grant_type=client_credentials&username=alice&password=alice-secret-pw",
            "application/x-www-form-urlencoded",
        ),
    ],
    ids=["json", "no-password", "other-grant"],
)
async def test_malformed_token_request_is_422(
    client: httpx.AsyncClient, world: World, content: bytes, content_type: str
) -> None:
    response = await client.post(
        "/v1/tokens", content=content, headers={"content-type": content_type}
    )

    assert error_of(response) == (422, "invalid_payload")


async def test_expired_and_unknown_tokens_are_401(
    client: httpx.AsyncClient, world: World, engine: Engine
) -> None:
    with Session(engine) as session:
        expired = tokens.issue(
            session, "alice", timedelta(hours=1), now=datetime.now(UTC) - timedelta(hours=2)
        )
        session.commit()
    live = await sign_in(client, "alice")

    for token in (expired.token, live[:-2], secrets.token_urlsafe(32)):
        response = await As(client, token).get("/v1/conversations")
        assert error_of(response) == (401, "unauthorized"), token
        assert response.headers["www-authenticate"] == "Bearer"
    assert (await As(client, live).get("/v1/conversations")).status_code == 200


async def test_a_disabled_account_loses_its_tokens(
    client: httpx.AsyncClient, world: World, engine: Engine
) -> None:
    bob = await as_user(client, "bob")
    with Session(engine) as session:
        accounts.set_disabled(session, "bob", True)
        session.commit()

    assert error_of(await bob.get("/v1/conversations")) == (401, "unauthorized")


@pytest.mark.parametrize("endpoint", BEARER_ENDPOINTS)
@pytest.mark.parametrize(
    "authorization", [None, "Bearer", "Bearer ", "Basic YWxpY2U6cHc=", "bearer nonsense"]
)
async def test_every_endpoint_needs_a_token(
    client: httpx.AsyncClient, endpoint: str, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await client.get(endpoint, headers=headers)

    assert error_of(response) == (401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


# -- conversations ----------------------------------------------------------------------


async def test_conversations_newest_first_with_last_message_and_unread(
    client: httpx.AsyncClient, world: World, engine: Engine
) -> None:
    # ab: 1 alice "hello bob", 2 alice, 3 bob, 4 bob, 5 bob
    send(engine, "alice", "are you there?", id="ab-2", conversation=world.ab)
    for n in (3, 4, 5):
        send(engine, "bob", f"bob says {n}", id=f"ab-{n}", conversation=world.ab)
    # alice read up to 3 on her phone and 4 on her laptop: 5 is unread.
    move_cursor(engine, world.ab, "alice", "phone", when=at(1), delivered=5, read=3)
    move_cursor(engine, world.ab, "alice", "laptop", when=at(2), delivered=4, read=4)
    # Other people's cursors, and alice's in another conversation, change nothing here.
    move_cursor(engine, world.ab, "bob", "phone", when=at(3), delivered=5, read=5)
    move_cursor(engine, world.ac, "alice", "phone", when=at(3), delivered=1, read=1)
    move_cursor(engine, world.cd, "carol", "phone", when=at(3), delivered=1, read=1)

    alice = await as_user(client, "alice")
    listed = await alice.json("/v1/conversations")

    assert [c["id"] for c in listed] == [world.ab, world.ac]
    ab, ac = listed
    assert set(ab) == {"id", "kind", "name", "members", "member", "last_message", "unread"}
    assert (ab["name"], ab["member"]) == (None, True)
    assert ab["kind"] == "direct"
    assert ab["members"] == ["alice", "bob"]
    assert ab["unread"] == 1
    last = ab["last_message"]
    assert set(last) == {"id", "seq", "from", "body", "sent_at"}
    assert (last["id"], last["seq"], last["from"], last["body"]) == ("ab-5", 5, "bob", "bob says 5")
    assert when(last["sent_at"]) is not None
    assert ac["members"] == ["alice", "carol"]
    assert ac["unread"] == 0  # the only message is alice's own
    assert ac["last_message"]["id"] == "ac-1"

    bob = await as_user(client, "bob")
    (bob_ab,) = await bob.json("/v1/conversations")
    assert bob_ab["id"] == world.ab
    assert bob_ab["unread"] == 0  # bob read everything; his own messages never count

    carol = await as_user(client, "carol")
    carol_view = {c["id"]: c["unread"] for c in await carol.json("/v1/conversations")}
    assert carol_view == {world.ac: 1, world.cd: 0}

    # New activity in ac moves it to the top.
    send(engine, "carol", "hi alice", id="ac-2", conversation=world.ac)
    listed = await alice.json("/v1/conversations")
    assert [(c["id"], c["unread"]) for c in listed] == [(world.ac, 1), (world.ab, 1)]


# -- pages ------------------------------------------------------------------------------


@pytest.fixture
def long_conversation(engine: Engine, world: World) -> str:
    """ab with 120 messages: seq n has id ab-n."""
    for outcome in persist_batch(
        engine,
        [
            (
                "alice" if n % 2 else "bob",
                UpMessage(id=f"ab-{n}", to=None, conversation=world.ab, body=f"number {n}"),
            )
            for n in range(2, 121)
        ],
    ):
        assert outcome.stored is not None
    return world.ab


async def test_pages_by_seq(client: httpx.AsyncClient, long_conversation: str) -> None:
    alice = await as_user(client, "alice")
    url = f"/v1/conversations/{long_conversation}/messages"

    async def page(**params: Any) -> tuple[list[int], bool]:
        body = await alice.json(url, **params)
        assert set(body) == {"messages", "has_more"}
        return seqs(body), body["has_more"]

    newest = await page()
    assert newest == (list(range(71, 121)), True)
    assert await page(limit=200) == (list(range(1, 121)), False)
    assert await page(limit=1) == ([120], True)
    assert await page(after=0) == (list(range(1, 51)), True)
    assert await page(after=100) == (list(range(101, 121)), False)
    assert await page(after=70, limit=50) == (list(range(71, 121)), False)
    assert await page(after=120) == ([], False)
    assert await page(before=71) == (list(range(21, 71)), True)
    assert await page(before=21) == (list(range(1, 21)), False)
    assert await page(before=1) == ([], False)
    assert await page(before=1000, limit=3) == ([118, 119, 120], True)
    assert await page(after=10, before=20) == (list(range(11, 20)), False)
    assert await page(after=10, before=100, limit=5) == ([11, 12, 13, 14, 15], True)


async def test_paging_walks_the_whole_history_once(
    client: httpx.AsyncClient, long_conversation: str
) -> None:
    alice = await as_user(client, "alice")
    url = f"/v1/conversations/{long_conversation}/messages"

    backwards: list[int] = []
    body = await alice.json(url, limit=17)
    while True:
        backwards = seqs(body) + backwards
        if not body["has_more"]:
            break
        body = await alice.json(url, limit=17, before=body["messages"][0]["seq"])
    forwards: list[int] = []
    cursor = 0
    while True:
        body = await alice.json(url, limit=23, after=cursor)
        forwards += seqs(body)
        if not body["has_more"]:
            break
        cursor = body["messages"][-1]["seq"]

    assert backwards == forwards == list(range(1, 121))


async def test_page_messages_are_downlink_messages(
    client: httpx.AsyncClient, long_conversation: str
) -> None:
    bob = await as_user(client, "bob")
    body = await bob.json(f"/v1/conversations/{long_conversation}/messages", after=0, limit=3)

    for message in body["messages"]:
        assert set(message) == MESSAGE_FIELDS
        DownMessage.model_validate(message)
    first, second, _ = body["messages"]
    assert (first["id"], first["from"], first["body"]) == ("ab-1", "alice", "hello bob")
    assert (second["id"], second["from"], second["conversation"]) == (
        "ab-2",
        "bob",
        long_conversation,
    )
    assert datetime.fromisoformat(first["sent_at"]) <= datetime.fromisoformat(second["sent_at"])


@pytest.mark.parametrize(
    "params",
    [{"limit": 201}, {"limit": 0}, {"limit": "ten"}, {"before": -1}, {"after": "x"}],
    ids=["limit-over-200", "limit-0", "limit-text", "negative-before", "after-text"],
)
async def test_bad_page_parameters_are_422(
    client: httpx.AsyncClient, world: World, params: dict[str, Any]
) -> None:
    alice = await as_user(client, "alice")

    response = await alice.get(f"/v1/conversations/{world.ab}/messages", **params)

    assert error_of(response) == (422, "invalid_payload")


# -- the delivery trace -------------------------------------------------------------------


async def test_message_trace_per_recipient_device(
    client: httpx.AsyncClient, world: World, engine: Engine
) -> None:
    send(engine, "alice", "second", id="ab-2", conversation=world.ab)
    send(engine, "alice", "third", id="ab-3", conversation=world.ab)
    move_cursor(engine, world.ab, "bob", "phone", when=at(1), delivered=2)
    move_cursor(engine, world.ab, "bob", "phone", when=at(2), delivered=3)
    move_cursor(engine, world.ab, "bob", "phone", when=at(3), read=3)
    move_cursor(engine, world.ab, "bob", "laptop", when=at(4), delivered=1)
    # The sender's own devices and non-members are not recipients.
    move_cursor(engine, world.ab, "alice", "phone", when=at(5), delivered=3, read=3)
    move_cursor(engine, world.ab, "carol", "phone", when=at(5), delivered=3, read=3)

    alice = await as_user(client, "alice")
    trace = await alice.json("/v1/messages/ab-2")

    assert set(trace) == {
        "message",
        "stored_at",
        "devices",
        "more_devices",
        "push",
        "members",
        "delivered",
        "read",
    }
    assert trace["push"] == []  # nobody has a push subscription here
    assert trace["more_devices"] is False
    assert (trace["members"], trace["delivered"], trace["read"]) == (1, 1, 1)
    assert set(trace["message"]) == MESSAGE_FIELDS
    assert (trace["message"]["id"], trace["message"]["seq"]) == ("ab-2", 2)
    assert trace["stored_at"] == trace["message"]["sent_at"]
    assert [
        (d["user"], d["device"], when(d["delivered_at"]), when(d["read_at"]))
        for d in trace["devices"]
    ] == [("bob", "laptop", None, None), ("bob", "phone", at(1), at(3))]

    first = await alice.json("/v1/messages/ab-1")
    assert [(d["device"], when(d["delivered_at"])) for d in first["devices"]] == [
        ("laptop", at(4)),
        ("phone", at(1)),
    ]
    # A recipient may look at the trace of a message sent to them.
    bob = await as_user(client, "bob")
    assert (await bob.json("/v1/messages/ab-3"))["message"]["from"] == "alice"


async def test_own_message_comes_first_when_ids_collide(
    client: httpx.AsyncClient, world: World, engine: Engine
) -> None:
    send(engine, "bob", "bob's m", id="same", conversation=world.ab)
    send(engine, "alice", "alice's m", id="same", conversation=world.ab)
    send(engine, "carol", "carol's m", id="carol-only", conversation=world.cd)

    alice = await as_user(client, "alice")
    bob = await as_user(client, "bob")
    assert (await alice.json("/v1/messages/same"))["message"]["body"] == "alice's m"
    assert (await bob.json("/v1/messages/same"))["message"]["body"] == "bob's m"
    assert error_of(await alice.get("/v1/messages/carol-only")) == (404, "unknown_message")


# -- presence -------------------------------------------------------------------------------


async def test_presence_from_devices(
    client: httpx.AsyncClient, world: World, engine: Engine
) -> None:
    set_device(engine, "bob", "phone", online=False, seen=at(1))
    set_device(engine, "bob", "laptop", online=True, seen=at(2))
    set_device(engine, "dave", "phone", online=False, seen=at(3))
    set_device(engine, "dave", "tablet", online=False, seen=at(7))

    alice = await as_user(client, "alice")

    bob = await alice.json("/v1/users/bob/presence")
    assert set(bob) == {"username", "state", "at", "online", "last_seen"}
    assert (bob["username"], bob["state"], when(bob["at"])) == ("bob", "online", at(2))
    carol = await alice.json("/v1/users/carol/presence")
    assert (carol["state"], carol["at"]) == ("offline", None)
    # dave shares no conversation with alice: to her he is no account at all.
    assert error_of(await alice.get("/v1/users/dave/presence")) == (404, "unknown_user")
    dave = await (await as_user(client, "carol")).json("/v1/users/dave/presence")
    assert (dave["state"], when(dave["at"])) == ("offline", at(7))
    # The first words, kept as deprecated aliases: same values.
    for answer in (bob, dave, carol):
        assert answer["online"] == (answer["state"] == "online")
        assert answer["last_seen"] == answer["at"]
    for name in ("nobody", "Bob", "x"):
        assert error_of(await alice.get(f"/v1/users/{name}/presence")) == (404, "unknown_user")


# -- search -----------------------------------------------------------------------------------


async def test_search_finds_only_the_callers_messages(
    client: httpx.AsyncClient, world: World, engine: Engine
) -> None:
    send(engine, "bob", "The blue whale sings tonight", id="ab-2", conversation=world.ab)
    send(engine, "alice", "Blue skies over the harbour", id="ab-3", conversation=world.ab)
    send(engine, "carol", "a blue whale secret", id="cd-2", conversation=world.cd)
    send(engine, "dave", "whale watching, blue or grey?", id="cd-3", conversation=world.cd)

    alice = await as_user(client, "alice")
    carol = await as_user(client, "carol")

    async def found(who: As, q: str, **params: Any) -> list[str]:
        body = await who.json("/v1/search", q=q, **params)
        for message in body["messages"]:
            assert set(message) == MESSAGE_FIELDS
        return [message["id"] for message in body["messages"]]

    assert await found(alice, "blue whale") == ["ab-2"]
    assert await found(alice, "BLUE") == ["ab-3", "ab-2"]  # newest first
    assert await found(alice, "blue", limit=1) == ["ab-3"]
    assert await found(alice, "secret") == []
    assert await found(carol, "blue whale") == ["cd-3", "cd-2"]
    assert await found(carol, "hello") == ["cd-1", "ac-1"]
    # Query syntax in user input is searched for as words, never interpreted.
    for q in ("blue OR secret", "whale*", '"unbalanced', "body:blue", "!!!", "NEAR(a b)"):
        response = await alice.get("/v1/search", q=q)
        assert response.status_code == 200, (q, response.text)
    assert await found(alice, "blue OR secret") == []


@pytest.mark.parametrize("params", [{}, {"q": ""}, {"q": "x", "limit": 101}, {"q": "x" * 257}])
async def test_bad_search_parameters_are_422(
    client: httpx.AsyncClient, world: World, params: dict[str, Any]
) -> None:
    alice = await as_user(client, "alice")

    assert error_of(await alice.get("/v1/search", **params)) == (422, "invalid_payload")


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
async def test_search_covers_messages_stored_before_the_migration(
    request: pytest.FixtureRequest, tmp_path: Path, dialect: str
) -> None:
    with contextlib.ExitStack() as stack:
        if dialect == "sqlite":
            url = f"sqlite:///{tmp_path / 'old.db'}"
        else:
            url = stack.enter_context(postgres_database(request.getfixturevalue("postgres"), None))
        engine = make_engine(url)
        stack.callback(engine.dispose)
        command.upgrade(alembic_config(engine), "0002")
        # Written as the code of revision 0002 wrote it (today's code needs today's schema).
        with engine.begin() as conn:
            # The accounts table as revision 0002 has it (no is_admin yet).
            old_accounts = table(
                "accounts",
                *(column(c) for c in ("username", "password_hash", "created_at", "disabled")),
            )
            conn.execute(
                insert(old_accounts),
                [
                    {"username": u, "password_hash": accounts.hash_password(password_of(u))}
                    | {"created_at": at(0), "disabled": False}
                    for u in ("alice", "bob")
                ],
            )
            conn.execute(
                insert(Conversation.__table__),  # type: ignore[attr-defined]
                [{"id": "c_old", "kind": "direct", "direct_key": "alice:bob", "last_seq": 1}],
            )
            conn.execute(
                insert(Member.__table__),  # type: ignore[attr-defined]
                [{"conversation_id": "c_old", "username": user} for user in ("alice", "bob")],
            )
            conn.execute(
                insert(Message.__table__),  # type: ignore[attr-defined]
                [
                    {"conversation_id": "c_old", "seq": 1, "sender": "alice"}
                    | {"client_id": "old-1", "body": "an old lighthouse", "sent_at": at(0)}
                ],
            )
        migrate(engine)
        send(engine, "bob", "a new lighthouse", id="new-1", to="alice")

        async with serve(ApiSettings(database_url=url)) as api:
            bob = await as_user(api, "bob")
            body = await bob.json("/v1/search", q="lighthouse")

        assert [m["id"] for m in body["messages"]] == ["new-1", "old-1"]


async def test_postgres_search_uses_the_gin_index(request: pytest.FixtureRequest) -> None:
    """The query store.search sends matches the index expression of migration 0003."""
    postgres: PostgresServer = request.getfixturevalue("postgres")
    with postgres_database(postgres, "mqchat_template") as url:
        engine = make_engine(url)
        sent: list[tuple[str, Any]] = []

        def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
            sent.append((statement, parameters))

        try:
            add_users(engine, "alice", "bob")
            send_many(engine, "alice", "bob", 500, "filler-")
            send(engine, "bob", "the blue whale", id="whale", to="alice")
            with engine.connect() as conn:
                conn.exec_driver_sql("ANALYZE")
                conn.commit()
            event.listen(engine, "before_cursor_execute", capture)
            with Session(engine) as session:
                assert [m.client_id for m in search.search(session, "alice", "blue whale")] == [
                    "whale"
                ]
            event.remove(engine, "before_cursor_execute", capture)
            (statement, parameters) = sent[-1]
            with engine.connect() as conn:
                conn.exec_driver_sql("SET enable_seqscan = off")
                plan = conn.exec_driver_sql("EXPLAIN " + statement, parameters).scalars()
                assert "ix_messages_body_fts" in "\n".join(plan)
        finally:
            engine.dispose()


# -- broken object-level authorisation ---------------------------------------------------


async def test_other_peoples_objects_are_404(
    client: httpx.AsyncClient, world: World, engine: Engine
) -> None:
    send(engine, "dave", "private to carol", id="cd-2", conversation=world.cd)
    move_cursor(engine, world.cd, "dave", "phone", when=at(1), delivered=2, read=2)
    alice = await as_user(client, "alice")

    # Conversations alice is not in: listed nowhere, paged nowhere, whatever the cursor.
    assert world.cd not in [c["id"] for c in await alice.json("/v1/conversations")]
    for params in ({}, {"after": 0}, {"before": 3}, {"after": 0, "before": 3}, {"limit": 200}):
        for conversation in (world.cd, "c_doesnotexist", world.ab.upper()):
            response = await alice.get(f"/v1/conversations/{conversation}/messages", **params)
            assert error_of(response) == (404, "unknown_conversation"), (conversation, params)
    # Messages of conversations alice is not in, by their client id.
    for message_id in ("cd-1", "cd-2", "no-such-id"):
        response = await alice.get(f"/v1/messages/{message_id}")
        assert error_of(response) == (404, "unknown_message"), message_id
    # Nor can search reach them.
    assert (await alice.json("/v1/search", q="private"))["messages"] == []

    # The same requests work for the members themselves.
    carol = await as_user(client, "carol")
    assert seqs(await carol.json(f"/v1/conversations/{world.cd}/messages")) == [1, 2]
    trace = await carol.json("/v1/messages/cd-1")
    assert [(d["user"], d["device"]) for d in trace["devices"]] == [("dave", "phone")]


# -- the OpenAPI document -------------------------------------------------------------------


async def test_openapi_documents_every_endpoint_with_its_security(tmp_path: Path) -> None:
    with sqlite_database(tmp_path) as url:
        async with serve(ApiSettings(database_url=url)) as api:
            document = (await api.get("/openapi.json")).json()

    scheme = document["components"]["securitySchemes"]["OAuth2PasswordBearer"]
    assert scheme == {
        "type": "oauth2",
        "flows": {"password": {"scopes": {}, "tokenUrl": "/v1/tokens"}},
    }
    secured = {
        ("/v1/conversations", "get"): set(),
        ("/v1/conversations/{conversation_id}/messages", "get"): {"404", "422"},
        ("/v1/conversations/{conversation_id}/members", "get"): {"404"},
        ("/v1/messages/{message_id}", "get"): {"404"},
        ("/v1/users/{username}/presence", "get"): {"404"},
        ("/v1/search", "get"): {"422"},
    }
    for (path, method), errors in secured.items():
        operation = document["paths"][path][method]
        assert operation["security"] == [{"OAuth2PasswordBearer": []}], path
        assert {"200", "401", *errors} <= set(operation["responses"]), path
        for status in {"401", *errors}:
            schema = operation["responses"][status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (path, status)

    token = document["paths"]["/v1/tokens"]["post"]
    assert "security" not in token
    form = token["requestBody"]["content"]["application/x-www-form-urlencoded"]["schema"]
    assert {"username", "password"} <= set(form["required"])
    assert {"200", "401", "422"} <= set(token["responses"])
    assert "/v1/users" in document["paths"]


# -- the read-only session of the read routes ------------------------------------------


def test_the_reading_session_refuses_to_write(engine: Engine, world: World) -> None:
    with deps.ReadingSession(reading(engine)) as session:
        assert accounts.exists(session, "alice")
        session.add(Device(username="alice", device="phone", online=True, last_seen=at(0)))
        with pytest.raises(RuntimeError, match="only reads"):
            session.flush()
        session.rollback()
        with pytest.raises(RuntimeError, match="only reads"):
            session.execute(delete(tokens.Token))
    with Session(engine) as session:
        assert session.get(Device, ("alice", "phone")) is None
