"""``GET /healthz``: the process is up and its database answers."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel
from sqlalchemy import text

from .deps import EngineDep
from .errors import UNAVAILABLE

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: Literal["ok"]


@router.get("/healthz", responses={503: UNAVAILABLE})
def healthz(engine: EngineDep) -> Health:
    # A plain def: FastAPI runs it in its thread pool, off the event loop.
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    return Health(status="ok")
