"""RabbitMQ's HTTP auth backend, answered from mqchat's own accounts.

A RabbitMQ cluster asks ``rabbitmq_auth_backend_http`` four questions (form-encoded
POSTs; the answer is the text ``allow`` or ``deny``) about every user it does not know
itself (its own database holds only the service accounts):

* ``user``: may this username and password sign in?  The accounts table decides,
  with the same argon2 check as ``POST /v1/tokens``; ``rabbitmq_auth_backend_cache``
  in front keeps the answer for a few seconds, so a reconnect storm does not become a
  hashing storm.
* ``vhost``: only ``/``.
* ``resource``: writing to ``amq.topic`` (publishing), reading it (binding a
  subscription), and the user's own session queues: ``mqtt-subscription-<client
  id>qos0|1`` where the client id is the user's (``user`` or ``user:<device>``, as
  ``protocol.acl.client_id_allowed`` binds it on the other brokers). Another user's
  session queue is refused, so nobody can take over or drain it.
* ``topic``: the routing key, RabbitMQ's spelling of the MQTT topic (``/`` → ``.``,
  ``+`` → ``*``), checked against ``protocol.acl.USER_RULES``.

One source of truth: disabling, deleting or re-passwording an account needs no
provisioning step and holds on every node once the cache entry expires. The
endpoints exist only when ``MQCHAT_API_BROKER_AUTH_SECRET`` is set, under a path
holding that secret (``/broker-auth/<secret>/user``): RabbitMQ 3.10 sends no
credentials of its own, and the answers must not be a password oracle for anyone
who can reach the API. They are left out of the OpenAPI document.

RabbitMQ 3.10 treats a ``.`` inside an MQTT topic level as a level separator, so a
username with a dot would be two levels (``d.o`` → ``d/o``) and could read another
user's tree (``d`` subscribed to ``down/#`` matches ``d.down``'s downlinks). Such
names are refused here; ``POST /v1/users`` refuses to create them when this backend is
on (``accounts_for_rabbitmq``).
"""

from __future__ import annotations

import hmac
import logging
import re
from typing import Annotated, Final
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import PlainTextResponse

from protocol import acl, topics
from store import signin

from .deps import EngineDep, SettingsDep, SignInGuardDep

log = logging.getLogger(__name__)

#: RabbitMQ's exchange for MQTT (``mqtt.exchange``).
MQTT_EXCHANGE: Final = "amq.topic"
#: The queue ``rabbitmq_mqtt`` 3.10 holds a session's subscriptions in.
_SESSION_QUEUE: Final = re.compile(r"mqtt-subscription-(?P<client_id>.+)qos[01]")
MAX_FORM_BYTES: Final = 4096

router = APIRouter(prefix="/broker-auth/{secret}", include_in_schema=False)


def _allow() -> PlainTextResponse:
    return PlainTextResponse("allow")


def _deny() -> PlainTextResponse:
    return PlainTextResponse("deny")


def check_secret(secret: str, settings: SettingsDep) -> None:
    """404 unless the path holds the configured secret (the endpoints are off without
    one): nothing here answers anyone but the broker."""
    expected = settings.broker_auth_secret
    if expected is None or not hmac.compare_digest(
        secret.encode(), expected.get_secret_value().encode()
    ):
        raise HTTPException(404)


Authorized = Annotated[None, Depends(check_secret)]


async def _form(request: Request) -> dict[str, str]:
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise HTTPException(413)
    return dict(parse_qsl(body.decode(errors="replace"), max_num_fields=32))


def _user(form: dict[str, str]) -> str | None:
    """The username if it is one a RabbitMQ topic can carry: a valid username without
    ``.`` (see the module's docstring)."""
    user = form.get("username", "")
    if not topics.is_valid_username(user) or "." in user:
        return None
    return user


def mqtt_topic(routing_key: str) -> str:
    """An ``amq.topic`` routing key or binding as the MQTT topic or filter it came
    from (``rabbitmq_mqtt`` 3.10: ``/`` → ``.``, ``+`` → ``*``)."""
    return "/".join("+" if level == "*" else level for level in routing_key.split("."))


@router.post("/user")
async def user(
    engine: EngineDep,
    guard: SignInGuardDep,
    form: Annotated[dict[str, str], Depends(_form)],
    _: Authorized,
) -> PlainTextResponse:
    name = _user(form)
    if name is None:
        return _deny()
    client_id = form.get("client_id")
    if client_id is not None and not acl.client_id_allowed(name, client_id):
        return _deny()
    try:
        ok = await guard.verify(engine, name, form.get("password", ""))
    except signin.Busy:
        log.warning("broker sign-in of %s refused: too many password checks at once", name)
        return _deny()
    return _allow() if ok else _deny()


@router.post("/vhost")
def vhost(form: Annotated[dict[str, str], Depends(_form)], _: Authorized) -> PlainTextResponse:
    return _allow() if _user(form) is not None and form.get("vhost") == "/" else _deny()


@router.post("/resource")
def resource(form: Annotated[dict[str, str], Depends(_form)], _: Authorized) -> PlainTextResponse:
    name = _user(form)
    if name is None or form.get("vhost") != "/":
        return _deny()
    kind, target, permission = form.get("resource"), form.get("name", ""), form.get("permission")
    if kind == "exchange":
        return _allow() if target == MQTT_EXCHANGE and permission in {"read", "write"} else _deny()
    if kind == "queue":
        session = _SESSION_QUEUE.fullmatch(target)
        if session is not None and acl.client_id_allowed(name, session["client_id"]):
            return _allow()
    return _deny()


@router.post("/topic")
def topic(form: Annotated[dict[str, str], Depends(_form)], _: Authorized) -> PlainTextResponse:
    name = _user(form)
    if name is None or form.get("vhost") != "/" or form.get("name") != MQTT_EXCHANGE:
        return _deny()
    permission = form.get("permission")
    if permission not in {"write", "read"}:
        return _deny()
    action: acl.Action = "publish" if permission == "write" else "subscribe"
    mqtt = mqtt_topic(form.get("routing_key", ""))
    return _allow() if acl.allowed(acl.USER_RULES, name, action, mqtt) else _deny()
