"""``python -m history_api``: serve the API with uvicorn; settings from ``MQCHAT_API_*``.

uvicorn owns the signals: SIGTERM or Ctrl-C finishes the requests in flight, runs
the lifespan shutdown (which disposes of the engine) and exits 0.
"""

from __future__ import annotations

import logging
import sys

import uvicorn
from pydantic import ValidationError

from .app import create_app
from .config import ApiSettings

EXIT_OK = 0
EXIT_CONFIG = 78  # EX_CONFIG

ENV_PREFIX = "MQCHAT_API_"


def describe(exc: ValidationError) -> str:
    """One line per bad setting, named as the variable the operator has to set."""
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        key = ENV_PREFIX + "_".join(str(part) for part in err["loc"]).upper()
        reason = "missing" if err["type"] == "missing" else err["msg"]
        lines.append(f"  {key}: {reason}")
    return "\n".join(lines)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s api %(levelname)s %(message)s")
    try:
        settings = ApiSettings()
    except ValidationError as exc:
        print(f"history_api: bad configuration:\n{describe(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        ssl_certfile=settings.tls_certfile,
        ssl_keyfile=settings.tls_keyfile,
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
