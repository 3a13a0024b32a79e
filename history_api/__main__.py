"""``python -m history_api``: serve the API with uvicorn; settings from ``MQCHAT_API_*``.

uvicorn owns the signals: SIGTERM or Ctrl-C finishes the requests in flight (for up
to ``MQCHAT_API_SHUTDOWN_TIMEOUT`` seconds, then cancels them and logs how many),
runs the lifespan shutdown (which disposes of the engine) and exits 0; a second one
exits at once. A port it cannot bind, or a startup that fails, exits 3 (uvicorn's).
"""

from __future__ import annotations

import sys

import uvicorn

from core import daemon

from .app import create_app
from .config import ApiSettings

EXIT_OK = daemon.EXIT_OK
EXIT_CONFIG = daemon.EXIT_CONFIG
#: uvicorn's own exit code (it exits itself): a port it cannot bind, or the app's
#: startup failed; it has logged which.
EXIT_STARTUP_FAILED = 3


def main() -> int:
    daemon.configure_logging("api")
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
        timeout_graceful_shutdown=settings.shutdown_timeout,
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
