"""MQTT topic filters in a trie: which of them match a topic, without walking them all.

paho's ``MQTTMatcher`` does this too, but its ``iter_match`` builds a recursive closure
on every call, a reference cycle that only the garbage collector frees: one cycle per
message the embedded broker relays. With 1,000 connected users the collections that
freed them stalled amqtt for 30-90 ms at a time (``docs/benchmarks.md``). This one
matches with an explicit stack and leaves no garbage behind.
"""

from __future__ import annotations

from collections.abc import Iterable

MULTI = "#"
SINGLE = "+"


class _Node:
    __slots__ = ("children", "filter")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        #: The filter that ends at this node, if one does.
        self.filter: str | None = None


class TopicIndex:
    """A set of MQTT topic filters, asked which match a topic name (MQTT 3.1.1 4.7)."""

    def __init__(self, filters: Iterable[str] = ()) -> None:
        self._root = _Node()
        for topic_filter in filters:
            self.add(topic_filter)

    def add(self, topic_filter: str) -> None:
        node = self._root
        for level in topic_filter.split("/"):
            node = node.children.setdefault(level, _Node())
        node.filter = topic_filter

    def discard(self, topic_filter: str) -> None:
        """Remove ``topic_filter`` if present, and the branches it alone used."""
        path = [self._root]
        for level in topic_filter.split("/"):
            child = path[-1].children.get(level)
            if child is None:
                return
            path.append(child)
        path[-1].filter = None
        levels = topic_filter.split("/")
        for depth in range(len(levels), 0, -1):
            node = path[depth]
            if node.filter is not None or node.children:
                break
            del path[depth - 1].children[levels[depth - 1]]

    def matching(self, topic: str) -> list[str]:
        """Every filter that matches ``topic``; wildcards at the first level never match
        a topic that starts with ``$`` (MQTT 3.1.1 4.7.2)."""
        levels = topic.split("/")
        wild_first = not topic.startswith("$")
        found: list[str] = []
        stack = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            wild = wild_first or depth > 0
            if wild:
                rest = node.children.get(MULTI)
                if rest is not None and rest.filter is not None:
                    found.append(rest.filter)  # "a/#" matches "a" and all below it
            if depth == len(levels):
                if node.filter is not None:
                    found.append(node.filter)
                continue
            exact = node.children.get(levels[depth])
            if exact is not None:
                stack.append((exact, depth + 1))
            if wild:
                one = node.children.get(SINGLE)
                if one is not None:
                    stack.append((one, depth + 1))
        return found
