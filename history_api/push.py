"""Push subscriptions and settings: how a device asks to be woken up when away.

* ``GET /v1/push/key``: the VAPID public key (``applicationServerKey``) to subscribe with;
* ``POST`` / ``PUT`` / ``DELETE /v1/devices/{device}/push``: the device's one
  subscription (endpoint, keys, channel), stored / replaced / removed;
* ``GET`` / ``PUT /v1/push/settings``: mute everything, opt into message previews;
* ``PUT`` / ``DELETE /v1/push/mutes/{conversation}``: mute one conversation.

The endpoint is a URL the push daemon will POST to: checked here (``core.endpoints``:
https only, no private addresses unless ``MQCHAT_API_PUSH_ALLOW_HOSTS`` names them)
and again by the daemon at every connection.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import APIRouter, Path, Response, status
from pydantic import BaseModel, Field
from sqlmodel import Session, col, func, select
from starlette.concurrency import run_in_threadpool

from core.endpoints import EndpointRefused, check
from protocol import errors
from store import history
from store import push as store_push
from store.devices import DEFAULT_MAX_DEVICES
from store.tables import PushSubscription

from .deps import CurrentUser, EngineDep, SessionDep, SettingsDep
from .errors import INVALID_JSON, UNAUTHENTICATED, UNAVAILABLE, ErrorResponse, storable

router = APIRouter(tags=["push"])

DeviceName = Annotated[str, Path(min_length=1, max_length=64)]
#: base64url without padding: 65-byte P-256 point (87 chars), 16-byte secret (22).
_B64URL = r"^[A-Za-z0-9_-]+={0,2}$"


class PushKeys(BaseModel):
    #: The device's P-256 public key, base64url (``PushSubscription.getKey("p256dh")``).
    p256dh: str = Field(min_length=80, max_length=100, pattern=_B64URL)
    #: The device's auth secret, base64url (``getKey("auth")``).
    auth: str = Field(min_length=16, max_length=32, pattern=_B64URL)


class PushSubscriptionIn(BaseModel):
    """What a browser's ``PushSubscription.toJSON()`` holds, plus the channel."""

    #: ``webpush`` (a browser's push service) or ``unifiedpush`` (an Android
    #: distributor's endpoint); both get the same encrypted POST.
    channel: Literal["webpush", "unifiedpush"] = "webpush"
    endpoint: str = Field(min_length=9, max_length=2048)
    keys: PushKeys


class PushSubscriptionPublic(BaseModel):
    device: str
    channel: str
    endpoint: str


class PushKey(BaseModel):
    #: base64url of the uncompressed P-256 point: ``applicationServerKey``; null when
    #: no push daemon has run yet.
    vapid_public_key: str | None


class PushSettingsBody(BaseModel):
    #: No pushes at all for this user.
    muted: bool = False
    #: The notification carries the message text (through the push service,
    #: encrypted to the device). Off by default.
    preview: bool = False


class PushSettingsPublic(PushSettingsBody):
    muted_conversations: list[str]


REFUSED_ENDPOINT = {
    "model": ErrorResponse,
    "description": "`invalid_payload`: a malformed subscription, or an endpoint that is "
    "not https or resolves to a loopback, private, link-local or multicast address",
}
TOO_MANY = {
    "model": ErrorResponse,
    "description": "`too_many_devices`: the account has as many subscriptions as it may",
}


@router.get("/v1/push/key", responses={401: UNAUTHENTICATED, 503: UNAVAILABLE})
def push_key(session: SessionDep, me: CurrentUser) -> PushKey:
    """The key push services check our requests against: a browser subscribes with it
    (``pushManager.subscribe({applicationServerKey})``). Null until a push daemon has
    started once (it makes the key): this server sends no pushes yet."""
    return PushKey(vapid_public_key=store_push.vapid_key(session))


def _store(
    engine: EngineDep, me: str, device: str, body: PushSubscriptionIn, response: Response
) -> PushSubscriptionPublic:
    with Session(engine) as session:
        count = session.exec(
            select(func.count())
            .select_from(PushSubscription)
            .where(col(PushSubscription.username) == me, col(PushSubscription.device) != device)
        ).one()
        if count >= DEFAULT_MAX_DEVICES:
            raise errors.ProtocolError(
                errors.TOO_MANY_DEVICES,
                f"{me} already has {count} push subscriptions; replace one of them",
            )
        fresh = store_push.subscribe(
            session, me, device, body.channel, body.endpoint, body.keys.p256dh, body.keys.auth
        )
        session.commit()
    response.status_code = status.HTTP_201_CREATED if fresh else status.HTTP_200_OK
    return PushSubscriptionPublic(device=device, channel=body.channel, endpoint=body.endpoint)


