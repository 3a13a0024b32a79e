"""``python -m broker``: run the embedded broker; settings come from ``MQCHAT_BROKER_*``.

The first SIGTERM or Ctrl-C closes every session and exits (within
``MQCHAT_BROKER_SHUTDOWN_TIMEOUT``); a second one exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from core import daemon
from core.collector import keep_collections_short

from . import lognoise
from .config import BrokerSettings
from .service import BrokerService, CannotListen

EXIT_OK = daemon.EXIT_OK
EXIT_CANNOT_LISTEN = daemon.EXIT_CANNOT_LISTEN
EXIT_CONFIG = daemon.EXIT_CONFIG
EXIT_FORCED = daemon.EXIT_FORCED


def main() -> int:
    daemon.configure_logging("broker")
    logging.getLogger("amqtt").setLevel(logging.WARNING)
    logging.getLogger("transitions").setLevel(logging.WARNING)
    settings = daemon.load(BrokerSettings, "broker")
    if settings is None:
        return EXIT_CONFIG
    lognoise.install(settings.client_log_interval)

    async def run() -> int:
        collector = asyncio.create_task(keep_collections_short())  # process-wide
        # The event loop relays every message; sign-in lookups run on worker threads,
        # up to six at once in a herd of CONNECTs (devices retrying a second after
        # CONNACK 3). As in the bridge: a thread that holds the GIL gives it back to
        # the waiting loop after 0.5 ms instead of Python's default 5 ms.
        sys.setswitchinterval(0.0005)
        try:
            return await daemon.serve(
                BrokerService(settings),
                [(CannotListen, EXIT_CANNOT_LISTEN, "%s (check MQCHAT_BROKER_HOST and the ports)")],
            )
        finally:
            collector.cancel()

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
