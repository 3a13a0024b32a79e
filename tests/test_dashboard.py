"""The Grafana dashboard and the alert rules in docs/ name only metrics the daemons export.

A renamed metric would otherwise leave an empty panel, or an alert that never fires,
for an operator to find out about on the bad day. The names are taken from a live
embedded stack with its API (the bridge, the embedded broker and the history API), as
Prometheus would scrape them; a labelled metric nobody has incremented yet still has
its ``# TYPE`` line, so the family counts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.stack import Stack

DOCS = Path(__file__).resolve().parents[1] / "docs"
#: The sample names each family type exposes, besides the family's own name.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("_count", "_sum", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}
METRIC = re.compile(r"\b((?:mqchat|process|python)_[a-z0-9_]+)")


async def exported(urls: list[str]) -> set[str]:
    names: set[str] = set()
    async with httpx.AsyncClient(timeout=10) as http:
        for url in urls:
            response = await http.get(f"{url}/metrics")
            response.raise_for_status()
            for family in text_string_to_metric_families(response.text):
                names.add(family.name)
                names.update(family.name + s for s in SUFFIXES.get(family.type, ("",)))
                names.update(sample.name for sample in family.samples)
    return names


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


def alert_rule_queries() -> list[str]:
    """The ``expr:`` lines of docs/operations.md's example rules."""
    text = (DOCS / "operations.md").read_text()
    return re.findall(r"^\s*expr: (.+)$", text, flags=re.MULTILINE)


async def test_every_query_names_an_exported_metric(embedded: Stack) -> None:
    api = await embedded.start_api()
    names = await exported([embedded.bridge_metrics_url, embedded.broker_metrics_url, api])
    queries = dashboard_queries() + alert_rule_queries()
    assert len(alert_rule_queries()) >= 4  # the rules are where the test looks for them
    unknown = {
        metric for query in queries for metric in METRIC.findall(query) if metric not in names
    }
    assert not unknown, f"queries name metrics no daemon exports: {sorted(unknown)}"
    # And the dashboard shows every mqchat metric there is, so none goes unseen.
    families = {n for n in names if n.startswith("mqchat_")}
    shown = {m for query in dashboard_queries() for m in METRIC.findall(query)}
    base = {re.sub(r"_(total|bucket|count|sum|created)$", "", n) for n in shown}
    missing = {
        f
        for f in families
        if re.sub(r"_(total|bucket|count|sum|created)$", "", f) not in base
        and not f.endswith(("_created", "_checked_timestamp_seconds"))
    }
    assert not missing, f"exported but on no dashboard panel: {sorted(missing)}"