async def _register(
    engine: EngineDep,
    settings: SettingsDep,
    me: str,
    device: str,
    body: PushSubscriptionIn,
    response: Response,
) -> PushSubscriptionPublic:
    if not storable(device, body.endpoint):
        raise errors.ProtocolError(errors.INVALID_PAYLOAD, "NUL in the device or endpoint")
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), _unb64(body.keys.p256dh))
        if len(_unb64(body.keys.auth)) != 16:
            raise ValueError("auth must be 16 bytes")
    except ValueError as exc:
        raise errors.ProtocolError(errors.INVALID_PAYLOAD, f"keys: {exc}") from exc
    try:
        # Resolving may block on DNS: a worker thread, not the event loop.
        await run_in_threadpool(check, body.endpoint, settings.push_allowlist)
    except EndpointRefused as exc:
        raise errors.ProtocolError(errors.INVALID_PAYLOAD, f"endpoint refused: {exc}") from exc
    return await run_in_threadpool(_store, engine, me, device, body, response)


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4))


_WRITE_RESPONSES: dict[int | str, dict[str, object]] = {
    400: INVALID_JSON,
    401: UNAUTHENTICATED,
    409: TOO_MANY,
    422: REFUSED_ENDPOINT,
    503: UNAVAILABLE,
}


@router.post(
    "/v1/devices/{device}/push",
    status_code=status.HTTP_201_CREATED,
    responses={200: {"model": PushSubscriptionPublic}, **_WRITE_RESPONSES},
)
async def register_push(
    device: DeviceName,
    body: PushSubscriptionIn,
    engine: EngineDep,
    settings: SettingsDep,
    me: CurrentUser,
    response: Response,
) -> PushSubscriptionPublic:
    """Register this device's subscription (201; 200 if it replaced one): the device
    is pushed when a message waits for it. One per device name."""
    return await _register(engine, settings, me, device, body, response)


@router.put(
    "/v1/devices/{device}/push",
    responses={201: {"model": PushSubscriptionPublic}, **_WRITE_RESPONSES},
)
async def replace_push(
    device: DeviceName,
    body: PushSubscriptionIn,
    engine: EngineDep,
    settings: SettingsDep,
    me: CurrentUser,
    response: Response,
) -> PushSubscriptionPublic:
    """Replace this device's subscription (a browser's ``pushsubscriptionchange``);
    200, or 201 if it had none."""
    return await _register(engine, settings, me, device, body, response)


@router.delete(
    "/v1/devices/{device}/push",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses={401: UNAUTHENTICATED, 503: UNAVAILABLE},
)
def delete_push(device: DeviceName, engine: EngineDep, me: CurrentUser) -> None:
    """No more pushes to this device (204 whether it had a subscription or not)."""
    if not storable(device):
        return
    with Session(engine) as session:
        store_push.unsubscribe(session, me, device)
        session.commit()


def _public(prefs: store_push.Prefs) -> PushSettingsPublic:
    return PushSettingsPublic(
        muted=prefs.muted,
        preview=prefs.preview,
        muted_conversations=list(prefs.muted_conversations),
    )


@router.get("/v1/push/settings", responses={401: UNAUTHENTICATED, 503: UNAVAILABLE})
def get_push_settings(session: SessionDep, me: CurrentUser) -> PushSettingsPublic:
    return _public(store_push.prefs(session, me))


@router.put(
    "/v1/push/settings",
    responses={
        400: INVALID_JSON,
        401: UNAUTHENTICATED,
        422: {"model": ErrorResponse, "description": "`invalid_payload`"},
        503: UNAVAILABLE,
    },
)
def put_push_settings(
    body: PushSettingsBody, engine: EngineDep, me: CurrentUser
) -> PushSettingsPublic:
    with Session(engine) as session:
        store_push.set_prefs(session, me, muted=body.muted, preview=body.preview)
        session.commit()
        return _public(store_push.prefs(session, me))


def _mute(engine: EngineDep, me: str, conversation: str, muted: bool) -> None:
    with Session(engine) as session:
        if not storable(conversation) or not history.is_member(session, me, conversation):
            raise errors.ProtocolError(
                errors.UNKNOWN_CONVERSATION, f"no conversation {conversation!r} of yours"
            )
        store_push.mute(session, me, conversation, muted)
        session.commit()


_MUTE_PATH = "/v1/push/mutes/{conversation}"
#: What PUT and DELETE of a mute share: no body back, and the same refusals.
_MUTE_ROUTE: dict[str, Any] = {
    "status_code": status.HTTP_204_NO_CONTENT,
    "response_class": Response,
    "responses": {
        401: UNAUTHENTICATED,
        404: {"model": ErrorResponse, "description": "`unknown_conversation`"},
        503: UNAVAILABLE,
    },
}


@router.put(_MUTE_PATH, **_MUTE_ROUTE)
def mute_conversation(conversation: str, engine: EngineDep, me: CurrentUser) -> None:
    """No pushes for this conversation (its messages still arrive over MQTT)."""
    _mute(engine, me, conversation, True)


@router.delete(_MUTE_PATH, **_MUTE_ROUTE)
def unmute_conversation(conversation: str, engine: EngineDep, me: CurrentUser) -> None:
    _mute(engine, me, conversation, False)
