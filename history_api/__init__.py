"""The history API: accounts over HTTP (history, search and tokens come later).

::

    POST /v1/users ──▶ users.create_user ──▶ broker.provisioning.register
                                                ├─▶ store.accounts.create (argon2)
                                                └─▶ mosquitto dynsec, when configured
    any ProtocolError / bad request / broker down ──▶ errors.py ──▶ {"error": {code, detail}}

``create_app(settings)`` builds the application; the engine lives from lifespan
start to shutdown, so importing this package opens nothing.
"""

from .app import create_app
from .config import ApiSettings

__all__ = ["ApiSettings", "create_app"]
