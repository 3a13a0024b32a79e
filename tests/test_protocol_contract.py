"""The protocol's documents agree with ``protocol/``.

``protocol/asyncapi.yaml`` (for machines) and ``docs/protocol.md`` (for people) are
written by hand, because a stock client must be able to chat from them alone. These
tests fail when a model, topic, ACL rule or error code changes and the documents do
not, so the contract cannot drift silently.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hypothesis
import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from protocol import MAX_BODY_CHARS, ProtocolError, acl, decode, errors, models, topics

from .support.fuzz import FUZZ, dump, model_shaped

ROOT = Path(__file__).resolve().parents[1]
ASYNCAPI_PATH = ROOT / "protocol" / "asyncapi.yaml"
PROTOCOL_MD_PATH = ROOT / "docs" / "protocol.md"

#: A real username for topics built from the document's ``{user}`` addresses.
USER = "alice"

ALL_MODELS: list[type[BaseModel]] = [
    *models.UPLINK_MODELS.values(),
    *models.DOWNLINK_MODELS.values(),
]

#: Schema keywords a client's behaviour depends on; titles, descriptions and
#: examples are for people and may differ freely.
COMPARED_KEYWORDS = (
    "type",
    "format",
    "enum",
    "const",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minItems",
    "maxItems",
    "default",
)

Resolver = Callable[[str], dict[str, Any]]


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    loaded = yaml.safe_load(ASYNCAPI_PATH.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def protocol_md() -> str:
    return PROTOCOL_MD_PATH.read_text(encoding="utf-8")


# --- helpers ---------------------------------------------------------------------


def _pointer(root: dict[str, Any], ref: str) -> Any:
    """Follow a local JSON pointer such as ``#/components/schemas/UpMessage``."""
    assert ref.startswith("#/"), f"only local $refs are used here: {ref}"
    node: Any = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict), f"$ref {ref} does not resolve"
        assert part in node, f"$ref {ref} does not resolve"
        node = node[part]
    return node


def _deref(root: dict[str, Any], node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        node = _pointer(root, node["$ref"])
    return node


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _normalise(schema: dict[str, Any], resolve: Resolver) -> dict[str, Any]:
    """Reduce a JSON schema to what a client relies on, in one canonical form.

    ``anyOf: [X, {type: null}]`` (pydantic's optional field) and ``type: [X, "null"]``
    both become X marked nullable; a ``default`` of null is dropped because it only
    restates that the field is optional; an object without ``additionalProperties``
    allows them, as JSON Schema says.
    """
    if "$ref" in schema:
        return _normalise(resolve(schema["$ref"]), resolve)
    schema = dict(schema)
    nullable = False
    if "anyOf" in schema:
        branches = schema.pop("anyOf")
        non_null = [b for b in branches if b != {"type": "null"}]
        nullable = len(non_null) < len(branches)
        if len(non_null) == 1:
            (branch,) = non_null
            schema = {**(resolve(branch["$ref"]) if "$ref" in branch else branch), **schema}
        else:
            schema["anyOf"] = non_null
    if isinstance(schema.get("type"), list):
        types = [t for t in schema["type"] if t != "null"]
        nullable = nullable or len(types) < len(schema["type"])
        schema["type"] = types[0] if len(types) == 1 else sorted(types)

    out: dict[str, Any] = {k: schema[k] for k in COMPARED_KEYWORDS if k in schema}
    if "default" in out and out["default"] is None:
        del out["default"]
    if "enum" in out:
        out["enum"] = sorted(out["enum"], key=repr)
    if nullable:
        out["nullable"] = True
    for combinator in ("anyOf", "oneOf"):
        if combinator in schema:
            out[combinator] = sorted(
                (_normalise(b, resolve) for b in schema[combinator]), key=json.dumps
            )
    if "items" in schema:
        out["items"] = _normalise(schema["items"], resolve)
    if schema.get("type") == "object" or "properties" in schema:
        out["properties"] = {
            name: _normalise(sub, resolve) for name, sub in schema.get("properties", {}).items()
        }
        out["required"] = sorted(schema.get("required", []))
        extra = schema.get("additionalProperties", True)
        out["additionalProperties"] = (
            extra if isinstance(extra, bool) else _normalise(extra, resolve)
        )
    return out


def _resolver(root: dict[str, Any]) -> Resolver:
    def resolve(ref: str) -> dict[str, Any]:
        result = _pointer(root, ref)
        assert isinstance(result, dict), ref
        return result

    return resolve


def _pydantic_schema(model: type[BaseModel]) -> dict[str, Any]:
    generated = model.model_json_schema(by_alias=True)
    return _normalise(generated, _resolver(generated))


def _document_schema(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return _normalise(doc["components"]["schemas"][name], _resolver(doc))


def _code_addresses() -> dict[str, str]:
    """Every channel address the code builds, with ``{user}`` left in, by direction."""
    placeholder = "{user}"
    addresses = {topics.up(placeholder, kind): "up" for kind in topics.UP_KINDS}
    addresses |= {topics.down(placeholder, kind): "down" for kind in topics.DOWN_KINDS}
    return addresses


def _channel_messages(doc: dict[str, Any], channel: dict[str, Any]) -> list[dict[str, Any]]:
    return [_deref(doc, m) for m in (channel.get("messages") or {}).values()]


def _payload_schema_name(message: dict[str, Any]) -> str:
    ref = message["payload"]["$ref"]
    prefix = "#/components/schemas/"
    assert ref.startswith(prefix), f"payloads are named schemas: {ref}"
    return str(ref[len(prefix) :])


def _examples(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any], Any]]:
    """(address, schema name, schema, example payload) for every example in the document."""
    for channel in doc["channels"].values():
        for message in _channel_messages(doc, channel):
            if "payload" not in message:
                continue
            name = _payload_schema_name(message)
            for example in message.get("examples", []):
                yield channel["address"], name, _deref(doc, message["payload"]), example["payload"]


