"""``GET /v1/search``: full-text search over the messages of the caller's conversations."""

from __future__ import annotations

from typing import Annotated, Final

from fastapi import APIRouter, Query
from pydantic import BaseModel

from protocol import DownMessage
from store import search as store_search

from .deps import CurrentUser, SessionDep
from .errors import UNAUTHENTICATED, UNAVAILABLE, ErrorResponse, storable

router = APIRouter(prefix="/v1/search", tags=["search"])

DEFAULT_RESULTS: Final = 20
MAX_RESULTS: Final = 100


class SearchResults(BaseModel):
    #: Newest first, with the field names of the ``down/msg`` payload.
    messages: list[DownMessage]


@router.get(
    "",
    responses={
        401: UNAUTHENTICATED,
        422: {"model": ErrorResponse, "description": "`invalid_payload`: a bad parameter"},
        503: UNAVAILABLE,
    },
)
def search_messages(
    session: SessionDep,
    me: CurrentUser,
    q: Annotated[
        str,
        Query(
            min_length=1,
            max_length=store_search.MAX_QUERY_CHARS,
            description="Words that must all occur in a message (case-insensitive)",
        ),
    ],
    limit: Annotated[int, Query(ge=1, le=MAX_RESULTS)] = DEFAULT_RESULTS,
) -> SearchResults:
    """Messages of the caller's conversations that contain every word of ``q``."""
    found = store_search.search(session, me, q, limit=limit) if storable(q) else []
    return SearchResults(messages=[message.down() for message in found])
