"""Property-based fuzzing of ``protocol.decode``: whatever arrives, only a ProtocolError.

The strategies here build three kinds of hostile uplink, from the least to the most
structured: arbitrary bytes on arbitrary topics; arbitrary JSON; and payloads built
from the uplink models with every field either right, wrong in type or range, or
missing, plus the edge cases fuzzing found (deep nesting, huge integers, NUL and
lone surrogates). ``tests/test_fuzz_bridge.py`` sends the same payloads through a
running bridge.

Profiles: ``ci`` (the default: a couple of seconds) and ``long``, chosen with
``MQCHAT_FUZZ_PROFILE=long``. The coverage-guided counterpart is ``python -m bench.fuzz``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from protocol import MAX_BODY_CHARS, MAX_PAYLOAD_BYTES, ProtocolError, decode, encode, errors
from protocol import topics as protocol_topics
from protocol.models import UPLINK_MODELS, ErrorPayload

from .support.fuzz import (
    FUZZ,
    UP_KINDS,
    dump,
    hostile_payloads,
    model_shaped,
    usernames,
)


def decode_down(raw: bytes) -> ErrorPayload:
    return ErrorPayload.model_validate_json(raw)


# -- properties -----------------------------------------------------------------------


def check(topic: str, payload: bytes) -> Any:
    """Decode; on refusal assert the code is stable and the id is the payload's own.

    Returns the decoded uplink, or None if it was refused.
    """
    try:
        decoded = decode(topic, payload)
    except ProtocolError as exc:
        refused = exc
    else:
        refused = None
    if refused is not None:
        assert refused.code in errors.ERROR_CODES
        assert refused.detail
        if refused.id is not None:
            assert refused.id == json.loads(payload)["id"]
        # What the bridge sends back must itself be sendable.
        error = ErrorPayload(id=refused.id, code=refused.code, detail=refused.detail)
        assert decode_down(encode(error)) == error
        return None
    # Accepted: the sender is the topic's user, the model is the topic's kind, and
    # what the bridge would store and send survives another trip through the codec.
    parsed = protocol_topics.parse_user_topic(topic)
    assert parsed is not None
    assert decoded.sender == parsed.user
    assert isinstance(decoded.payload, UPLINK_MODELS[parsed.kind])
    again = decode(topic, encode(decoded.payload))
    assert again == decoded
    text = encode(decoded.payload).decode("utf-8")
    assert "\x00" not in json.loads(text).get("body", "")
    return decoded


@FUZZ
@given(topic=st.text(max_size=60), payload=st.binary(max_size=400))
@example(topic="chat/v1/u/mallory/up/msg", payload=b"[" * 30_000)
@example(topic="chat/v1/u/mallory/up", payload=b"{}")
@example(topic="chat/v1/u/mallory/down/msg", payload=b"{}")
@example(topic="chat/v1/u//up/msg", payload=b"{}")
@example(topic="chat/v1/u/mallory/up/msg/x", payload=b"{}")
def test_any_topic_any_bytes(topic: str, payload: bytes) -> None:
    check(topic, payload)


@FUZZ
@given(kind=st.sampled_from(UP_KINDS), data=st.data())
def test_hostile_payloads_on_every_uplink_kind(kind: str, data: st.DataObject) -> None:
    payload = data.draw(hostile_payloads(kind))
    check(protocol_topics.up("mallory", kind), payload)


@FUZZ
@given(kind=st.sampled_from(UP_KINDS), obj=st.data())
def test_model_shaped_objects(kind: str, obj: st.DataObject) -> None:
    value = obj.draw(model_shaped(kind))
    check(protocol_topics.up("mallory", kind), dump(value))


@FUZZ
@given(
    id=st.text(min_size=1, max_size=64),
    to=usernames,
    body=st.text(min_size=1, max_size=MAX_BODY_CHARS),
)
def test_well_formed_messages_are_accepted_and_round_trip(id: str, to: str, body: str) -> None:
    payload = dump({"id": id, "to": to, "body": body})
    decoded = check(protocol_topics.up_msg("mallory"), payload)
    assert (decoded is not None) == ("\x00" not in id + body)


@FUZZ
@given(extra=st.integers(min_value=1, max_value=1000), kind=st.sampled_from(UP_KINDS))
def test_over_the_payload_limit_is_payload_too_large(extra: int, kind: str) -> None:
    payload = b" " * (MAX_PAYLOAD_BYTES + extra)
    with pytest.raises(ProtocolError) as refused:
        decode(protocol_topics.up("mallory", kind), payload)
    assert refused.value.code == errors.PAYLOAD_TOO_LARGE


@FUZZ
@given(extra=st.integers(min_value=1, max_value=500), id=st.text(min_size=1, max_size=64))
def test_over_the_body_limit_is_body_too_large(extra: int, id: str) -> None:
    payload = dump({"id": id, "to": "bob", "body": "é" * (MAX_BODY_CHARS + extra)})
    with pytest.raises(ProtocolError) as refused:
        decode(protocol_topics.up_msg("mallory"), payload)
    echoed = None if "\x00" in id else id
    assert (refused.value.code, refused.value.id) == (errors.BODY_TOO_LARGE, echoed)