# --- schemas ---------------------------------------------------------------------


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.__name__)
def test_schema_matches_pydantic(doc: dict[str, Any], model: type[BaseModel]) -> None:
    """A client validating against the document accepts and rejects what the code does."""
    schemas = doc["components"]["schemas"]
    assert model.__name__ in schemas, f"asyncapi.yaml has no schema {model.__name__}"
    documented = _document_schema(doc, model.__name__)
    generated = _pydantic_schema(model)
    assert documented == generated


def test_every_schema_a_generator_names_has_a_title(doc: dict[str, Any]) -> None:
    """Payload schemas, enums and the ``oneOf``/``anyOf`` branches become classes in a
    generated client; without a title they are called ``AnonymousSchema_N``."""
    untitled = []
    for name, schema in doc["components"]["schemas"].items():
        if schema.get("title") != name:
            untitled.append(name)
        for prop, sub in schema.get("properties", {}).items():
            if "enum" in sub and not sub.get("title"):
                untitled.append(f"{name}.{prop}")
        for combinator in ("oneOf", "anyOf"):
            untitled += [
                f"{name}.{combinator}[{i}]"
                for i, branch in enumerate(schema.get(combinator, []))
                if not branch.get("title")
            ]
    assert not untitled


def test_error_code_enum_is_every_error_code(doc: dict[str, Any]) -> None:
    code = doc["components"]["schemas"]["ErrorPayload"]["properties"]["code"]
    assert code["enum"] == sorted(code["enum"]), "keep the enum sorted for readers"
    assert set(code["enum"]) == errors.ERROR_CODES
    assert len(code["enum"]) == len(errors.ERROR_CODES)


def test_presence_schema_matches_the_model(doc: dict[str, Any]) -> None:
    """Presence is no MQTT payload any more (it was retained on its own topic until
    issue 19; the history API still answers in its words) but is a model all the same."""
    assert _document_schema(doc, "Presence") == _pydantic_schema(models.Presence)


# --- channels and operations -----------------------------------------------------


def test_channel_addresses_are_the_topics_the_code_builds(doc: dict[str, Any]) -> None:
    documented = {channel["address"] for channel in doc["channels"].values()}
    assert documented == set(_code_addresses())


def test_channel_parameters_cover_their_address(doc: dict[str, Any]) -> None:
    for key, channel in doc["channels"].items():
        names = set(re.findall(r"\{([^}]+)\}", channel["address"]))
        assert set(channel.get("parameters", {})) == names, key


