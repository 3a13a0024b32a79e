"""The ``mqchat`` command: every part put together, and the console script's ``main``."""

from __future__ import annotations

import os
from typing import Final

import typer

from . import accounts, chat, credential, database, groups, mosquitto, rabbitmq, status, up
from .output import say

app = typer.Typer(
    help="mqchat: a WhatsApp-style chat over MQTT. Start with `mqchat up`.",
    no_args_is_help=True,
    add_completion=False,
    # Tracebacks must never print local variables: they hold passwords.
    pretty_exceptions_show_locals=False,
    # Markdown: docstring paragraphs are reflowed to the terminal's width.
    rich_markup_mode="markdown",
)
app.command()(chat.send)
app.command()(chat.listen)
app.command()(chat.chat)
app.command()(up.up)
app.command(name="mqtt-credential")(credential.mqtt_credential)
app.command()(status.status)
app.add_typer(groups.app, name="group")
app.add_typer(accounts.app, name="user")
app.add_typer(database.app, name="db")
app.add_typer(mosquitto.app, name="mosquitto")
app.add_typer(rabbitmq.app, name="rabbitmq")

#: Old environment names still read, each with the name that replaced it.
DEPRECATED_ENV: Final = {
    "MQCHAT_PORT": "MQCHAT_MQTT_PORT",
    "MQCHAT_MOSQUITTO_ADMIN_USER": "MQCHAT_MOSQUITTO_ADMIN_USERNAME",
}


def main() -> None:
    for old, new in DEPRECATED_ENV.items():
        if old in os.environ:
            ignored = f" (ignored: {new} is set)" if new in os.environ else ""
            say(f"mqchat: {old} is deprecated, use {new}{ignored}", err=True)
    app()
