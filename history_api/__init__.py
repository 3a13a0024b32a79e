"""The history API: accounts, tokens, conversations, history by seq, traces, search.

::

    POST /v1/users ──▶ users.create_user ──▶ core.accounts.register
                                                ├─▶ store.accounts.create (argon2)
                                                └─▶ mosquitto dynsec, when configured
    POST /v1/tokens (password form) ──▶ store.accounts.verify (in a thread) ──▶ store.tokens.issue
    GET  /v1/... + Bearer token ──▶ deps.get_current_user (store.tokens.resolve) ──▶ me
         /v1/conversations[/{id}/messages]  ──▶ store.history (filtered by me in SQL)
         /v1/messages/{id}                  ──▶ store.history.delivery_trace
         /v1/users/{name}/presence          ──▶ store.history.presence
         /v1/search                         ──▶ store.search (tsvector / FTS5)
    any ProtocolError / bad request / broker down ──▶ errors.py ──▶ {"error": {code, detail}}

``create_app(settings)`` builds the application; the engine lives from lifespan
start to shutdown, so importing this package opens nothing.
"""

from .app import create_app
from .config import ApiSettings

__all__ = ["ApiSettings", "create_app"]
