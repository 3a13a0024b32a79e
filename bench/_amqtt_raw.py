"""``python -m bench._amqtt_raw``: the embedded broker, as the load benchmark runs it.

The same ``python -m broker`` (amqtt, mqchat's sign-in gate, the subscription index),
with rules added to its topic ACL, for the raw baselines only: every signed-in
user may also publish to any user's ``down/#``, and publish and subscribe to
``bench/g/#`` (``bench.groups``), as the bench's mosquitto role allows
(``bench/_stack.py``). The rule is checked after the user's own, so chat traffic
goes through the same checks as in production. Never run this outside the benchmark.
"""

from __future__ import annotations

import sys
from typing import Any

from amqtt.contexts import Action
from amqtt.session import Session

from bench._group_gen import GROUP_TOPICS
from broker import __main__ as broker_main
from broker import embedded
from protocol import acl, topics

#: The rules the raw baselines add; the user's own rules were checked before them.
RAW_RULES = (
    acl.Rule("publish", topics.ALL_DOWNLINKS),
    # bench.groups' one-topic fan-out, on a bench-only topic outside chat/v1.
    acl.Rule("publish", GROUP_TOPICS),
    acl.Rule("subscribe", GROUP_TOPICS),
)


class RawTopicAcl(embedded.TopicAcl):
    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Any = None,
    ) -> bool | None:
        allowed = await super().topic_filtering(session=session, topic=topic, action=action)
        if allowed or topic is None or session is None or not session.username:
            return allowed
        verb: acl.Action = "publish" if action == Action.PUBLISH else "subscribe"
        return acl.allowed(RAW_RULES, session.username, verb, topic)


def _raw_config(settings: Any) -> dict[str, Any]:
    config = production_config(settings)
    plugins = config["plugins"]
    key = f"{embedded.__name__}.TopicAcl"
    plugins["bench._amqtt_raw.RawTopicAcl"] = plugins.pop(key)
    return config


production_config = embedded.broker_config

if __name__ == "__main__":
    embedded.broker_config = _raw_config  # type: ignore[assignment]
    sys.exit(broker_main.main())
