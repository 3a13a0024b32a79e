"""``GET /v1/devices/{device}/cursors``: where one of the caller's devices left off.

An SDK that starts again (a new process, a reinstalled app with the same device
name) resumes from these instead of showing everything again, and fetches only what
lies after them.
"""

from __future__ import annotations

from fastapi import APIRouter, Path
from pydantic import BaseModel

from store import cursors

from .deps import CurrentUser, SessionDep
from .errors import UNAUTHENTICATED, UNAVAILABLE, storable

router = APIRouter(prefix="/v1/devices", tags=["devices"])


class DeviceCursor(BaseModel):
    conversation: str
    #: Everything up to this seq reached the device.
    delivered: int
    #: Everything up to this seq was read on the device.
    read: int


class DeviceCursors(BaseModel):
    device: str
    cursors: list[DeviceCursor]


@router.get("/{device}/cursors", responses={401: UNAUTHENTICATED, 503: UNAVAILABLE})
def device_cursors(
    session: SessionDep,
    me: CurrentUser,
    device: str = Path(min_length=1, max_length=64),
) -> DeviceCursors:
    """The caller's own device only: the path names a device of the signed-in user."""
    rows = cursors.of_device(session, me, device) if storable(device) else []
    return DeviceCursors(
        device=device,
        cursors=[
            DeviceCursor(conversation=r.conversation, delivered=r.delivered, read=r.read)
            for r in rows
        ],
    )
