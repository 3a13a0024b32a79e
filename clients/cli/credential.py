"""``mqchat mqtt-credential``: a short-lived MQTT password for a stock client.

For a tool that only speaks MQTT (``mosquitto_sub``, a script on paho) that should
not be handed the account password: the password goes to the history API once,
and the tool gets a credential bound to one client id, for minutes.
"""

from __future__ import annotations

import json

from mqchat import HistoryClient

from .chat import _Connection
from .groups import _ask
from .options import DEFAULT_API_URL, ApiUrlOption, grouped
from .output import EXIT_OK, emit


@grouped(_Connection, "conn", device="cli")
def mqtt_credential(api_url: ApiUrlOption = DEFAULT_API_URL, *, conn: _Connection) -> None:
    """Print an MQTT credential for `--device` as JSON: `username`, `client_id`,
    `password` (short-lived, for that client id only) and `expires_at`. For example
    `mosquitto_sub -u alice -i "$(jq -r .client_id c.json)" -P "$(jq -r .password
    c.json)" ...`."""

    async def ask(history: HistoryClient) -> int:
        credential = await history.mqtt_credential(conn.device)
        emit(
            json.dumps(
                {
                    "username": credential.username,
                    "client_id": credential.client_id,
                    "password": credential.password,
                    "expires_at": credential.expires_at.isoformat(),
                }
            )
        )
        return EXIT_OK

    _ask(conn, api_url, ask)
