"""What every daemon (broker, bridge, history API) shares with whoever supervises it.

Its exit code and message for a bad setting, its run until a signal stops it with
the exit code of each failure it expects (``serve``), the log line that says it is
ready, and its settings as the environment that starts it.

A bad setting is told as the environment variable an operator sets: pydantic's own
message names fields (``password``) and links to its docs; the operator has set, or
forgot, ``MQCHAT_BRIDGE_PASSWORD``. The ready lines live here rather than in the
daemons' packages so that ``mqchat up``, the tests and the benchmarks can wait for
them without importing a daemon.

A supervisor builds a daemon's settings object and ``environment(settings)`` turns it
into ``MQCHAT_BRIDGE_*`` variables, named from the settings class itself: a renamed
field renames its variable instead of silently dropping it, as a hand-typed
``"MQCHAT_BRIDGE_MQTT_HOST"`` would. ``build(BridgeSettings, ...)`` makes settings
from values alone (a test's daemons do not depend on the shell that runs them) and
``replace(settings, mqtt_port=...)`` changes some (a test restarting the bridge
through a proxy); a misspelt or renamed field raises in both.
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar, cast

from pydantic import AliasChoices, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode
from pythonjsonlogger.json import JsonFormatter

from protocol import topics

_S = TypeVar("_S", bound=BaseSettings)

EXIT_OK: Final = 0
#: The exit code of every daemon for a bad setting.
EXIT_CONFIG: Final = 78  # EX_CONFIG
#: A port to listen on is in use, or not ours to bind.
EXIT_CANNOT_LISTEN: Final = 71  # EX_OSERR
#: A second signal: exited at once, without finishing the shutdown.
EXIT_FORCED: Final = 130

#: In the embedded broker's log once every listener accepts connections: what
#: ``mqchat up`` waits for.
BROKER_READY_LOG: Final = "embedded broker listening on"

#: In the bridge's log once it consumes uplinks: what supervisors and tests wait for
#: (a bare "consuming" would also match psycopg's "consuming input failed").
BRIDGE_READY_LOG: Final = f"consuming {topics.ALL_UPLINKS}"

#: In the push daemon's log once it watches the database for undelivered messages.
PUSH_READY_LOG: Final = "push daemon watching for undelivered messages"


class Service(abc.ABC):
    """A daemon's work in the shape of uvicorn's server, as every daemon of ours has it.

    ``run()`` → ``startup()`` → ``main_loop()`` → ``shutdown()``. ``request_stop()``
    only sets a flag (it is what a signal calls); ``main_loop()`` returns once it is
    set, and ``shutdown()`` runs however the loop ended, bounded by a timeout of the
    daemon's settings.
    """

    def __init__(self) -> None:
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        await self.startup()
        try:
            await self.main_loop()
        finally:
            await self.shutdown()

    @abc.abstractmethod
    async def startup(self) -> None: ...

    @abc.abstractmethod
    async def main_loop(self) -> None: ...

    @abc.abstractmethod
    async def shutdown(self) -> None: ...


#: ``MQCHAT_LOG_FORMAT``: ``text`` (the default, one line each) or ``json`` (one object
#: per line with the same fields, for log shippers).
LOG_FORMAT_VARIABLE: Final = "MQCHAT_LOG_FORMAT"


def configure_logging(daemon: str) -> None:
    """The daemon's log lines on stderr: ``time daemon LEVEL message``, or as JSON.

    Exits with EXIT_CONFIG naming the variable if ``MQCHAT_LOG_FORMAT`` is neither.
    """
    kind = os.environ.get(LOG_FORMAT_VARIABLE, "text").strip().lower()
    if kind == "text":
        logging.basicConfig(
            level=logging.INFO, format=f"%(asctime)s {daemon} %(levelname)s %(message)s"
        )
        return
    if kind != "json":
        print(
            f"{daemon}: bad configuration:\n  {LOG_FORMAT_VARIABLE}: expected text or json",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_CONFIG)
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level"},
            static_fields={"daemon": daemon},
        )
    )
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def stop_on_signals(request_stop: Callable[[], None]) -> None:
    """SIGTERM or Ctrl-C calls ``request_stop`` (a flag; the daemon drains and exits);
    a second one exits at once with EXIT_FORCED.

    Call it from the daemon's event loop. Forcing is safe for ours: whatever a daemon
    had not finished is redelivered, or was never acknowledged.
    """
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            logging.warning("second signal: exiting now")
            os._exit(EXIT_FORCED)
        request_stop()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)


#: A failure a daemon expects, as an ``except`` clause would name it: the exception,
#: the exit code it ends the daemon with, and the ``logging`` format of the one line
#: it logs instead of a traceback (``%s``: the exception).
Failure = tuple[type[Exception], int, str]


async def serve(service: Service, failures: Sequence[Failure] = ()) -> int:
    """Run ``service`` until a signal stops it (:func:`stop_on_signals`); the exit code.

    EXIT_OK once it has shut down; the code of the first of ``failures`` that matches
    what ended it otherwise. Anything else propagates, with its traceback.
    """
    stop_on_signals(service.request_stop)
    try:
        await service.run()
    except Exception as exc:
        for kind, code, message in failures:
            if isinstance(exc, kind):
                logging.error(message, exc)
                return code
        raise
    return EXIT_OK


def parse_addr(value: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9101`` for IPv6) as a pair.

    Raises:
        ValueError: not ``host:port`` with a port from 0 to 65535.
    """
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def describe(exc: ValidationError, settings: type[BaseSettings]) -> str:
    """One line per bad setting: ``  MQCHAT_BRIDGE_PASSWORD: missing``."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        field = "_".join(str(part) for part in err["loc"]).upper()
        # A check across fields has no loc: name the family instead.
        key = prefix + field if field else prefix + "*"
        reason = "missing" if err["type"] == "missing" else err["msg"]
        lines.append(f"  {key}: {reason}")
    return "\n".join(lines)


def load(settings: type[_S], daemon: str, **values: Any) -> _S | None:
    """The settings from the environment (``values`` first), or None after printing
    what is wrong."""
    _known(settings, values)
    try:
        return settings(**values)
    except ValidationError as exc:
        # Not logging: it must read the same whatever logging is set up to do.
        print(f"{daemon}: bad configuration:\n{describe(exc, settings)}", file=sys.stderr)
        return None


def check_tls_pair(
    settings: type[BaseSettings], certfile: Path | None, keyfile: Path | None
) -> None:
    """A daemon's ``tls_certfile`` and ``tls_keyfile``: both or neither, and both
    there to read at startup rather than at the first TLS client.

    Raises:
        ValueError: naming the variables to set, or the file that is missing.
    """
    if (certfile is None) != (keyfile is None):
        names = [variable(settings, field) for field in ("tls_certfile", "tls_keyfile")]
        raise ValueError(f"set both {' and '.join(names)}")
    for path in (certfile, keyfile):
        if path is not None and not path.is_file():
            raise ValueError(f"no such file: {path}")


def build(settings: type[_S], **values: Any) -> _S:
    """Settings from ``values`` and the defaults alone, not from this environment: what
    a supervisor decides for a child (a test's bridge), whatever the shell has set.

    Which fields were given is kept (``model_fields_set``), for ``environment``.

    Raises:
        TypeError: a field of ``values`` is not one of the settings' (the settings
            ignore unknown names, so a renamed field would otherwise be dropped), or
            a field without a default is not given.
        pydantic.ValidationError: a value is not valid.
    """
    _known(settings, values)
    fields = settings.model_fields
    missing = [name for name, info in fields.items() if info.is_required() and name not in values]
    if missing:
        raise TypeError(f"{settings.__name__} needs {', '.join(missing)}")
    # Every field given, a default if nothing else: the environment has nothing to fill.
    defaults = {
        name: info.get_default(call_default_factory=True)
        for name, info in fields.items()
        if not info.is_required()
    }
    built = settings.model_validate(defaults | values)
    # Validated above; constructed again only to say which fields were given. (The
    # pydantic mypy plugin types model_construct on a TypeVar as its bound.)
    return cast(_S, settings.model_construct(_fields_set=set(values), **dict(built)))


def replace(settings: _S, **changes: Any) -> _S:
    """``settings`` with ``changes``, validated as the daemon will validate them.

    Like ``dataclasses.replace``: a field the settings do not have raises, where
    pydantic's ``model_copy(update=...)`` would keep it and ``environment`` drop it.
    As ``build``, it does not read the environment.

    Raises:
        TypeError: a field of ``changes`` is not one of the settings'.
        pydantic.ValidationError: a value of ``changes`` is not valid.
    """
    return build(type(settings), **(settings.model_dump(exclude_unset=True) | changes))


def _known(settings: type[BaseSettings], values: Mapping[str, Any]) -> None:
    # The settings ignore names they do not know (the environment is full of them):
    # a caller's misspelt or renamed field must not be ignored with them.
    unknown = sorted(set(values) - set(settings.model_fields))
    if unknown:
        raise TypeError(f"{settings.__name__} has no field {', '.join(unknown)}")


def variable(settings: type[BaseSettings], field: str) -> str:
    """The environment variable that sets ``field``: its alias, or prefix and name.

    As pydantic-settings reads them: an alias is taken as it is, without the prefix.
    """
    info = settings.model_fields[field]
    alias = info.validation_alias or info.alias
    if isinstance(alias, AliasChoices):
        alias = next((choice for choice in alias.choices if isinstance(choice, str)), None)
    if isinstance(alias, str):
        return alias.upper()
    return (str(settings.model_config.get("env_prefix", "")) + field).upper()


def environment(settings: BaseSettings, *, defaults: bool = True) -> dict[str, str]:
    """Every setting of ``settings`` as the variable that sets it, ready for a child's
    environment: reading them back gives equal settings (``tests/test_daemon_settings.py``).

    A setting that is None has no variable (unset is None for every such field ours
    has); secrets are written out, as the child needs them. ``defaults=False`` leaves
    out the settings nobody gave (``model_fields_set``): a daemon run from another
    checkout (a benchmark's before/after) then keeps its own defaults.
    """
    values = settings.model_dump(mode="json")
    env = {}
    for name, info in type(settings).model_fields.items():
        if not defaults and name not in settings.model_fields_set:
            continue
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            text = value.get_secret_value()
        else:
            text = _as_text(values[name], info)
        env[variable(type(settings), name)] = text
    return env


def child_environment(settings: BaseSettings, base: Mapping[str, str]) -> dict[str, str]:
    """``base`` (a parent's environment) with ``settings`` in place of every variable
    of the settings' prefix that it had: the settings object is the whole truth."""
    prefix = str(type(settings).model_config.get("env_prefix", "")).upper()
    kept = {key: value for key, value in base.items() if not key.upper().startswith(prefix)}
    return {**kept, **environment(settings)}


def _as_text(value: Any, info: FieldInfo) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and _not_json(info):
        # Not JSON: such a field splits a comma-separated value itself.
        return ",".join(str(item) for item in value)
    # JSON is what pydantic-settings reads for the rest: numbers, true/false, lists.
    return json.dumps(value)


def _not_json(info: FieldInfo) -> bool:
    # ``Annotated[..., NoDecode]`` puts the class itself in the metadata.
    return any(meta is NoDecode or isinstance(meta, NoDecode) for meta in info.metadata)
