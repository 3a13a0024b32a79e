"""Shared server-side plumbing: what the daemons, the SDK and the CLI all stand on.

A module belongs here when more than one program needs it and none of them owns it:
before, the daemons reached into ``clients/`` for their MQTT transport and into
``broker/`` for accounts, and the CLI into the daemons for a log line. It owns:

* ``mqtt``: the MQTT link, the one module that imports paho, driven by asyncio;
* ``accounts``: changing an account everywhere it lives (database, then broker);
* ``dynsec``: mosquitto's dynamic-security accounts and their ACLs over ``$CONTROL``;
* ``throttle``: events per key in moving windows, for refusing floods;
* ``collector``: how a long-running daemon keeps garbage collections short;
* ``daemon``: a daemon's exit code and message for a bad setting, its ready log line,
  its settings as the environment that starts it;
* ``supervisor``: our daemons as child processes, for ``mqchat up``, tests, benchmarks;
* ``endpoints``: which push endpoint URLs the server may POST to (the API stores them,
  the push daemon sends to them).

Imports run one way, downward (``tests/test_layout.py`` holds every package to it)::

    clients (CLI, mqchat up)
        ▼
    broker │ bridge │ history_api │ push │ mqchat   daemons and the SDK; none imports another
        ▼
    core                                this package
        ▼
    store                               the database
        ▼
    protocol                            the wire contract; imports nothing of ours
"""
