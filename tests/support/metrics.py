"""Reading a daemon's ``/metrics`` as Prometheus would: through its text parser.

A test takes a :class:`Scrape` before and after what it does and asserts on the
difference, so a shared stack's other tests (and the process metrics) do not matter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Scrape:
    """Every sample of one scrape: (sample name, sorted labels) -> value."""

    samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float]

    def value(self, name: str, **labels: str) -> float:
        """The sample ``name`` with exactly ``labels``; 0 if it was not exported yet
        (a labelled counter appears at its first increment)."""
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}

    def __sub__(self, before: Scrape) -> Delta:
        return Delta(self, before)


@dataclass(frozen=True)
class Delta:
    after: Scrape
    before: Scrape

    def value(self, name: str, **labels: str) -> float:
        return self.after.value(name, **labels) - self.before.value(name, **labels)


def parse(text: str) -> Scrape:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return Scrape(samples)


async def scrape(base_url: str) -> Scrape:
    """``GET {base_url}/metrics``, parsed."""
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(f"{base_url}/metrics")
    response.raise_for_status()
    return parse(response.text)
