"""``mqchat status``: a running deployment at a glance, from its daemons' own endpoints.

Everything comes from ``/metrics`` and ``/readyz`` (nothing from the database): what
an operator sees here is what Prometheus sees. Rates and percentiles are over the
scrapes of the last minute the view has made (``--once``: over ``--sample`` seconds),
computed from counter and histogram-bucket differences as Prometheus' ``rate()`` and
``histogram_quantile()`` do.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.table import Table

from .health import Health, probe, read_endpoints
from .options import DEFAULT_DATA_DIR, DataDirOption
from .output import EXIT_CONFIG, EXIT_UNAVAILABLE, emit, fail

#: Seconds the view looks back for rates and percentiles.
WINDOW = 60.0
DELIVERED = "mqchat_commit_to_delivered_seconds"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass(frozen=True)
class Scrape:
    at: float
    samples: Samples

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, tuple(sorted(labels.items()))))

    def total(self, name: str) -> float:
        """Summed over every label set (both conversation kinds, say)."""
        return sum(v for (n, _), v in self.samples.items() if n == name)

    def buckets(self, name: str) -> dict[float, float]:
        """``le`` -> cumulative count of ``name``'s histogram, summed over other labels."""
        out: dict[float, float] = collections.defaultdict(float)
        for (n, labels), value in self.samples.items():
            if n == f"{name}_bucket":
                out[float(dict(labels)["le"])] += value
        return dict(out)


def parse(text: str, at: float) -> Scrape:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return Scrape(at, samples)


