"""The embedded broker's topic index matches as MQTT does, and leaves no garbage.

``protocol.topics.matches``, the one topic matcher, is the reference, and it is
pinned here to paho's ``topic_matches_sub``: the index replaced paho's
``MQTTMatcher`` for the garbage its matching left, not for its answers. The index
keeps its trie (one walk per topic, not one test per filter).
"""

from __future__ import annotations

import gc
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub
from paho.mqtt.matcher import MQTTMatcher

from broker.topic_index import TopicIndex
from protocol import topics

LEVEL = st.sampled_from(["a", "b", "chat", "", "$SYS", "$x"])
TOPIC = st.lists(LEVEL, min_size=1, max_size=4).map("/".join)


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.one_of(LEVEL, st.just("+")), min_size=1, max_size=4))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels)


@settings(max_examples=300, deadline=None)
@given(st.sets(filters(), max_size=8), st.sets(filters(), max_size=4), TOPIC)
def test_matches_what_mqtt_matches_after_adds_and_removes(
    kept: set[str], removed: set[str], topic: str
) -> None:
    index = TopicIndex(kept | removed)
    for topic_filter in removed - kept:
        index.discard(topic_filter)
    expected = sorted(f for f in kept if topics.matches(topic, f))
    assert sorted(index.matching(topic)) == expected


@settings(max_examples=500, deadline=None)
@given(filters(), TOPIC)
def test_the_one_matcher_matches_what_paho_matches(topic_filter: str, topic: str) -> None:
    assert topics.matches(topic, topic_filter) == topic_matches_sub(topic_filter, topic)


def test_the_examples_of_the_standard() -> None:
    index = TopicIndex(["sport/tennis/player1/#", "sport/#", "#", "+/+", "/+", "+", "$SYS/#"])
    assert sorted(index.matching("sport/tennis/player1")) == [
        "#",
        "sport/#",
        "sport/tennis/player1/#",
    ]
    assert sorted(index.matching("sport")) == ["#", "+", "sport/#"]
    assert sorted(index.matching("/finance")) == ["#", "+/+", "/+"]
    assert index.matching("$SYS/monitor/Clients") == ["$SYS/#"]  # no first-level wildcards
    index.discard("$SYS/#")
    index.discard("not/there")
    assert index.matching("$SYS/monitor/Clients") == []


def garbage_after(match: Callable[[str], object]) -> int:
    gc.collect()
    gc.disable()
    try:
        for n in range(200):
            match(f"chat/v1/u/u{n:05}/down/msg")
        return gc.collect()  # what only the collector could free
    finally:
        gc.enable()


def test_matching_leaves_nothing_for_the_garbage_collector() -> None:
    filters = [f"chat/v1/u/u{n:05}/down/#" for n in range(200)] + ["chat/v1/u/+/up/#"]
    index = TopicIndex(filters)
    assert garbage_after(index.matching) == 0

    paho = MQTTMatcher()  # type: ignore[no-untyped-call]
    for topic_filter in filters:
        paho[topic_filter] = topic_filter
    # The reason for the index: every paho match leaves a reference cycle behind.
    assert garbage_after(lambda topic: list(paho.iter_match(topic))) >= 200
