"""schemathesis against the history API's own OpenAPI document, in process (ASGI).

Every operation, with data that fits the schema and data that does not, signed in
as alice (whose conversations and messages exist), on SQLite and PostgreSQL:

* no 5xx;
* every response conforms to the document: status code listed, body matching its
  schema, content type, headers;
* data the schema forbids is refused with a 4xx.

Bounded for CI: ``MQCHAT_SCHEMATHESIS_EXAMPLES`` examples per operation and mode
(default 10); set it higher for a longer run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance
from sqlmodel import Session

from history_api import ApiSettings, create_app
from store import make_engine, tokens

from .support.history import add_users, send, serve

#: The MQTT credential key, so that POST /v1/mqtt-credentials exists and is fuzzed too.
CREDENTIAL_KEY = "schemathesis credential key"
EXAMPLES = int(os.environ.get("MQCHAT_SCHEMATHESIS_EXAMPLES", "10"))

#: Operations whose business rules refuse some requests the schema allows: a name
#: already taken (409), a common password or the username as password (422), wrong
#: credentials (401/403), too many failures (429). Each refusal is a documented
#: status; only "schema-valid data must be accepted" is not checked for them.
BUSINESS_RULES = {
    "POST /v1/users",
    "POST /v1/users/me/password",
    "POST /v1/tokens",
    # A push subscription's keys must be a P-256 point and its endpoint a public
    # https URL: no schema says either.
    "POST /v1/devices/{device}/push",
    "PUT /v1/devices/{device}/push",
}


def signed_in_world(url: str) -> str:
    """alice, bob and carol with a conversation each way; alice's bearer token."""
    engine = make_engine(url)
    try:
        add_users(engine, "alice", "bob", "carol")
        send(engine, "alice", "hello bob", id="ab-1", to="bob")
        send(engine, "bob", "hello carol", id="bc-1", to="carol")
        with Session(engine) as session:
            issued = tokens.issue(session, "alice", timedelta(hours=1))
            session.commit()
        return issued.token
    finally:
        engine.dispose()


def _examples(
    operation: Any, mode: GenerationMode, token: str, excluded: list[Any]
) -> Callable[[], None]:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def call(case: schemathesis.Case) -> None:
        case.call_and_validate(
            headers={"Authorization": f"Bearer {token}"}, excluded_checks=excluded
        )

    return call  # type: ignore[no-any-return]


def test_the_api_conforms_to_its_openapi_document(database_url: str) -> None:
    token = signed_in_world(database_url)
    app = create_app(ApiSettings(database_url=database_url, mqtt_credential_secret=CREDENTIAL_KEY))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    failures: list[str] = []

    for operation in operations:
        excluded = [positive_data_acceptance] if operation.label in BUSINESS_RULES else []
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _examples(operation, mode, token, excluded)()
            except Unsatisfiable:
                continue  # no request the schema forbids (a path of any string, say)
            except Exception as exc:  # every operation is tried; all failures reported
                failures.append(f"{operation.label} ({mode.value}):\n{exc}")
    assert not failures, "\n\n".join(failures)


NUL_REQUESTS = [
    ("GET", "/v1/messages/a%00b", 404, "unknown_message"),
    ("GET", "/v1/conversations/c%00/messages", 404, "unknown_conversation"),
    ("GET", "/v1/users/bob%00/presence", 404, "unknown_user"),
    ("GET", "/v1/devices/ph%00ne/cursors", 200, None),
    ("GET", "/v1/search?q=hel%00lo", 200, None),
    ("POST", "/v1/tokens", 401, "unauthorized"),
]


@pytest.mark.parametrize(("method", "path", "status", "code"), NUL_REQUESTS)
async def test_nul_in_a_request_is_not_a_server_error(
    database_url: str, method: str, path: str, status: int, code: str | None
) -> None:
    """Found by fuzzing: PostgreSQL cannot hold NUL, and these were 500s there."""
    token = signed_in_world(database_url)
    async with serve(
        ApiSettings(database_url=database_url, mqtt_credential_secret=CREDENTIAL_KEY)
    ) as client:
        response = await client.request(
            method,
            path,
            headers={"Authorization": f"Bearer {token}"},
            data={"username": "alice\x00", "password": "alice-secret-pw"}
            if method == "POST"
            else None,
        )
    assert response.status_code == status, response.text
    if code is not None:
        assert response.json()["error"]["code"] == code
