"""Real servers and our daemons as child processes, for tests and benchmarks.

mosquitto and PostgreSQL are started from their binaries; our daemons
(:class:`Daemon`) as ``python -m <module>``. Every process but PostgreSQL's (which
``pg_ctl`` runs) is a ``core.supervisor.Child``, as under ``mqchat up``: one class
starts, waits for and stops them all.

These are plain helpers, not fixtures: the caller starts a server, keeps it as long
as it likes and stops it; nothing is registered globally, and a stopped server
leaves no process behind.

Running as root: neither server should run as root (PostgreSQL refuses to), so both
are started as an unprivileged account (``mosquitto`` / ``postgres`` if they exist,
else ``nobody``). That account cannot reach into pytest's temporary directories
(mode 0700, owned by root), so as root a server's files live in a directory of its
own under the system temp dir, linked from ``base_dir``; :meth:`close` removes it.
"""

from __future__ import annotations

import abc
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypedDict, Unpack

import psycopg
from psycopg import sql
from pydantic_settings import BaseSettings

from broker.mosquitto import TlsListeners, render_config
from core.dynsec import Credentials, write_dynsec_bootstrap
from core.mqtt import LinkConfig
from core.supervisor import Child
from core.supervisor import accepts as accepts  # where the tests have always found it

ROOT = Path(__file__).parents[2]
PRODUCTION_CONFIG = ROOT / "mosquitto.conf"
LOOPBACK = "127.0.0.1"


#: The lowest port :func:`free_port` hands out.
_FIRST_PORT = 10000
#: pytest-xdist workers (``gw0``...) that get a block of ports of their own.
_PORT_BLOCKS = 8


