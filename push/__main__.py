"""``python -m push``: run the push daemon; settings come from ``MQCHAT_PUSH_*``.

The first SIGTERM or Ctrl-C lets the pushes in flight finish; a second one exits
at once. A push cut short is sent again by whichever daemon takes it when its lease
ends; a push decided but not sent is in the database and sent after a restart.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from core import daemon

from .config import PushSettings
from .service import PushDaemon, SchemaNotReady

EXIT_OK = daemon.EXIT_OK
EXIT_FORCED = daemon.EXIT_FORCED
EXIT_CONFIG = daemon.EXIT_CONFIG


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s push %(levelname)s %(message)s")
    settings = daemon.load(PushSettings, "push")
    if settings is None:
        return EXIT_CONFIG

    async def run() -> int:
        return await daemon.serve(
            PushDaemon(settings),
            [
                (SchemaNotReady, EXIT_CONFIG, "%s"),
                (OSError, EXIT_CONFIG, "cannot read or write the VAPID key: %s"),
            ],
        )

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
