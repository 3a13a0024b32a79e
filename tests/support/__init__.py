"""The shared test machinery: what the tests' fixtures and the benchmarks are built from.

Importable by both (``tests/conftest.py`` and ``bench/``); nothing here is a fixture
and nothing imports a test module (``tests/test_layout.py`` checks).

* ``services``: mosquitto and PostgreSQL from their binaries, our daemons as child
  processes (``Daemon``: a ``core.supervisor.Child``, as under ``mqchat up``), free
  ports and waiting helpers;
* ``stack``: the two mqchat stacks (embedded, production) wired from those, each
  daemon from its settings object, with per-test users and clients;
* ``packets``: MQTT packets as bytes, ``raw``: a raw socket client for them;
* ``clients``: recording MQTT clients (ACL probes, presence watchers);
* ``history``: the history API's data and in-process app;
* ``fuzz``: hypothesis strategies for hostile uplinks;
* ``chaos`` and ``tcp_proxy``: fault injection and the history checker.
"""