def test_channel_payload_is_the_model_for_its_kind(doc: dict[str, Any]) -> None:
    """up/msg carries UpMessage and so on; a kind without a model must say it is planned."""
    for key, channel in doc["channels"].items():
        parsed = topics.parse_user_topic(channel["address"].replace("{user}", USER))
        if parsed is None:
            continue
        by_kind = models.UPLINK_MODELS if parsed.direction == "up" else models.DOWNLINK_MODELS
        messages = _channel_messages(doc, channel)
        model = by_kind.get(parsed.kind)
        if model is None:
            assert channel.get("x-status") == "planned", f"{key}: no model, so mark it planned"
            assert all("payload" not in m for m in messages), f"{key}: payload without a model"
            continue
        assert [_payload_schema_name(m) for m in messages] == [model.__name__], key


def test_operations_follow_the_acl(doc: dict[str, Any]) -> None:
    """A device may only be told to publish/subscribe where the broker lets it."""
    actions: dict[str, set[str]] = {}
    for key, operation in doc["operations"].items():
        channel = _deref(doc, operation["channel"])
        topic = channel["address"].replace("{user}", USER)
        verb: acl.Action = "publish" if operation["action"] == "send" else "subscribe"
        assert acl.allowed(acl.USER_RULES, USER, verb, topic), f"{key}: ACL forbids {verb} {topic}"
        actions.setdefault(channel["address"], set()).add(operation["action"])
    for address, direction in _code_addresses().items():
        expected = {"up": {"send"}, "down": {"receive"}}
        assert actions.get(address) == expected[direction], address


# --- examples --------------------------------------------------------------------


def test_every_payload_message_has_an_example(doc: dict[str, Any]) -> None:
    for name, message in doc["components"]["messages"].items():
        if "payload" in message:
            assert message.get("examples"), f"message {name} has no example"


def test_examples_decode_as_the_code_decodes_them(doc: dict[str, Any]) -> None:
    """Uplink examples pass protocol.decode; downlink examples validate as their model."""
    seen = 0
    for address, name, schema, payload in _examples(doc):
        jsonschema.Draft7Validator(schema).validate(payload)
        assert set(payload) <= set(schema["properties"]), f"{name}: unknown field in example"
        topic = address.replace("{user}", USER)
        parsed = topics.parse_user_topic(topic)
        if parsed is None:
            continue
        if parsed.direction == "up":
            decoded = decode(topic, json.dumps(payload).encode())
            assert decoded.sender == USER
            assert type(decoded.payload) is models.UPLINK_MODELS[parsed.kind]
        else:
            models.DOWNLINK_MODELS[parsed.kind].model_validate(payload)
        seen += 1
    assert seen >= len(models.UPLINK_MODELS) + len(models.DOWNLINK_MODELS)


def test_error_examples_use_known_codes(doc: dict[str, Any]) -> None:
    for _, name, _, payload in _examples(doc):
        if name == "ErrorPayload":
            assert payload["code"] in errors.ERROR_CODES


# --- structure -------------------------------------------------------------------


def test_document_is_structurally_asyncapi_3(doc: dict[str, Any]) -> None:
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["title"]
    assert doc["info"]["version"]
    assert doc["servers"]
    for key, server in doc["servers"].items():
        assert server["host"], key
        assert server["protocol"] in {"mqtt", "ws"}, key
        for scheme in server.get("security", []):
            assert _deref(doc, scheme)["type"] == "userPassword", key
    assert doc["channels"]
    for key, channel in doc["channels"].items():
        assert channel["address"], key
    assert doc["operations"]
    for key, operation in doc["operations"].items():
        assert operation["action"] in {"send", "receive"}, key
        channel_ref = operation["channel"]["$ref"]
        assert channel_ref.startswith("#/channels/"), key
        channel_key = channel_ref.removeprefix("#/channels/")
        assert channel_key in doc["channels"], key
        for message in operation.get("messages", []):
            # AsyncAPI 3: an operation's messages are its channel's messages.
            assert message["$ref"].startswith(f"{channel_ref}/messages/"), key
    assert doc["components"]["schemas"]
    assert doc["components"]["messages"]
    for ref in _refs(doc):
        _pointer(doc, ref)


# --- the schemas and the decoder agree on every uplink ------------------------------


def _ecma_pattern(
    validator: Any, pattern: str, instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    """``pattern`` as JSON Schema means it (ECMA-262): a final ``$`` matches only at the
    end, where Python's also matches before a final newline and would accept
    ``"bob\\n"`` as a username."""
    if not validator.is_type(instance, "string"):
        return
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + "\\Z"
    if re.search(pattern, instance) is None:
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


#: What a client that validates before it sends would use: AsyncAPI's schema format is
#: a superset of JSON Schema draft 7.
ClientValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"pattern": _ecma_pattern}
)


