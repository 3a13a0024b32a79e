"""Models generated from ``protocol/asyncapi.yaml`` by a stock generator parse real traffic.

A client author points a generator at the AsyncAPI document and gets classes. Two ways
that went wrong: schemas without titles came out as ``AnonymousSchema_N``, and a
generated ``from`` field without its alias failed on every ``down/msg``. Here
datamodel-code-generator (from PyPI) generates pydantic models from the document as it
is, and every downlink kind, captured from a running stack (nothing hard-coded),
parses with them.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from core.mqtt import Incoming
from protocol import topics

from .support.stack import Stack

ROOT = Path(__file__).resolve().parents[1]
ASYNCAPI = ROOT / "protocol" / "asyncapi.yaml"

#: The names the document's titles give the types a client switches on.
NAMED = {
    "ReceiptStatus",
    "ErrorCode",
    "PresenceState",
    "ContactState",
    "DeviceState",
    "ToUser",
    "ToConversation",
}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """The document's models, generated as docs/protocol.md shows a client author."""
    out = tmp_path_factory.mktemp("generated") / "mqchat_models.py"
    subprocess.run(
        [
            str(Path(sys.executable).with_name("datamodel-codegen")),
            "--input",
            str(ASYNCAPI),
            "--input-file-type",
            "asyncapi",
            "--output-model-type",
            "pydantic_v2.BaseModel",
            "--target-python-version",
            "3.11",
            "--use-title-as-name",
            "--formatters",
            "builtin",
            "--disable-timestamp",
            "--output",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    spec = importlib.util.spec_from_file_location("mqchat_models", out)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_generated_types_have_names(generated: ModuleType) -> None:
    classes = {name for name, value in vars(generated).items() if isinstance(value, type)}
    assert classes >= NAMED
    assert not [name for name in classes if name.startswith(("AnonymousSchema", "Model"))]
    assert generated.DownMessage.model_fields["from_"].alias == "from"
    assert generated.DownTyping.model_fields["from_"].alias == "from"


async def capture(stack: Stack) -> dict[str, list[bytes]]:
    """One of each downlink a device sees, from a stock client's subscription."""
    await stack.add_users("alice", "bob")
    seen: asyncio.Queue[Incoming] = asyncio.Queue()
    alice = await stack.raw("alice", on_message=seen.put_nowait)
    await alice.subscribe(topics.down_all("alice"), qos=1)
    bob = await stack.raw("bob")

    got: dict[str, list[bytes]] = {}

    async def until(kind: str, count: int = 1) -> None:
        while len(got.get(kind, [])) < count:
            m = await asyncio.wait_for(seen.get(), 15)
            kind_of = m.topic.split("/")[-1]
            got.setdefault(kind_of, []).append(m.payload)

    await alice.publish(topics.up_msg("alice"), b'{"id": "g1", "to": "bob", "body": "hi"}', qos=1)
    await until("receipt")
    conversation = json.loads(got["receipt"][0])["conversation"]
    await bob.publish(
        topics.up("bob", "ack"),
        json.dumps({"conversation": conversation, "read": 1}).encode(),
        qos=1,
    )
    await until("receipt", 3)  # read implies delivered: both move
    await bob.publish(
        topics.up("bob", "typing"), json.dumps({"conversation": conversation}).encode(), qos=0
    )
    await bob.publish(
        topics.up("bob", "presence"), b'{"device": "phone", "state": "online"}', qos=1
    )
    await alice.publish(topics.up_msg("alice"), b'{"id": "g2", "to": "bob"}', qos=1)
    for kind in ("msg", "typing", "presence", "error"):
        await until(kind)
    return got


async def test_generated_models_parse_real_downlinks(stack: Stack, generated: ModuleType) -> None:
    got = await capture(stack)
    parse: dict[str, Any] = {
        "msg": generated.DownMessage,
        "receipt": generated.Receipt,
        "typing": generated.DownTyping,
        "presence": generated.DownPresence,
        "error": generated.ErrorPayload,
    }
    parsed = {kind: [parse[kind].model_validate_json(raw) for raw in got[kind]] for kind in parse}

    (message,) = parsed["msg"]
    assert (message.from_, message.body, message.seq, message.id) == ("alice", "hi", 1, "g1")
    assert message.sent_at.tzinfo is not None
    statuses = [receipt.status for receipt in parsed["receipt"]]
    assert sorted(statuses) == sorted(generated.ReceiptStatus)  # sent, delivered, read
    assert (parsed["typing"][0].from_, parsed["typing"][0].typing) == ("bob", True)
    # alice and bob share a conversation now, so alice hears that bob came online.
    (bob_online,) = parsed["presence"][-1].users
    assert (bob_online.username, bob_online.state) == ("bob", generated.ContactState.online)
    (error,) = parsed["error"]
    assert (error.code, error.id) == (generated.ErrorCode.invalid_payload, "g2")
    # What a generated client sends parses as the document's uplink too.
    sent = generated.UpMessage.model_validate_json('{"id": "g1", "to": "bob", "body": "hi"}')
    assert isinstance(sent.root, generated.ToUser)
