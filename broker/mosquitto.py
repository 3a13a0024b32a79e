"""mosquitto in production: its config file (``mosquitto.conf``), moved elsewhere.

The accounts and ACLs the broker holds are managed over MQTT by :mod:`core.dynsec`,
shared with the history API and the CLI; this module only rewrites the config, for
tests and benchmarks that start mosquitto from the production file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final


@dataclass(frozen=True)
class TlsListeners:
    """Where the TLS listeners of :func:`render_config` go, and their certificate."""

    port: int
    ws_port: int
    certfile: Path
    keyfile: Path


#: Settings a commented-out TLS example in mosquitto.conf may hold (``#listener 8883``:
#: no space after the '#', unlike a prose comment).
_TLS_EXAMPLE_RE: Final = re.compile(
    r"^#(listener|protocol|certfile|keyfile|cafile|tls_version|require_certificate)\b"
)


def render_config(
    template_text: str,
    *,
    host: str,
    port: int,
    ws_port: int,
    data_dir: Path,
    plugins: Mapping[str, Path] | None = None,
    tls: TlsListeners | None = None,
) -> str:
    """Move the production config to another place, changing nothing else.

    The MQTT listener goes to ``host:port``, the websockets listener to
    ``host:ws_port``, persistence, the dynsec file and the credential key into
    ``data_dir``, and the log
    to stderr. ``plugins`` maps a plugin's file name to the path to load it from
    instead (dynsec on machines of another architecture, the client-id plugin from
    the build directory); other plugin lines stay. With ``tls``, the commented-out
    TLS example of the template is turned on (unless it already is) and moved to
    ``tls``'s ports and files. Tests run what this returns, so the production file is
    the one under test.

    Raises:
        ValueError: the template does not have exactly one MQTT and one websockets
            listener (and, with ``tls``, one of each over TLS); or it has TLS
            listeners and ``tls`` is not given.
    """
    lines = template_text.splitlines()
    if tls is not None and "mqtt+tls" not in _listener_kinds(lines).values():
        lines = [_TLS_EXAMPLE_RE.sub(r"\1", line) for line in lines]
    listener_kinds = _listener_kinds(lines)
    expected = ["mqtt", "websockets"]
    if tls is not None:
        expected += ["mqtt+tls", "websockets+tls"]
    if sorted(listener_kinds.values()) != sorted(expected):
        raise ValueError(
            f"expected listeners {', '.join(expected)}; "
            f"found {', '.join(sorted(listener_kinds.values())) or 'none'}"
        )
    ports = {"mqtt": port, "websockets": ws_port}
    if tls is not None:
        ports |= {"mqtt+tls": tls.port, "websockets+tls": tls.ws_port}
    out: list[str] = []
    for index, line in enumerate(lines):
        key, value = _setting(line)
        if key == "listener":
            out.append(f"listener {ports[listener_kinds[index]]} {host}")
        elif key in ("certfile", "keyfile") and tls is not None:
            out.append(f"{key} {getattr(tls, key).as_posix()}")
        elif key == "persistence_location":
            out.append(f"persistence_location {data_dir.as_posix().rstrip('/')}/")
        elif key in ("plugin_opt_config_file", "plugin_opt_credential_key_file"):
            out.append(f"{key} {(data_dir / Path(value).name).as_posix()}")
        elif key == "plugin" and plugins and Path(value).name in plugins:
            out.append(f"plugin {plugins[Path(value).name].as_posix()}")
        elif key == "log_dest":
            continue
        else:
            out.append(line)
    out.append("log_dest stderr")
    return "\n".join(out) + "\n"


def _setting(line: str) -> tuple[str, str]:
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return "", ""
    key, _, value = stripped.partition(" ")
    return key, value.strip()


def _listener_kinds(lines: list[str]) -> dict[int, str]:
    """Line index of every ``listener`` -> its protocol, with ``+tls`` if it has a cert."""
    starts = [i for i, line in enumerate(lines) if _setting(line)[0] == "listener"]
    kinds: dict[int, str] = {}
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        block = [_setting(line) for line in lines[start + 1 : end]]
        kind = "websockets" if ("protocol", "websockets") in block else "mqtt"
        if any(key == "certfile" for key, _ in block):
            kind += "+tls"
        kinds[start] = kind
    return kinds
