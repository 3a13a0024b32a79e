"""Full-text search over the messages of the caller's conversations.

Both dialects answer the same question, "messages containing every word of the
query", with what each does well (migration 0003 builds both):

* PostgreSQL: ``to_tsvector('simple', body) @@ plainto_tsquery('simple', q)``, served by
  the GIN index on exactly that expression. ``simple`` lower-cases and does no
  stemming, which suits chat in any language.
* SQLite: the FTS5 table ``messages_fts`` (external content over ``messages``). The
  query is rebuilt from the words of ``q``, each quoted, so FTS5 syntax in user input
  (``OR``, ``NEAR``, ``*``, ``col:``) is searched for as text, never interpreted.
"""

from __future__ import annotations

import re
from typing import Final

import sqlalchemy as sa
from sqlalchemy import String, column, func, literal_column, table
from sqlmodel import Session, col, select

from .history import MESSAGE_COLUMNS, HistoryMessage, to_history_message, visible_to
from .tables import MemberPeriod, Message

MAX_QUERY_CHARS: Final = 256

#: What FTS5's ``unicode61`` tokenizer keeps as a token: letters and digits.
_WORD = re.compile(r"[^\W_]+")
_fts = table("messages_fts", column("rowid"))
_SIMPLE: Final = literal_column("'simple'", type_=String())


def fts5_query(text: str) -> str:
    """The words of ``text`` as an FTS5 query that matches rows containing all of them."""
    return " ".join(f'"{word}"' for word in _WORD.findall(text))


def search(session: Session, username: str, text: str, *, limit: int = 20) -> list[HistoryMessage]:
    """Messages of the caller's conversations that contain every word of ``text``, newest
    first; none if ``text`` has no words. Only messages inside the caller's membership
    periods, and no group events (their text is the server's, not anyone's words)."""
    if _WORD.search(text) is None:
        return []
    mine = col(Message.conversation_id).in_(
        select(MemberPeriod.conversation_id).where(col(MemberPeriod.username) == username)
    )
    query = sa.select(*MESSAGE_COLUMNS).where(
        mine,
        visible_to(Message.conversation_id, Message.seq, username),
        col(Message.event).is_(None),
    )
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        document = func.to_tsvector(_SIMPLE, col(Message.body))
        query = query.where(document.bool_op("@@")(func.plainto_tsquery(_SIMPLE, text)))
    elif dialect == "sqlite":
        query = query.join(_fts, _fts.c.rowid == col(Message.pk)).where(
            literal_column("messages_fts").op("MATCH")(fts5_query(text))
        )
    else:
        raise NotImplementedError(f"no full-text search for {dialect}")
    query = query.order_by(col(Message.sent_at).desc(), col(Message.pk).desc()).limit(limit)
    return [to_history_message(row) for row in session.execute(query).all()]
