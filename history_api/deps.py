"""What route handlers may ask for, as ``Annotated`` aliases.

Everything comes from ``app.state`` (filled by :func:`history_api.app.create_app` and
its lifespan), never from module globals, so two apps in one process (tests) do not
share an engine.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine

from broker.mosquitto import DynsecProvisioner, ProvisioningError
from broker.provisioning import EmbeddedProvisioner, Provisioner
from clients.mqtt import LinkConfig, MqttError

from .config import ApiSettings

#: Opens a provisioner for the length of one ``async with``.
OpenProvisioner = Callable[[], contextlib.AbstractAsyncContextManager[Provisioner]]


def get_settings(request: Request) -> ApiSettings:
    settings: ApiSettings = request.app.state.settings
    return settings


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]


def get_provisioner(settings: SettingsDep) -> OpenProvisioner:
    """A connection to mosquitto's admin API per account creation.

    Accounts are created rarely; a connection per request means the API starts and
    stays healthy while mosquitto is down, and only account creation reports it.
    """

    @contextlib.asynccontextmanager
    async def open_provisioner() -> AsyncIterator[Provisioner]:
        password = settings.mosquitto_admin_password
        if password is None:
            yield EmbeddedProvisioner()
            return
        config = LinkConfig(
            host=settings.mosquitto_host,
            port=settings.mosquitto_port,
            username=settings.mosquitto_admin_username,
            password=password.get_secret_value(),
            # Unique and clean: concurrent requests must not take over each
            # other's connection, and nothing should stay queued for them.
            client_id=f"mqchat-api-{secrets.token_hex(6)}",
            clean_session=True,
            connect_timeout=5.0,
        )
        async with contextlib.AsyncExitStack() as stack:
            try:
                provisioner = await stack.enter_async_context(DynsecProvisioner(config))
            except (OSError, MqttError) as exc:
                raise ProvisioningError(
                    "connect",
                    f"mosquitto at {config.host}:{config.port} as {config.username}: {exc}",
                ) from exc
            yield provisioner

    return open_provisioner


ProvisionerDep = Annotated[OpenProvisioner, Depends(get_provisioner)]
