"""A daemon started with a missing or bad setting names the variable and exits 78.

Run as an operator runs them (``python -m ...``), with the environment they would
have forgotten to fill: no traceback, no pydantic field names, the variable to set.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr
from pydantic_settings import BaseSettings

from bridge.config import BridgeSettings
from broker.config import BrokerSettings
from core import daemon
from history_api.config import ApiSettings
from push.config import PushSettings

WAIT = 30.0


def run_daemon(module: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MQCHAT_")}
    return subprocess.run(
        [sys.executable, "-m", module],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )


@pytest.mark.parametrize(
    ("module", "env", "expected"),
    [
        ("bridge", {"MQCHAT_BRIDGE_DATABASE_URL": "sqlite://"}, "MQCHAT_BRIDGE_PASSWORD: missing"),
        ("bridge", {}, "MQCHAT_BRIDGE_DATABASE_URL: missing"),
        (
            "bridge",
            {
                "MQCHAT_BRIDGE_DATABASE_URL": "sqlite://",
                "MQCHAT_BRIDGE_PASSWORD": "x" * 16,
                "MQCHAT_BRIDGE_MQTT_PORT": "not-a-port",
            },
            "MQCHAT_BRIDGE_MQTT_PORT: Input should be a valid integer",
        ),
        (
            "broker",
            {"MQCHAT_BROKER_DATABASE_URL": "sqlite://"},
            "MQCHAT_BROKER_BRIDGE_PASSWORD: missing",
        ),
        (
            "broker",
            {
                "MQCHAT_BROKER_DATABASE_URL": "sqlite://",
                "MQCHAT_BROKER_BRIDGE_PASSWORD": "x" * 16,
                "MQCHAT_BROKER_PORT": "70000",
            },
            "MQCHAT_BROKER_PORT: Input should be less than or equal to 65535",
        ),
        ("history_api", {}, "MQCHAT_API_DATABASE_URL: missing"),
        ("push", {"MQCHAT_PUSH_DATABASE_URL": "sqlite://"}, "MQCHAT_PUSH_VAPID_KEY_FILE: missing"),
        (
            "history_api",
            {"MQCHAT_API_DATABASE_URL": "sqlite://", "MQCHAT_API_PORT": "eighty"},
            "MQCHAT_API_PORT: Input should be a valid integer",
        ),
    ],
)
def test_a_bad_setting_is_named_by_its_variable(
    module: str, env: dict[str, str], expected: str, tmp_path: Path
) -> None:
    result = run_daemon(module, **env)
    assert result.returncode == 78, result.stderr
    lines = result.stderr.splitlines()[1:]
    assert any(line.startswith(f"  {expected}") for line in lines), result.stderr
    assert result.stderr.startswith(f"{module}: bad configuration:\n")
    assert "Traceback" not in result.stderr
    assert "errors.pydantic.dev" not in result.stderr


def test_the_bridge_refuses_a_database_not_at_the_newest_schema(tmp_path: Path) -> None:
    """An empty (never migrated) database: exit 78 and the command that fixes it,
    before the bridge takes any uplink it could not store."""
    done = run_daemon(
        "bridge",
        MQCHAT_BRIDGE_DATABASE_URL=f"sqlite:///{tmp_path / 'empty.db'}",
        MQCHAT_BRIDGE_PASSWORD="x" * 16,
    )
    assert done.returncode == 78, done.stderr
    assert "at revision None" in done.stderr
    assert "run `mqchat db upgrade` first" in done.stderr


@pytest.mark.parametrize(
    ("settings", "required"),
    [
        (BrokerSettings, {"database_url": "sqlite://", "bridge_password": "x" * 16}),
        (ApiSettings, {"database_url": "sqlite://"}),
    ],
    ids=["broker", "history_api"],
)
def test_tls_takes_a_certificate_and_its_key_both_there(
    settings: type[BaseSettings],
    required: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in list(os.environ):
        if name.startswith("MQCHAT_"):
            monkeypatch.delenv(name)
    cert = tmp_path / "cert.pem"
    cert.write_text("not read here")
    prefix = settings.model_config["env_prefix"]

    with pytest.raises(ValueError, match=f"set both {prefix}TLS_CERTFILE and {prefix}TLS_KEYFILE"):
        settings(**required, tls_certfile=cert)
    with pytest.raises(ValueError, match=re.escape(f"no such file: {tmp_path / 'key.pem'}")):
        settings(**required, tls_certfile=cert, tls_keyfile=tmp_path / "key.pem")
    assert settings(**required, tls_certfile=cert, tls_keyfile=cert)


# -- settings -> environment -> settings ----------------------------------------------


def _samples(files: Path) -> list[BaseSettings]:
    """One settings object per daemon with every field away from its default, so that
    a variable ``environment()`` drops or misnames shows as a difference."""
    cert, key = files / "cert.pem", files / "key.pem"
    cert.write_text("not read here")
    key.write_text("not read here")
    return [
        BrokerSettings(
            host="127.0.0.2",
            port=1884,
            ws_port=0,
            database_url="sqlite:///broker.db",
            bridge_username="bridge-2",
            bridge_password=SecretStr("broker's secret"),
            shutdown_timeout=3.5,
            session_expiry=3600,
            tls_certfile=cert,
            tls_keyfile=key,
            tls_host="::1",
            tls_port=8885,
            wss_port=0,
            connect_rate="5/second",
            auth_failures_per_user="3/minute",
            auth_failures_per_source="4/minute;40/hour",
            sign_ins_per_user="2/second",
            sign_ins_per_second=7.5,
            sign_in_burst=3,
            account_poll=0.5,
            connect_timeout=2.5,
            max_packet_bytes=4096,
            max_sessions_per_user=4,
            max_queued_messages=10,
            max_unreleased_messages=7,
            client_log_interval=0,
            publish_rate=12.5,
            publish_burst=6,
            mqtt_credential_secret=SecretStr("credential key, with = and ;"),
            metrics_addr="127.0.0.1:9102",
        ),
        BridgeSettings(
            database_url="postgresql+psycopg://u:p@db/mqchat",
            mqtt_host="broker.internal",
            mqtt_port=1885,
            mqtt_other_addresses="broker-2.internal:1886,broker-3.internal",
            username="bridge-2",
            password=SecretStr("bridge's secret, with = and ;"),
            client_id="mqchat-bridge-2",
            partitions=3,
            partition=2,
            amqp_addresses="rabbit-1.internal:5673,rabbit-2.internal",
            amqp_queues=12,
            keepalive=30,
            max_batch=16,
            max_payload_bytes=1024,
            max_body_chars=100,
            message_rate="1/second",
            uplink_rate="2/second;20/minute",
            max_devices=3,
            group_max_members=5,
            presence_ttl=60.5,
            presence_group_limit=0,
            presence_max_contacts=7,
            slow_turn=0.5,
            startup_timeout=5.0,
            shutdown_timeout=2.0,
            crash_at="after_commit:3",
            metrics_addr="127.0.0.1:9101",
            backlog_interval=5.0,
        ),
        ApiSettings(
            database_url="sqlite:///api.db",
            host="127.0.0.2",
            port=8001,
            mosquitto_host="mqtt.internal",
            mosquitto_port=1886,
            mosquitto_admin_username="admin-2",
            mosquitto_admin_password=SecretStr("admin's secret"),
            broker_auth_secret=SecretStr("broker's secret"),
            shutdown_timeout=4,
            token_ttl=timedelta(minutes=90, seconds=5),
            mqtt_credential_secret=SecretStr("credential key, with = and ;"),
            mqtt_credential_ttl=timedelta(seconds=42),
            tls_certfile=cert,
            tls_keyfile=key,
            login_failures_per_user="1/minute",
            login_failures_per_source="2/minute",
            sign_ins_per_user="3/minute",
            sign_ins_per_second=1.5,
            sign_in_burst=2,
            sign_in_threads=3,
            presence_group_limit=5,
            cors_origins=["https://app.example", "http://localhost:5173"],
            web_dir=files / "site",
            web_mqtt_url="wss://{host}:8443/mqtt",
            push_allow_hosts=["push.internal", "10.1.0.0/16"],
        ),
        PushSettings(
            database_url="sqlite:///push.db",
            vapid_key_file=files / "vapid.pem",
            vapid_subject="https://ops.example/contact",
            grace=1.5,
            collapse=4.0,
            poll=0.5,
            batch=7,
            concurrency=3,
            lease=30.0,
            gap_timeout=9.0,
            ttl=60,
            urgency="normal",
            request_timeout=2.5,
            max_response_bytes=100,
            max_attempts=2,
            max_retry_after=3.0,
            allow_hosts=["127.0.0.1", "push.internal"],
            ca_file=cert,
            shutdown_timeout=1.0,
            crash_after_decisions=2,
        ),
    ]


@pytest.mark.parametrize("index", range(4), ids=["broker", "bridge", "history_api", "push"])
def test_settings_survive_the_environment(
    index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _samples(tmp_path)[index]
    cls = type(settings)
    defaults = {name: field.get_default() for name, field in cls.model_fields.items()}
    unchanged = [name for name, default in defaults.items() if getattr(settings, name) == default]
    assert not unchanged, (
        f"give these a value in the sample, or the test cannot see them: {unchanged}"
    )

    env = daemon.environment(settings)
    for name in list(os.environ):
        if name.startswith("MQCHAT_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    assert cls() == settings
    assert set(env) == {daemon.variable(cls, name) for name in cls.model_fields}
    prefix = str(cls.model_config["env_prefix"])
    inherited = {"PATH": "/bin", f"{prefix}STALE": "from the parent"}
    assert daemon.child_environment(settings, inherited) == {"PATH": "/bin", **env}


def test_a_supervisor_names_settings_by_field_and_a_wrong_name_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``BridgeSettings(mqtt_hots=...)`` would ignore the name (the settings ignore
    what they do not know); ``build`` and ``replace`` refuse it, and neither reads
    this process's environment."""
    monkeypatch.setenv("MQCHAT_BRIDGE_KEEPALIVE", "99")
    settings = daemon.build(BridgeSettings, database_url="sqlite://", password="pw")
    assert settings.keepalive == BridgeSettings.model_fields["keepalive"].default
    with pytest.raises(TypeError, match="mqtt_hots"):
        daemon.build(BridgeSettings, database_url="sqlite://", password="pw", mqtt_hots="h")

    moved = daemon.replace(settings, mqtt_port=1884, crash_at="after_commit:2")
    assert (moved.mqtt_port, moved.crash_at) == (1884, "after_commit:2")
    assert moved.password.get_secret_value() == "pw"
    with pytest.raises(TypeError, match="crash_at_"):
        daemon.replace(settings, crash_at_="after_commit:2")
    env = daemon.environment(moved, defaults=False)
    assert set(env) == {
        "MQCHAT_BRIDGE_DATABASE_URL",
        "MQCHAT_BRIDGE_PASSWORD",
        "MQCHAT_BRIDGE_MQTT_PORT",
        "MQCHAT_BRIDGE_CRASH_AT",
    }


def test_one_variable_sets_the_presence_group_limit_of_bridge_and_api(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Who is whose contact must read the same on MQTT (the bridge) and over HTTP (the
    API): one variable sets both. The names each had before are still read, below it."""
    for name in list(os.environ):
        if name.startswith("MQCHAT_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MQCHAT_BRIDGE_PRESENCE_GROUP_LIMIT", "3")
    monkeypatch.setenv("MQCHAT_API_PRESENCE_GROUP_LIMIT", "4")
    bridge = BridgeSettings(database_url="sqlite://", password="pw")
    api = ApiSettings(database_url="sqlite://")
    assert (bridge.presence_group_limit, api.presence_group_limit) == (3, 4)

    monkeypatch.setenv("MQCHAT_PRESENCE_GROUP_LIMIT", "7")
    bridge = BridgeSettings(database_url="sqlite://", password="pw")
    api = ApiSettings(database_url="sqlite://")
    assert (bridge.presence_group_limit, api.presence_group_limit) == (7, 7)
    assert {
        daemon.variable(cls, "presence_group_limit") for cls in (BridgeSettings, ApiSettings)
    } == {"MQCHAT_PRESENCE_GROUP_LIMIT"}
