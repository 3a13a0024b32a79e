"""The bridge daemon; see ``bridge.service`` for the data flow."""

from protocol import topics

#: In the bridge's log once it consumes uplinks: what supervisors and tests wait for
#: (a bare "consuming" would also match psycopg's "consuming input failed").
READY_LOG = f"consuming {topics.ALL_UPLINKS}"
