"""Hypothesis strategies for hostile uplinks, shared by the decoder and bridge fuzzers.

Three kinds of hostile uplink, from the least to the most structured: arbitrary bytes
on arbitrary topics; arbitrary JSON; and payloads built from the uplink models with
every field either right, wrong in type or range, or missing, plus the edge cases
fuzzing found (deep nesting, huge integers, NUL and lone surrogates).

Profiles: ``ci`` (the default: a couple of seconds) and ``long``, chosen with
``MQCHAT_FUZZ_PROFILE=long``.
"""

from __future__ import annotations

import json
import os
from typing import Any, get_args

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from protocol import MAX_BODY_CHARS
from protocol import topics as protocol_topics
from protocol.models import UPLINK_MODELS, GroupOp

settings.register_profile(
    "ci",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long",
    max_examples=20_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: Applied per test rather than loaded globally, so other tests keep hypothesis' defaults.
FUZZ = settings.get_profile(os.environ.get("MQCHAT_FUZZ_PROFILE", "ci"))


UP_KINDS = list(protocol_topics.UP_KINDS)

# -- values ---------------------------------------------------------------------------

#: Text that is hostile to something downstream: NUL (PostgreSQL), lone surrogates
#: (UTF-8 encoders), MQTT wildcards and separators, right-to-left marks, long runs.
nasty_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "",
            " ",
            "\x00",
            "a\x00b",
            "\ud800",
            "x\udfffy",
            "+",
            "#",
            "/",
            "$SYS",
            "chat/v1/u/bob/down/#",
            "\u202eevil",
            "\ufeff",
            "bob",
            "Bob",
            "bob ",
            "c_1",
            "a" * 65,
            "a" * (MAX_BODY_CHARS + 1),
        ]
    ),
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    nasty_text,
)

json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)

usernames = st.from_regex(protocol_topics.USERNAME_RE, fullmatch=True)

#: For each uplink model field: values that are right, and values that are wrong.
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "id": st.one_of(st.text(min_size=1, max_size=64), json_scalars),
    "to": st.one_of(usernames, json_scalars),
    "conversation": st.one_of(st.text(min_size=1, max_size=64), json_scalars),
    "body": st.one_of(st.text(min_size=1, max_size=200), json_scalars, json_values),
    "delivered": st.one_of(st.integers(min_value=1, max_value=2**31), json_scalars),
    "read": st.one_of(st.integers(min_value=1, max_value=2**31), json_scalars),
    "device": st.one_of(st.text(min_size=1, max_size=64), json_scalars),
    "typing": st.one_of(st.booleans(), json_scalars),
    "state": st.one_of(st.sampled_from(["online", "offline"]), json_scalars),
    "op": st.one_of(st.sampled_from(list(get_args(GroupOp))), json_scalars),
    "name": st.one_of(st.text(max_size=120), json_scalars),
    "members": st.one_of(st.lists(st.one_of(usernames, json_scalars), max_size=3), json_scalars),
}


@st.composite
def model_shaped(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    """A JSON object with the fields of the ``kind`` uplink model, each maybe wrong."""
    fields = UPLINK_MODELS[kind].model_fields
    names = [*fields, "id", "to", "conversation", "body"]
    present = draw(st.lists(st.sampled_from(names), unique=True, min_size=0, max_size=len(names)))
    obj = {name: draw(FIELD_VALUES[name]) for name in present}
    extra = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=2))
    return {**extra, **obj}


def dump(value: Any) -> bytes:
    """JSON with surrogates escaped (as a hostile client may send them) and NaN allowed."""
    return json.dumps(value, ensure_ascii=True, allow_nan=True).encode()


#: Byte strings that are JSON-ish but break a parser: deep nesting, huge numbers.
EDGE_PAYLOADS = [
    b"",
    b"null",
    b"{}",
    b"[" * 100_000,
    b"[" * 30_000 + b"]" * 30_000,
    b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
    b'{"id":"x","to":"bob","body":"b","n":' + b"9" * 5000 + b"}",
    b'{"id":"x","to":"bob","body":"b","n":1e999999}',
    b'{"id":"x","to":"bob","body":"a\\u0000b"}',
    b'{"id":"x","to":"bob","body":"\\ud800"}',
    b'{"id":"\\ud800","to":"bob"}',
    b'{"id":"\\udfff\\u0000","to":"bob","body":5}',
    b'{"id":"x","to":"bob","body":"\xed\xa0\x80"}',
    b'{"id":"x","to":"bob","body":"b"}\x00',
    b'\xef\xbb\xbf{"id":"x","to":"bob","body":"b"}',
    b'{"id":"x","to":"bob","body":"b","id":"y"}',
    b'{"conversation":"c","delivered":NaN}',
    b'{"conversation":"c","read":Infinity}',
    b'{"conversation":"c","read":1.0}',
    b'{"conversation":"c","read":true}',
    b'{"device":"d","state":"online","typing":"yes"}',
]


@st.composite
def hostile_payloads(draw: st.DrawFn, kind: str) -> bytes:
    """An uplink payload for ``kind``, most likely wrong in some way."""
    choice = draw(st.integers(min_value=0, max_value=5))
    if choice == 0:
        return draw(st.binary(max_size=300))
    if choice == 1:
        return dump(draw(json_values))
    if choice == 2:
        return draw(st.sampled_from(EDGE_PAYLOADS))
    if choice == 3:
        # A right-looking payload with bytes cut, flipped or inserted.
        raw = bytearray(dump(draw(model_shaped(kind))))
        for _ in range(draw(st.integers(min_value=1, max_value=3))):
            at = draw(st.integers(min_value=0, max_value=len(raw)))
            op = draw(st.sampled_from(["cut", "flip", "insert"]))
            if op == "cut":
                del raw[at:]
            elif op == "flip" and at < len(raw):
                raw[at] ^= draw(st.integers(min_value=1, max_value=255))
            else:
                raw[at:at] = draw(st.binary(min_size=1, max_size=4))
        return bytes(raw)
    return dump(draw(model_shaped(kind)))


up_topics = st.sampled_from(UP_KINDS).map(lambda kind: protocol_topics.up("mallory", kind))
