"""Coverage-guided fuzzing (atheris / libFuzzer) of what the bridge does with an uplink.

    python -m bench.fuzz decode   --runs 100000
    python -m bench.fuzz pipeline --runs 100000

Targets:

* ``decode``: ``protocol.decode`` on an uplink topic of the kind the first input byte
  picks, with the rest as payload. Anything but a ProtocolError with a stable code is
  a crash; an accepted uplink must survive ``encode`` and ``decode`` again unchanged.
* ``pipeline``: the bridge's path after decode, on a real SQLite database (two users
  and their conversation): messages through ``store.messages.persist_batch``, acks
  through ``store.cursors.advance_batch``, presence through ``store.presence``, typing
  through ``store.conversations.members_if_member``. A refusal must carry a stable code
  and leave the messages table as it was; a stored message must be the one sent.

A payload's ``"conversation": "1"`` is replaced by the real conversation's id, so the
fuzzer reaches the member paths without guessing an id. Inputs start from a seed
corpus of valid uplinks and a dictionary of the contract's field names and values.
Arguments after ``--`` go to libFuzzer (``-max_total_time=60``, ``-jobs=2``...).
Crashes are written to ``--artifacts`` (default: the current directory).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["protocol"]):
    import protocol
    from protocol import errors, topics
    from protocol.codec import Decoded

KINDS = topics.UP_KINDS
SENDER = "mallory"

SEEDS: list[tuple[str, dict[str, object]]] = [
    ("msg", {"id": "m1", "to": "bob", "body": "hello"}),
    ("msg", {"id": "m2", "conversation": "1", "body": "hi again"}),
    ("ack", {"conversation": "1", "delivered": 1, "read": 1, "device": "phone"}),
    ("ack", {"conversation": "1", "read": 2}),
    ("typing", {"conversation": "1", "typing": True}),
    ("typing", {"conversation": "1", "typing": False}),
    ("presence", {"device": "phone", "state": "online"}),
    ("presence", {"device": "phone", "state": "offline"}),
]

DICTIONARY = [
    '"id"',
    '"to"',
    '"body"',
    '"conversation"',
    '"delivered"',
    '"read"',
    '"device"',
    '"typing"',
    '"state"',
    '"online"',
    '"offline"',
    '"bob"',
    '"mallory"',
    '"1"',
    "true",
    "false",
    "null",
    "NaN",
    "1e999",
    '"\\u0000"',
    '"\\ud800"',
    "[",
    "{",
]


def split(data: bytes) -> tuple[str, bytes]:
    """The first byte picks the uplink kind (or a bogus one); the rest is the payload."""
    if not data:
        return topics.up(SENDER, "msg"), b""
    pick = data[0] % (len(KINDS) + 1)
    kind = KINDS[pick] if pick < len(KINDS) else data[1:3].decode("latin-1") or "x"
    return f"chat/v1/u/{SENDER}/up/{kind}", data[1:]


def decode_checked(topic: str, payload: bytes) -> Decoded | None:
    try:
        decoded = protocol.decode(topic, payload)
    except protocol.ProtocolError as exc:
        if exc.code not in errors.ERROR_CODES or not exc.detail:
            raise AssertionError(f"unstable refusal {exc.code!r}") from exc
        # The refusal the bridge publishes must itself encode.
        protocol.encode(protocol.ErrorPayload(id=exc.id, code=exc.code, detail=exc.detail))
        return None
    again = protocol.decode(topic, protocol.encode(decoded.payload))
    if again != decoded or decoded.sender != SENDER:
        raise AssertionError(f"round trip changed {decoded!r} into {again!r}")
    return decoded


def fuzz_decode(data: bytes) -> None:
    decode_checked(*split(data))


class Pipeline:
    """The bridge's writes after decode, on a real SQLite file in a temporary directory."""

    def __init__(self, directory: Path) -> None:
        from sqlmodel import Session

        from store import accounts, make_engine, migrate
        from store.messages import persist_batch

        self.engine = make_engine(f"sqlite:///{directory / 'fuzz.db'}")
        migrate(self.engine)
        with Session(self.engine) as session:
            for user in (SENDER, "bob"):
                accounts.create(session, user, user + "-fuzz-password")
            session.commit()
        (first,) = persist_batch(
            self.engine, [(SENDER, protocol.UpMessage(id="seed", to="bob", body="seed"))]
        )
        assert first.stored is not None
        self.conversation = first.stored.conversation
        self.stored = 0
        self.refused = 0

    def messages(self) -> int:
        from sqlalchemy import func
        from sqlmodel import Session, select

        from store.tables import Message

        with Session(self.engine) as session:
            return int(session.exec(select(func.count()).select_from(Message)).one())

    def __call__(self, data: bytes) -> None:
        from store import conversations, presence
        from store.cursors import advance_batch
        from store.messages import persist_batch

        decoded = decode_checked(*split(data))
        if decoded is None:
            self.refused += 1
            return
        up = decoded.payload
        if getattr(up, "conversation", None) == "1":
            up = up.model_copy(update={"conversation": self.conversation})
        if isinstance(up, protocol.UpMessage):
            before = self.messages()
            (outcome,) = persist_batch(self.engine, [(SENDER, up)])
            added = self.messages() - before
            if outcome.error is not None:
                assert outcome.error.code in errors.ERROR_CODES, outcome.error
                assert added == 0, f"refused {up!r} but stored {added} rows"
                self.refused += 1
                return
            stored = outcome.stored
            assert stored is not None
            assert (stored.sender, stored.client_id) == (SENDER, up.id)
            assert stored.seq >= 1
            # The same id again is the same message (idempotency), whatever its body.
            assert stored.duplicate or stored.body == up.body, (stored, up)
            assert added == (0 if stored.duplicate else 1), (stored, added)
            self.stored += 1
        elif isinstance(up, protocol.UpAck):
            (ack,) = advance_batch(self.engine, [(SENDER, up)])
            if ack.error is not None:
                assert ack.error.code in errors.ERROR_CODES, ack.error
            for change in ack.changes:
                assert change.conversation == up.conversation
                assert change.user == SENDER
        elif isinstance(up, protocol.UpPresence):
            (state,) = presence.update_batch(self.engine, [(SENDER, up)])
            assert state.user == SENDER
        else:
            members = conversations.members_if_member(self.engine, up.conversation, SENDER)
            assert members is None or SENDER in members


