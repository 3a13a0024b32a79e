"""``python -m history_api``: serve the API with uvicorn; settings from ``MQCHAT_API_*``.

uvicorn owns the signals: SIGTERM or Ctrl-C finishes the requests in flight, runs
the lifespan shutdown (which disposes of the engine) and exits 0.
"""

from __future__ import annotations

import logging
import sys

import uvicorn

from core import daemon

from .app import create_app
from .config import ApiSettings

EXIT_OK = 0
EXIT_CONFIG = daemon.EXIT_CONFIG


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s api %(levelname)s %(message)s")
    settings = daemon.load(ApiSettings, "history_api")
    if settings is None:
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