def _port_block() -> list[int]:
    """This process's ports: below the kernel's ephemeral range, where outgoing
    connections (and ``bind(0)``) take theirs, and one block per xdist worker. A port
    found free by ``bind(0)`` was once taken by another process's connection before the
    server it was meant for bound it (the JavaScript tests' stack, in CI)."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        ephemeral = int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return []
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    index = int(worker) % _PORT_BLOCKS if worker.isdigit() else 0
    size = (ephemeral - _FIRST_PORT) // _PORT_BLOCKS
    if size < 100:
        return []
    first = _FIRST_PORT + index * size
    start = secrets.randbelow(size)  # a rerun does not walk the same ports first
    return [first + (start + i) % size for i in range(size)]


_ports = _port_block()
_next_port = 0


def free_port() -> int:
    """A loopback TCP port nothing listens on, for a server this process starts next."""
    global _next_port
    for _ in range(len(_ports)):
        port = _ports[_next_port % len(_ports)]
        _next_port += 1
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue  # in use (or lingering): the next one
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _service_account(preferred: str) -> pwd.struct_passwd | None:
    """The account to run a server as: ``None`` (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in (preferred, "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError(f"running as root, but neither {preferred!r} nor 'nobody' exists")


def _workdir(base_dir: Path, name: str, account: pwd.struct_passwd | None) -> tuple[Path, bool]:
    """A fresh directory for one server; True if it lives outside base_dir."""
    base_dir.mkdir(parents=True, exist_ok=True)
    if account is None:
        workdir = base_dir / name
        workdir.mkdir()
        return workdir, False
    workdir = Path(tempfile.mkdtemp(prefix=f"mqchat-{name}-"))
    os.chown(workdir, account.pw_uid, account.pw_gid)
    (base_dir / name).symlink_to(workdir, target_is_directory=True)
    return workdir, True


def chown_tree(root: Path, account: pwd.struct_passwd | None) -> None:
    if account is None:
        return
    for path in [root, *root.rglob("*")]:
        os.chown(path, account.pw_uid, account.pw_gid, follow_symlinks=False)


def _run_as(account: pwd.struct_passwd | None) -> dict[str, Any]:
    """Popen arguments that drop to ``account`` in the child."""
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def wait_until(predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- our daemons ---------------------------------------------------------------------


class Daemon(Child):
    """One of our daemons as tests and benchmarks start it.

    Starting, waiting (``wait_ready``, ``wait_for_log``), stopping and killing are
    ``core.supervisor.Child``'s, as under ``mqchat up``; this only says where things
    are for a test: the log at ``log_dir/<name>.log``, this process's environment
    under ``env``, the daemon's ``settings`` over both (``Child.configure``), and the
    checkout it runs from: this one, or ``tree``, another with its own .venv (a
    benchmark's before/after runs).
    """

    def __init__(
        self,
        name: str,
        module: str,
        env: Mapping[str, str],
        log_dir: Path,
        tree: Path | None = None,
        *,
        settings: BaseSettings | None = None,
        ready_line: str | None = None,
        ports: Sequence[tuple[str, int]] = (),
    ) -> None:
        super().__init__(
            name,
            module,
            {**os.environ, **env},
            log_dir / f"{name}.log",
            settings=settings,
            ready_line=ready_line,
            ports=ports,
            python=tree / ".venv" / "bin" / "python" if tree else sys.executable,
            cwd=tree or ROOT,
        )


# -- mosquitto -------------------------------------------------------------------------


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if found is None:
        raise RuntimeError("mosquitto is not installed: apt-get install mosquitto")
    return found


DYNSEC_PLUGIN = "mosquitto_dynamic_security.so"
#: The client-id plugin mosquitto.conf loads, as ``make mosquitto-plugin`` builds it.
CLIENTID_PLUGIN = "mqchat_clientid_bind.so"
CLIENTID_PLUGIN_BUILT = ROOT / "build" / CLIENTID_PLUGIN
#: The plugin's key of MQTT credentials, as mosquitto.conf names it.
CREDENTIAL_KEY_FILE = "mqchat-credential.key"


def production_plugins(template: str, workdir: Path) -> dict[str, Path]:
    """Where a test broker loads the plugins of ``template`` from (for ``render_config``).

    dynsec: the configured path if it exists, else the one of this machine's arch.
    The client-id plugin: the one built in this checkout, copied into ``workdir`` so
    that the account mosquitto runs as can read it wherever the checkout lives.
    """
    configured = {
        Path(value).name: value
        for key, _, value in (line.partition(" ") for line in template.splitlines())
        if key == "plugin"
    }
    plugins: dict[str, Path] = {}
    dynsec = configured.get(DYNSEC_PLUGIN)
    if dynsec is not None and not Path(dynsec).exists():
        found = sorted(Path("/usr/lib").glob(f"*/{DYNSEC_PLUGIN}"))
        if not found:
            raise RuntimeError(f"dynamic-security plugin not found at {dynsec} nor /usr/lib/*/")
        plugins[DYNSEC_PLUGIN] = found[0]
    if CLIENTID_PLUGIN in configured:
        if not CLIENTID_PLUGIN_BUILT.exists():
            raise RuntimeError(
                f"{CLIENTID_PLUGIN_BUILT} is not built: run `make mosquitto-plugin` "
                "(`make test` does)"
            )
        plugins[CLIENTID_PLUGIN] = workdir / CLIENTID_PLUGIN
        shutil.copyfile(CLIENTID_PLUGIN_BUILT, plugins[CLIENTID_PLUGIN])
    return plugins


@dataclass(kw_only=True)
class _Server(abc.ABC):
    """What mosquitto and PostgreSQL have alike here: a directory of their own and the
    account they run as (see the module's docstring)."""

    #: Names its log, ``<program>.log``.
    program: ClassVar[str]

    workdir: Path
    #: The OS account it runs as; None: ours.
    account: pwd.struct_passwd | None
    #: ``workdir`` is outside ``base_dir``: :meth:`close` removes it.
    private_workdir: bool

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.program}.log"

    @abc.abstractmethod
    def stop(self) -> None: ...

    def close(self) -> None:
        """Stop, and remove the files if they were kept outside ``base_dir``."""
        self.stop()
        if self.private_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"

    def own_files(self) -> None:
        """Hand the working directory to the account the server runs as (when root)."""
        chown_tree(self.workdir, self.account)


@dataclass(kw_only=True)
class MosquittoServer(_Server):
    """A mosquitto running the production config from a directory of its own.

    Attributes:
        admin: the dynsec admin account (for :class:`core.dynsec.DynsecProvisioner`).
        bridge: the bridge's service account.
        credential_secret: the key of MQTT credentials (the plugin's key file).
        data_dir: persistence and dynamic-security.json.
        child: its process, ready once every listener accepts connections.
    """

    program: ClassVar[str] = "mosquitto"

    binary: str
    host: str
    port: int
    ws_port: int
    admin: Credentials
    bridge: Credentials
    tls: TlsListeners | None = None
    credential_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    child: Child = field(init=False)

    def __post_init__(self) -> None:
        self.child = Child(
            "mosquitto",
            [self.binary, "-c", str(self.conf_path)],
            os.environ,
            self.log_path,
            cwd=self.workdir,
            popen={"umask": 0o077, **_run_as(self.account)},
        )

    @property
    def conf_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def is_running(self) -> bool:
        return self.child.alive

    def link_config(self, credentials: Credentials, client_id: str, **options: Any) -> LinkConfig:
        """How to connect to this broker as ``credentials``; ``options`` override.

        For websockets pass ``port=server.ws_port, transport="websockets"``.
        """
        settings: dict[str, Any] = {"host": self.host, "port": self.port, **options}
        return LinkConfig(
            username=credentials.username,
            password=credentials.password,
            client_id=client_id,
            **settings,
        )

    def start(self, timeout: float = 15.0) -> None:
        """Start mosquitto and return once every listener accepts connections."""
        if self.is_running:
            raise RuntimeError("mosquitto is already running")
        ports = [self.port, self.ws_port]
        if self.tls is not None:
            ports += [self.tls.port, self.tls.ws_port]
        self.child.ports = [(self.host, port) for port in ports]
        self.child.start_ready(timeout)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (mosquitto saves its database) and wait; SIGKILL if it hangs."""
        self.child.stop(timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash would: whatever was not autosaved is lost."""
        self.child.kill()

    def restart(self, timeout: float = 15.0) -> None:
        self.child.stop(timeout)
        self.start(timeout)


def with_settings(config: str, settings: Mapping[str, str]) -> str:
    """``config`` (mosquitto.conf text) with the value of each named setting replaced.

    Raises:
        ValueError: a setting of ``settings`` is not in ``config``.
    """
    lines = config.splitlines()
    found = set()
    for index, line in enumerate(lines):
        words = line.split()
        if words and words[0] in settings:
            lines[index] = f"{words[0]} {settings[words[0]]}"
            found.add(words[0])
    if missing := set(settings) - found:
        raise ValueError(f"not in the config: {sorted(missing)}")
    return "\n".join(lines) + "\n"


class MosquittoOptions(TypedDict, total=False):
    """What a test may change of the production setup, for :func:`start_mosquitto` and
    :func:`prepare_mosquitto` alike.

    Attributes:
        host: the address every listener binds (loopback unless given).
        tls_cert: certificate chain and key (PEM): turns on the config's TLS
            listeners, on free ports (``server.tls``).
        settings: values of settings the production config has (``with_settings``).
    """

    host: str
    tls_cert: tuple[bytes, bytes] | None
    settings: Mapping[str, str] | None


def start_mosquitto(base_dir: Path, **options: Unpack[MosquittoOptions]) -> MosquittoServer:
    """Start mosquitto from the production config with fresh service accounts.

    The admin and bridge passwords are random; read them from the returned server.
    """
    server = prepare_mosquitto(base_dir, **options)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server


def prepare_mosquitto(base_dir: Path, **options: Unpack[MosquittoOptions]) -> MosquittoServer:
    """:func:`start_mosquitto` up to the start: config and dynsec bootstrap written.

    For a caller that changes the files first (a benchmark writes thousands of
    accounts into dynamic-security.json), then calls :meth:`MosquittoServer.own_files`
    and :meth:`MosquittoServer.start`.
    """
    host = options.get("host", LOOPBACK)
    tls_cert = options.get("tls_cert")
    binary = mosquitto_binary()
    account = _service_account("mosquitto")
    workdir, private = _workdir(base_dir, "mosquitto", account)
    template = PRODUCTION_CONFIG.read_text()
    server = MosquittoServer(
        binary=binary,
        workdir=workdir,
        host=host,
        port=free_port(),
        ws_port=free_port(),
        admin=Credentials("mqchat-admin", secrets.token_urlsafe(24)),
        bridge=Credentials("mqchat-bridge", secrets.token_urlsafe(24)),
        account=account,
        private_workdir=private,
    )
    server.data_dir.mkdir()
    if tls_cert is not None:
        server.tls = TlsListeners(
            port=free_port(),
            ws_port=free_port(),
            certfile=workdir / "server.pem",
            keyfile=workdir / "server.key",
        )
        server.tls.certfile.write_bytes(tls_cert[0])
        server.tls.keyfile.write_bytes(tls_cert[1])
    config = render_config(
        template,
        host=host,
        port=server.port,
        ws_port=server.ws_port,
        data_dir=server.data_dir,
        plugins=production_plugins(template, workdir),
        tls=server.tls,
    )
    server.conf_path.write_text(with_settings(config, options.get("settings") or {}))
    write_dynsec_bootstrap(
        server.data_dir / "dynamic-security.json", admin=server.admin, bridge=server.bridge
    )
    (server.data_dir / CREDENTIAL_KEY_FILE).write_text(server.credential_secret + "\n")
    server.own_files()
    return server


# -- PostgreSQL ------------------------------------------------------------------------


def postgres_bindir() -> Path:
    configured = os.environ.get("MQCHAT_PG_BINDIR")
    if configured:
        return Path(configured)
    debian = Path("/usr/lib/postgresql/15/bin")
    if (debian / "initdb").exists():
        return debian
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True)
        return Path(out.stdout.strip())
    raise RuntimeError(
        "PostgreSQL server binaries not found: set MQCHAT_PG_BINDIR or install postgresql"
    )


def _clean_env() -> dict[str, str]:
    # PGPORT, PGHOST, PGDATA... from the caller's shell must not redirect our tools.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


@dataclass(kw_only=True)
class PostgresServer(_Server):
    """A PostgreSQL cluster in a directory of its own, on loopback, trust auth.

    The superuser is ``postgres`` whatever the OS account. fsync is on, so a
    durability test sees what production would. ``pg_ctl`` runs the server (it
    daemonizes), so its process is not a ``Child``.
    """

    program: ClassVar[str] = "postgres"
    superuser: ClassVar[str] = "postgres"

    bindir: Path
    port: int
    host: str = LOOPBACK

    @property
    def socket_dir(self) -> Path:
        return self.workdir / "sock"

    @property
    def is_running(self) -> bool:
        return self.data_dir.exists() and self._postmaster_running()

    def url(self, dbname: str) -> str:
        """A SQLAlchemy URL for ``dbname`` (driver psycopg 3)."""
        return f"postgresql+psycopg://{self.superuser}@{self.host}:{self.port}/{dbname}"

    def conninfo(self, dbname: str) -> str:
        return f"host={self.host} port={self.port} user={self.superuser} dbname={dbname}"

    def start(self, timeout: float = 60.0) -> None:
        self._pg_ctl("start", "-l", str(self.log_path), "-w", "-t", str(int(timeout)))
        try:
            wait_until(self._ready, timeout=timeout, what="PostgreSQL")
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}; log tail:\n{self.log_tail()}") from exc

    def stop(self, timeout: float = 60.0) -> None:
        """Fast shutdown (a checkpoint, then exit), waiting for every backend to go."""
        if self.is_running:
            self._pg_ctl("stop", "-m", "fast", "-w", "-t", str(int(timeout)))

    def restart(self, timeout: float = 60.0) -> None:
        self.stop(timeout)
        self.start(timeout)

    def kill(self) -> None:
        """Immediate shutdown, as a crash would: the next start runs WAL recovery."""
        if self.is_running:
            self._pg_ctl("stop", "-m", "immediate", "-w")

    def create_database(self, name: str, template: str | None = None) -> None:
        """Create ``name``, as a copy of ``template`` if given (which must be idle)."""
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        self._admin_execute(statement)

    def drop_database(self, name: str) -> None:
        """Drop ``name`` if it exists, disconnecting whoever is still connected."""
        self._admin_execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )

    def _admin_execute(self, statement: sql.Composed) -> None:
        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
            conn.execute(statement)

    def _ready(self) -> bool:
        result = subprocess.run(
            [
                str(self.bindir / "pg_isready"),
                "-q",
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                self.superuser,
                "-d",
                "postgres",
                "-t",
                "1",
            ],
            env=_clean_env(),
            check=False,
        )
        return result.returncode == 0

    def _postmaster_running(self) -> bool:
        status = self._run(
            [str(self.bindir / "pg_ctl"), "status", "-D", str(self.data_dir)], check=False
        )
        return status.returncode == 0

    def _pg_ctl(self, *args: str) -> None:
        self._run([str(self.bindir / "pg_ctl"), *args, "-D", str(self.data_dir)])

    def _run(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            argv,
            cwd=self.workdir,
            env=_clean_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            **_run_as(self.account),
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
                f"\nlog tail:\n{self.log_tail()}"
            )
        return result


def start_postgres(base_dir: Path) -> PostgresServer:
    """initdb a fresh cluster and start it on a free loopback port."""
    bindir = postgres_bindir()
    account = _service_account("postgres")
    workdir, private = _workdir(base_dir, "postgres", account)
    server = PostgresServer(
        bindir=bindir, workdir=workdir, port=free_port(), account=account, private_workdir=private
    )
    server.socket_dir.mkdir()
    server.own_files()
    try:
        server._run(
            [
                str(bindir / "initdb"),
                "-D",
                str(server.data_dir),
                "-U",
                server.superuser,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-instructions",
            ]
        )
        with (server.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# tests/support/services.py\n"
                f"port = {server.port}\n"
                f"listen_addresses = '{server.host}'\n"
                f"unix_socket_directories = '{server.socket_dir}'\n"
                "fsync = on\n"
            )
        server.start()
    except BaseException:
        server.close()
        raise
    return server