def write_corpus(directory: Path) -> None:
    for n, (kind, payload) in enumerate(SEEDS):
        raw = bytes([KINDS.index(kind)]) + json.dumps(payload).encode()  # type: ignore[arg-type]
        (directory / f"seed-{n}").write_bytes(raw)


def libfuzzer_quote(token: str) -> str:
    return '"' + token.replace("\\", "\\\\").replace('"', '\\"') + '"'


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fuzz", epilog="Flags after -- go to libFuzzer."
    )
    parser.add_argument("target", choices=["decode", "pipeline"])
    parser.add_argument("--runs", type=int, default=100_000, help="inputs to try")
    parser.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed")
    parser.add_argument("--max-len", type=int, default=4096, help="longest input, in bytes")
    parser.add_argument("--artifacts", type=Path, default=Path.cwd(), help="where crashes go")
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    extra = argv[cut + 1 :]

    work = Path(tempfile.mkdtemp(prefix="mqchat-fuzz-"))
    corpus = work / "corpus"
    corpus.mkdir()
    write_corpus(corpus)
    dictionary = work / "uplink.dict"
    dictionary.write_text("".join(f"{libfuzzer_quote(token)}\n" for token in DICTIONARY))
    if args.target == "decode":
        target = fuzz_decode
    else:
        with atheris.instrument_imports(include=["store"]):
            # Every module the target reaches, imported here so it is instrumented.
            import store.accounts
            import store.conversations
            import store.cursors
            import store.messages
            import store.presence  # noqa: F401
        target = Pipeline(work)

    flags = [
        f"-runs={args.runs}",
        f"-seed={args.seed}",
        f"-max_len={args.max_len}",
        f"-dict={dictionary}",
        f"-artifact_prefix={args.artifacts}/",
        "-print_final_stats=1",
        *extra,
        str(corpus),
    ]
    print(f"fuzzing {args.target}: {' '.join(flags)}", flush=True)
    atheris.Setup([sys.argv[0], *flags], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
