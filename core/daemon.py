"""What every daemon (broker, bridge, history API) shares with whoever supervises it.

Its exit code and message for a bad setting, and the log line that says it is ready.
A bad setting is told as the environment variable an operator sets: pydantic's own
message names fields (``password``) and links to its docs; the operator has set, or
forgot, ``MQCHAT_BRIDGE_PASSWORD``. The ready lines live here rather than in the
daemons' packages so that ``mqchat up``, the tests and the benchmarks can wait for
them without importing a daemon.
"""

from __future__ import annotations

import sys
from typing import Final, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings

from protocol import topics

_S = TypeVar("_S", bound=BaseSettings)

EXIT_CONFIG = 78  # EX_CONFIG, the exit code of every daemon for a bad setting

#: In the embedded broker's log once every listener accepts connections: what
#: ``mqchat up`` waits for.
BROKER_READY_LOG: Final = "embedded broker listening on"

#: In the bridge's log once it consumes uplinks: what supervisors and tests wait for
#: (a bare "consuming" would also match psycopg's "consuming input failed").
BRIDGE_READY_LOG: Final = f"consuming {topics.ALL_UPLINKS}"


def describe(exc: ValidationError, settings: type[BaseSettings]) -> str:
    """One line per bad setting: ``  MQCHAT_BRIDGE_PASSWORD: missing``."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        field = "_".join(str(part) for part in err["loc"]).upper()
        # A check across fields has no loc: name the family instead.
        key = prefix + field if field else prefix + "*"
        reason = "missing" if err["type"] == "missing" else err["msg"]
        lines.append(f"  {key}: {reason}")
    return "\n".join(lines)


def load(settings: type[_S], daemon: str) -> _S | None:
    """The settings from the environment, or None after printing what is wrong."""
    try:
        return settings()
    except ValidationError as exc:
        # Not logging: it must read the same whatever logging is set up to do.
        print(f"{daemon}: bad configuration:\n{describe(exc, settings)}", file=sys.stderr)
        return None
