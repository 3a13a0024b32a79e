"""The embedded broker as a daemon, in the shape of every daemon (``core.daemon.Service``).

``run()`` → ``startup()`` → ``main_loop()`` → ``shutdown()``; a signal only sets a
flag (``request_stop``). ``startup()`` tells a port it cannot listen on apart from any
other failure (``CannotListen``, a named exit code in ``__main__``), and
``shutdown()`` gives amqtt ``MQCHAT_BROKER_SHUTDOWN_TIMEOUT`` seconds, then says what
it abandoned. Abandoning loses nothing acknowledged: the bridge has stored every
message it acknowledged, and persistent sessions are resumed from the database.
"""

from __future__ import annotations

import asyncio
import logging

from amqtt.errors import BrokerError

from core import metrics
from core.daemon import BROKER_READY_LOG, Service
from core.metrics import MetricsServer

from .config import BrokerSettings
from .embedded import MqchatBroker

log = logging.getLogger(__name__)


class CannotListen(Exception):
    """A listener's port is in use, or not ours to bind."""


class _BindFailure(logging.Filter):
    """Drops amqtt's traceback for a port it could not bind: ``CannotListen`` says it
    in one line, naming the variables to check."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, OSError)


class BrokerService(Service):
    def __init__(self, settings: BrokerSettings) -> None:
        super().__init__()
        self.settings = settings
        self.broker = MqchatBroker(settings)
        self.metrics_server = MetricsServer(
            settings.metrics_addr, self.broker.registry, self.broker.readiness_checks()
        )

    async def startup(self) -> None:
        amqtt_log = logging.getLogger("amqtt.broker")
        quiet = _BindFailure()
        amqtt_log.addFilter(quiet)
        try:
            await self.broker.start()
        except BrokerError as exc:
            self.broker.dispose()
            # amqtt wraps the OSError of a bind that failed; anything else is ours.
            if isinstance(exc.__cause__, OSError):
                raise CannotListen(f"cannot listen: {exc.__cause__}") from exc
            raise
        finally:
            amqtt_log.removeFilter(quiet)
        try:
            await self.metrics_server.start()
        except metrics.CannotListen as exc:
            await self.broker.shutdown()
            raise CannotListen(str(exc)) from exc
        settings = self.settings
        log.info(
            "%s %s:%s (ws %s)",
            BROKER_READY_LOG,
            settings.host,
            settings.port,
            settings.ws_port or "off",
        )
        if settings.tls:
            log.info(
                "TLS listeners on %s: mqtts %s, wss %s",
                settings.tls_host or settings.host,
                settings.tls_port or "off",
                settings.wss_port or "off",
            )

    async def main_loop(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> None:
        await self.metrics_server.stop()
        timeout = self.settings.shutdown_timeout
        try:
            await asyncio.wait_for(self.broker.shutdown(), timeout)
        except TimeoutError:
            log.warning(
                "shutdown: not done within %g s (MQCHAT_BROKER_SHUTDOWN_TIMEOUT); abandoned %s",
                timeout,
                self.broker.unfinished(),
            )
            self.broker.dispose()
        else:
            log.info("shutdown: done")
