"""``mqchat``: chat from a terminal, manage accounts, run the whole stack in one command.

::

    mqchat send / listen / chat ──▶ mqchat.ChatClient ──MQTT──▶ broker ──▶ bridge
    mqchat user add|passwd|disable|enable|delete
                    ──▶ core.accounts ──▶ database (+ mosquitto dynsec)
    mqchat db upgrade ──▶ store.migrate
    mqchat mosquitto bootstrap ──▶ core.dynsec ──▶ dynamic-security.json
    mqchat rabbitmq configure ──▶ broker.rabbitmq ──▶ cluster config, definitions.json
    mqchat up ──▶ core.supervisor: child processes, restarting any that dies:
                  python -m broker (amqtt; not with --mosquitto)
                  python -m bridge
                  python -m history_api

One module per part: ``chat`` (send, listen, chat), ``accounts`` (user ...),
``database`` (db ...), ``mosquitto`` (mosquitto ...), ``rabbitmq`` (rabbitmq ...),
``up``; ``options`` declares the options they share and ``output`` the exit codes and
how lines are printed; ``app`` puts them together under one ``typer.Typer``.

Exit codes (``output``): 0 done, 1 the server refused (``error <code>: <detail>`` on
stderr), 2 bad usage, 69 broker or database unreachable, 75 no receipt in time,
77 credentials refused, 78 bad configuration, 130 ``up`` forced by a second Ctrl-C.
"""

from .app import app, main

__all__ = ["app", "main"]
