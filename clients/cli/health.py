"""Each daemon's health as its ``/readyz`` tells it, for ``mqchat up`` and ``mqchat status``.

``mqchat up`` writes where its daemons answer (``<data-dir>/endpoints.json``: the
bridge's and the broker's metrics listeners, the API's port) so that ``mqchat status``
finds them without being told; a production deployment names them with options.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx

from .output import say

ENDPOINTS_FILE: Final = "endpoints.json"
#: Seconds between two looks at every daemon's readiness while ``mqchat up`` runs.
WATCH_INTERVAL: Final = 5.0
#: Seconds one probe may take (the daemons bound their own checks to 2 s).
PROBE_TIMEOUT: Final = 4.0


@dataclass(frozen=True)
class Health:
    """``ready``, ``not ready`` (with the failing checks) or ``down`` (no answer)."""

    state: str
    checks: Mapping[str, str]

    def describe(self) -> str:
        failing = {name: verdict for name, verdict in self.checks.items() if verdict != "ok"}
        if not failing:
            return self.state
        return f"{self.state} ({'; '.join(f'{k}: {v}' for k, v in failing.items())})"


async def probe(http: httpx.AsyncClient, base_url: str) -> Health:
    """The readiness of the daemon whose health endpoints are under ``base_url``."""
    try:
        response = await http.get(f"{base_url}/readyz", timeout=PROBE_TIMEOUT)
        body = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        return Health("down", {"http": str(exc) or type(exc).__name__})
    checks = body.get("checks", {}) if isinstance(body, dict) else {}
    state = "ready" if response.status_code == 200 else "not ready"
    return Health(state, {str(k): str(v) for k, v in checks.items()})


async def probe_all(endpoints: Mapping[str, str]) -> dict[str, Health]:
    async with httpx.AsyncClient() as http:
        found = await asyncio.gather(*(probe(http, url) for url in endpoints.values()))
    return dict(zip(endpoints, found, strict=True))


def write_endpoints(data_dir: Path, endpoints: Mapping[str, str]) -> None:
    (data_dir / ENDPOINTS_FILE).write_text(json.dumps(dict(endpoints), indent=2) + "\n")


def read_endpoints(data_dir: Path) -> dict[str, str]:
    """What ``mqchat up`` wrote; empty if it has not run in ``data_dir``."""
    try:
        found = json.loads((data_dir / ENDPOINTS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}


async def watch(endpoints: Mapping[str, str], interval: float = WATCH_INTERVAL) -> None:
    """Say each daemon's readiness whenever it changes, until cancelled.

    Quiet until every daemon has been ready once: starting up is the supervisor's to
    report. Then ``bridge: not ready (database: ...)`` and ``bridge: ready`` as they
    come, which is what a person watching ``mqchat up`` needs from a database gone away.
    """
    last: dict[str, str] = {}
    settled = False
    while True:
        now = await probe_all(endpoints)
        if not settled:
            settled = all(h.state == "ready" for h in now.values())
            last = {name: h.state for name, h in now.items()}
        else:
            for name, health in now.items():
                if health.state != last.get(name):
                    say(f"{name}: {health.describe()}")
                last[name] = health.state
        await asyncio.sleep(interval)
