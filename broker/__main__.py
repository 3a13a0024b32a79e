"""``python -m broker``: run the embedded broker until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from core import daemon
from core.collector import keep_collections_short

from . import lognoise
from .config import BrokerSettings
from .embedded import serve

EXIT_OK = 0
EXIT_CONFIG = daemon.EXIT_CONFIG


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s broker %(levelname)s %(message)s")
    logging.getLogger("amqtt").setLevel(logging.WARNING)
    logging.getLogger("transitions").setLevel(logging.WARNING)
    settings = daemon.load(BrokerSettings, "broker")
    if settings is None:
        return EXIT_CONFIG
    lognoise.install(settings.client_log_interval)

    async def run() -> None:
        collector = asyncio.create_task(keep_collections_short())  # process-wide
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await serve(settings, stop)
        finally:
            collector.cancel()

    asyncio.run(run())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
