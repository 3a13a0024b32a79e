"""A daemon's bad settings, told as the environment variables an operator sets.

pydantic's own message names fields (``password``) and links to its docs; the
operator has set, or forgot, ``MQCHAT_BRIDGE_PASSWORD``. Shared by the three daemons
(broker, bridge, history API): it lives here, beside the broker's settings, until the
daemons get a common runtime package (issue 14's layout move).
"""

from __future__ import annotations

import sys
from typing import TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings

_S = TypeVar("_S", bound=BaseSettings)

EXIT_CONFIG = 78  # EX_CONFIG, the exit code of every daemon for a bad setting


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