def quantile(q: float, before: Mapping[float, float], after: Mapping[float, float]) -> float | None:
    """``histogram_quantile(q, increase(...))``: linear within the bucket; None if empty."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return lower  # in the +Inf bucket: the highest finite bound, as Prometheus
            return lower + (bound - lower) * ((rank - below) / (count - below or 1))
        lower, below = bound, count
    return lower


@dataclass
class Daemon:
    name: str
    url: str
    health: Health | None = None
    scrapes: collections.deque[Scrape] | None = None

    def window(self) -> tuple[Scrape, Scrape] | None:
        if not self.scrapes or len(self.scrapes) < 2:
            return None
        return self.scrapes[0], self.scrapes[-1]


async def look(http: httpx.AsyncClient, daemon: Daemon) -> None:
    daemon.health = await probe(http, daemon.url)
    try:
        response = await http.get(f"{daemon.url}/metrics", timeout=5)
        response.raise_for_status()
    except httpx.HTTPError:
        return
    if daemon.scrapes is None:
        daemon.scrapes = collections.deque()
    now = time.monotonic()
    daemon.scrapes.append(parse(response.text, now))
    while len(daemon.scrapes) > 2 and now - daemon.scrapes[1].at >= WINDOW:
        daemon.scrapes.popleft()


def summary(daemons: Mapping[str, Daemon]) -> dict[str, Any]:
    """What the view shows, as the JSON ``--once --json`` prints (None: not known)."""
    out: dict[str, Any] = {
        "health": {
            name: {"state": d.health.state, "checks": dict(d.health.checks)}
            for name, d in daemons.items()
            if d.health is not None
        }
    }
    bridge = daemons.get("bridge")
    broker = daemons.get("broker")
    latest = bridge.scrapes[-1] if bridge and bridge.scrapes else None
    out["online_users"] = latest.value("mqchat_online_users") if latest else None
    out["undelivered"] = (
        latest.value("mqchat_undelivered_messages", older_than="0s") if latest else None
    )
    out["undelivered_over_5m"] = (
        latest.value("mqchat_undelivered_messages", older_than="5m") if latest else None
    )
    connected = broker.scrapes[-1] if broker and broker.scrapes else None
    # The embedded broker counts connections itself; behind mosquitto, presence's devices.
    out["connected_devices"] = (
        connected.value("mqchat_broker_connections")
        if connected
        else (latest.value("mqchat_online_devices") if latest else None)
    )
    window = bridge.window() if bridge else None
    out["window_seconds"] = None
    out["messages_in_per_s"] = out["messages_out_per_s"] = None
    out["commit_to_delivered_p50_s"] = out["commit_to_delivered_p99_s"] = None
    if window is not None:
        first, last = window
        seconds = last.at - first.at
        out["window_seconds"] = round(seconds, 1)
        for key, name in (
            ("messages_in_per_s", "mqchat_bridge_messages_stored_total"),
            ("messages_out_per_s", "mqchat_bridge_published_total"),
        ):
            out[key] = round((last.total(name) - first.total(name)) / seconds, 1)
        before, after = first.buckets(DELIVERED), last.buckets(DELIVERED)
        for key, q in (("commit_to_delivered_p50_s", 0.5), ("commit_to_delivered_p99_s", 0.99)):
            found = quantile(q, before, after)
            out[key] = None if found is None else round(found, 4)
    return out


def table(shown: Mapping[str, Any]) -> Table:
    view = Table(title="mqchat status", show_header=False, box=None)
    view.add_column(style="bold")
    view.add_column()

    def text(value: Any, unit: str = "") -> str:
        return "-" if value is None else f"{value:g}{unit}"

    for name, health in shown["health"].items():
        failing = [f"{k}: {v}" for k, v in health["checks"].items() if v != "ok"]
        colour = {"ready": "green", "not ready": "yellow"}.get(health["state"], "red")
        view.add_row(name, f"[{colour}]{health['state']}[/] {'; '.join(failing)}")
    view.add_row("connected devices", text(shown["connected_devices"]))
    view.add_row("online users", text(shown["online_users"]))
    view.add_row(
        "messages in / out",
        f"{text(shown['messages_in_per_s'])} / {text(shown['messages_out_per_s'])} per s",
    )
    view.add_row(
        "commit→delivered",
        f"p50 {text(shown['commit_to_delivered_p50_s'], ' s')}"
        f"  p99 {text(shown['commit_to_delivered_p99_s'], ' s')}"
        f"  (last {text(shown['window_seconds'], ' s')})",
    )
    view.add_row(
        "undelivered",
        f"{text(shown['undelivered'])} (over 5 min: {text(shown['undelivered_over_5m'])})",
    )
    return view


def status(
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    bridge: Annotated[
        str | None, typer.Option(help="The bridge's metrics URL (MQCHAT_BRIDGE_METRICS_ADDR).")
    ] = None,
    broker: Annotated[
        str | None, typer.Option(help="The embedded broker's metrics URL, if there is one.")
    ] = None,
    api: Annotated[
        str | None, typer.Option(envvar="MQCHAT_API_URL", help="The history API's URL.")
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="Look once and exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --once: one JSON object.")] = False,
    sample: Annotated[
        float, typer.Option(min=0.1, help="With --once: seconds between the two looks.")
    ] = 2.0,
    interval: Annotated[float, typer.Option(min=0.5, help="Seconds between refreshes.")] = 2.0,
) -> None:
    """A running mqchat at a glance: each daemon's health, connected devices, online
    users, messages/s, commit→delivered p50/p99 over the last minute, undelivered backlog.

    Refreshes until Ctrl-C; `--once --json` for scripts (exit 69 if a daemon is not
    ready). Finds `mqchat up`'s daemons through --data-dir; name a production
    deployment's with --bridge, --broker and --api.
    """
    endpoints = read_endpoints(Path(data_dir))
    for name, url in (("bridge", bridge), ("broker", broker), ("api", api)):
        if url:
            endpoints[name] = url.rstrip("/")
    if not endpoints:
        fail(
            EXIT_CONFIG,
            f"no endpoints: is `mqchat up --data-dir {data_dir}` running? "
            "Or name them with --bridge / --broker / --api",
        )
    daemons = {name: Daemon(name, url) for name, url in endpoints.items()}

    async def look_all(http: httpx.AsyncClient) -> None:
        await asyncio.gather(*(look(http, d) for d in daemons.values()))

    async def once_() -> dict[str, Any]:
        async with httpx.AsyncClient() as http:
            await look_all(http)
            await asyncio.sleep(sample)
            await look_all(http)
        return summary(daemons)

    async def live() -> None:
        async with httpx.AsyncClient() as http:
            await look_all(http)
            with Live(table(summary(daemons)), console=Console(), auto_refresh=False) as view:
                while True:
                    await asyncio.sleep(interval)
                    await look_all(http)
                    view.update(table(summary(daemons)), refresh=True)

    if once:
        shown = asyncio.run(once_())
        if as_json:
            emit(json.dumps(shown, sort_keys=True))
        else:
            Console().print(table(shown))
        if any(h["state"] != "ready" for h in shown["health"].values()):
            raise typer.Exit(EXIT_UNAVAILABLE)
        return
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a person leaves it
        asyncio.run(live())