@pytest.fixture(scope="module")
def uplink_validators(doc: dict[str, Any]) -> dict[str, jsonschema.protocols.Validator]:
    """The document's payload schema of each uplink kind, by kind."""
    by_address = {channel["address"]: channel for channel in doc["channels"].values()}
    validators = {}
    for kind in topics.UP_KINDS:
        (message,) = _channel_messages(doc, by_address[topics.up("{user}", kind)])
        schema = doc["components"]["schemas"][_payload_schema_name(message)]
        validators[kind] = ClientValidator(schema)
    return validators


def _verdicts(
    validators: dict[str, jsonschema.protocols.Validator], kind: str, payload: Any
) -> tuple[bool, bool]:
    """(the document accepts it, the bridge's decoder accepts it).

    Sent as a client would write it: UTF-8, escaping only what UTF-8 cannot carry (lone
    surrogates). The one rule outside the schemas is the payload's size in bytes (stated
    in the document's description): a schema-valid uplink without unknown fields stays
    under it even with every character escaped.
    """
    try:
        raw = json.dumps(payload, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raw = dump(payload)
    try:
        decode(topics.up(USER, kind), raw)
    except ProtocolError:
        decoded = False
    else:
        decoded = True
    return validators[kind].is_valid(payload), decoded


#: Hand-picked uplinks at every edge the schemas have to express, with the verdict.
UPLINK_CASES: list[tuple[str, Any, bool]] = [
    ("msg", {"id": "m1", "to": "bob", "body": "hi"}, True),
    ("msg", {"id": "m1", "conversation": "c_1", "body": "hi"}, True),
    ("msg", {"id": "m1", "body": "hi"}, False),  # neither target
    ("msg", {"id": "m1", "to": "bob", "conversation": "c_1", "body": "hi"}, False),  # both
    ("msg", {"id": "m1", "to": None, "conversation": "c_1", "body": "hi"}, True),
    ("msg", {"id": "m1", "to": "bob", "conversation": None, "body": "hi"}, True),
    ("msg", {"id": "m1", "to": None, "conversation": None, "body": "hi"}, False),
    ("msg", {"id": "m1", "to": "bob", "body": "a\x00b"}, False),
    ("msg", {"id": "m\x00", "to": "bob", "body": "hi"}, False),
    ("msg", {"id": "m1", "conversation": "c\x00", "body": "hi"}, False),
    ("msg", {"id": "m1", "to": "bob\n", "body": "hi"}, False),
    ("msg", {"id": "m1", "to": "Bob", "body": "hi"}, False),
    ("msg", {"id": "m1", "to": "bob", "body": ""}, False),
    ("msg", {"id": "m1", "to": "bob", "body": "a\nb"}, True),
    ("msg", {"id": "m1", "to": "bob", "body": "\U0001f600" * MAX_BODY_CHARS}, True),
    ("msg", {"id": "m1", "to": "bob", "body": "a" * (MAX_BODY_CHARS + 1)}, False),
    ("msg", {"id": "i" * 64, "to": "bob", "body": "hi"}, True),
    ("msg", {"id": "i" * 65, "to": "bob", "body": "hi"}, False),
    ("msg", {"id": 1, "to": "bob", "body": "hi"}, False),
    ("msg", {"id": "m1", "to": "bob", "body": 1}, False),
    ("msg", {"id": "m1", "to": "bob", "body": "hi", "sent_at": "later"}, True),  # ignored
    ("msg", ["m1", "bob", "hi"], False),
    ("ack", {"conversation": "c_1", "delivered": 1}, True),
    ("ack", {"conversation": "c_1", "read": 3, "device": "phone"}, True),
    ("ack", {"conversation": "c_1", "delivered": 5, "read": 3}, True),
    ("ack", {"conversation": "c_1"}, False),  # no cursor
    ("ack", {"conversation": "c_1", "delivered": None, "read": None}, False),
    ("ack", {"conversation": "c_1", "delivered": 0}, False),
    ("ack", {"conversation": "c_1", "delivered": 2.0}, True),  # JSON has one number type
    ("ack", {"conversation": "c_1", "delivered": 1.5}, False),
    ("ack", {"conversation": "c_1", "delivered": True}, False),
    ("ack", {"conversation": "c_1", "delivered": "1"}, False),
    ("ack", {"conversation": "c_1", "read": 1, "device": ""}, False),
    ("ack", {"conversation": "c_1", "read": 1, "device": "ph\x00ne"}, False),
    ("typing", {"conversation": "c_1"}, True),
    ("typing", {"conversation": "c_1", "typing": False}, True),
    ("typing", {"conversation": "c_1", "typing": 1}, False),
    ("typing", {"conversation": "c\x00"}, False),
    ("typing", {}, False),
    ("presence", {"device": "phone", "state": "online"}, True),
    ("presence", {"device": "phone", "state": "away"}, False),
    ("presence", {"state": "offline"}, False),
    ("presence", {"device": "\x00", "state": "online"}, False),
    ("presence", None, False),
    ("group", {"id": "g1", "op": "create", "name": "team", "members": ["bob"]}, True),
    ("group", {"id": "g1", "op": "create", "name": "team", "conversation": None}, True),
    ("group", {"id": "g1", "op": "create", "name": "team", "conversation": "c_1"}, False),
    ("group", {"id": "g1", "op": "create"}, False),  # no name
    ("group", {"id": "g1", "op": "create", "name": " \t"}, False),  # blank
    ("group", {"id": "g1", "op": "create", "name": "n" * 101}, False),
    ("group", {"id": "g1", "op": "add", "conversation": "c_1", "members": ["bob"]}, True),
    ("group", {"id": "g1", "op": "add", "conversation": "c_1", "members": []}, False),
    ("group", {"id": "g1", "op": "remove", "conversation": "c_1"}, False),  # no members
    ("group", {"id": "g1", "op": "leave", "conversation": "c_1"}, True),
    ("group", {"id": "g1", "op": "leave"}, False),  # no conversation
    ("group", {"id": "g1", "op": "rename", "conversation": "c_1", "name": "x"}, True),
    ("group", {"id": "g1", "op": "join", "conversation": "c_1"}, False),
]


@pytest.mark.parametrize(("kind", "payload", "accepted"), UPLINK_CASES)
def test_schema_and_decoder_agree_on_edge_cases(
    uplink_validators: dict[str, jsonschema.protocols.Validator],
    kind: str,
    payload: Any,
    accepted: bool,
) -> None:
    """A client validating against the document sends exactly what the bridge accepts."""
    assert _verdicts(uplink_validators, kind, payload) == (accepted, accepted)


@pytest.mark.parametrize("kind", topics.UP_KINDS)
def test_schema_and_decoder_agree_on_generated_uplinks(
    uplink_validators: dict[str, jsonschema.protocols.Validator], kind: str
) -> None:
    """Objects shaped like each uplink (fields right, mistyped, missing, extra) from
    ``tests/test_fuzz_decode.py``: the document and the decoder never disagree."""

    @FUZZ
    @hypothesis.given(payload=model_shaped(kind))
    @hypothesis.example(payload={"conversation": "c_1", "delivered": 1e300})
    def agree(payload: dict[str, Any]) -> None:
        in_document, in_decoder = _verdicts(uplink_validators, kind, payload)
        assert in_document == in_decoder, (kind, payload)

    agree()


# --- the document for people -----------------------------------------------------


def test_protocol_md_documents_every_error_code(protocol_md: str) -> None:
    missing = sorted(code for code in errors.ERROR_CODES if f"`{code}`" not in protocol_md)
    assert not missing, f"docs/protocol.md does not explain: {missing}"


def test_protocol_md_documents_every_topic(protocol_md: str) -> None:
    missing = sorted(address for address in _code_addresses() if address not in protocol_md)
    assert not missing, f"docs/protocol.md does not list: {missing}"


def test_documents_state_the_limits(doc: dict[str, Any], protocol_md: str) -> None:
    description = doc["info"]["description"]
    for limit in (models.MAX_BODY_CHARS, models.MAX_PAYLOAD_BYTES):
        assert str(limit) in protocol_md
        assert str(limit) in description


def test_protocol_md_points_to_the_machine_readable_form(protocol_md: str) -> None:
    assert "protocol/asyncapi.yaml" in protocol_md


def test_protocol_md_error_table_has_the_http_status(protocol_md: str) -> None:
    """The error table's HTTP column is the one mapping in errors.HTTP_STATUS."""
    for code, status in errors.HTTP_STATUS.items():
        row = re.search(rf"^\| `{re.escape(code)}` \| (\d+) \|", protocol_md, re.MULTILINE)
        assert row is not None, f"docs/protocol.md has no error table row for {code}"
        assert int(row.group(1)) == status, code
