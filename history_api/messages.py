"""``GET /v1/messages/{id}``: one message and how far it got to each recipient device."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel, Field

from protocol import DownMessage, errors
from store import history
from store import push as store_push

from .deps import CurrentUser, SessionDep
from .errors import UNAUTHENTICATED, UNAVAILABLE, not_found, storable

router = APIRouter(prefix="/v1/messages", tags=["messages"])


class DeviceDelivery(BaseModel):
    user: str
    #: Null for a recipient none of whose devices has acked the conversation yet.
    device: str | None
    #: When this device's delivered cursor first reached the message; null until then.
    delivered_at: datetime | None
    #: When this device's read cursor first reached the message; null until then.
    read_at: datetime | None


class PushDelivery(BaseModel):
    user: str
    device: str
    #: ``webpush`` or ``unifiedpush``; null if the device has unsubscribed since.
    channel: str | None
    #: The push that covered this message: ``due``, ``sent``, ``gone`` (the push
    #: service said the subscription is gone), ``failed``; null if none did (a device
    #: acknowledged it in time, or it was muted).
    state: str | None
    decided_at: datetime | None
    done_at: datetime | None


class MessageTrace(BaseModel):
    message: DownMessage
    #: When the server stored the message (its ``sent_at``).
    stored_at: datetime
    devices: list[DeviceDelivery] = Field(
        description="Every recipient (whoever was a member at the message's seq, the "
        "sender aside, members removed since included) with each of their devices "
        "that has a cursor in the conversation, or one entry with a null device if "
        "none has; by user and device name, at most 256"
    )
    #: True when more devices have cursors than ``devices`` lists.
    more_devices: bool = False
    push: list[PushDelivery] = Field(
        default_factory=list,
        description="Every recipient device with a push subscription, and the push "
        "that covered this message if one did; by user and device name, at most 256",
    )
    members: int = Field(description="How many recipients the message has")
    delivered: int = Field(description="Recipients with the message on any device")
    read: int = Field(description="Recipients who have read it on any device")


@router.get(
    "/{message_id}",
    responses={401: UNAUTHENTICATED, 404: not_found(errors.UNKNOWN_MESSAGE), 503: UNAVAILABLE},
)
def get_message(message_id: str, session: SessionDep, me: CurrentUser) -> MessageTrace:
    """A message by its client ``id``: the caller's own first, else one in a conversation
    of the caller's. Its delivery trace lists each recipient device's delivered and
    read time."""
    trace = history.delivery_trace(session, me, message_id) if storable(message_id) else None
    if trace is None:
        # Same answer for "no such message" and "not yours": ids cannot be probed.
        raise errors.ProtocolError(errors.UNKNOWN_MESSAGE, f"no message {message_id!r} of yours")
    return MessageTrace(
        message=trace.message.down(),
        stored_at=trace.message.sent_at,
        devices=[
            DeviceDelivery.model_validate(device, from_attributes=True) for device in trace.devices
        ],
        more_devices=trace.more_devices,
        push=[
            PushDelivery.model_validate(p, from_attributes=True)
            for p in store_push.trace(
                session,
                trace.message.conversation,
                trace.message.seq,
                {device.user for device in trace.devices},
                history.MAX_TRACE_DEVICES,
            )
        ],
        members=trace.tally.members,
        delivered=trace.tally.delivered,
        read=trace.tally.read,
    )
