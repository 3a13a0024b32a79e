"""tests/support/services.py can run PostgreSQL from its binaries, as root or not."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from .support.services import start_postgres


def _select(url: str, statement: str) -> object:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(statement)).scalar_one()
    finally:
        engine.dispose()


def test_start_postgres_serves_databases_and_templates(tmp_path: Path) -> None:
    server = start_postgres(tmp_path)
    try:
        assert _select(server.url("postgres"), "SHOW fsync") == "on"

        server.create_database("app")
        assert _select(server.url("app"), "SELECT 1") == 1
        engine = create_engine(server.url("app"))
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (n int)"))
            conn.execute(text("INSERT INTO t VALUES (41), (1)"))
        engine.dispose()

        server.create_database("app_copy", template="app")
        assert _select(server.url("app_copy"), "SELECT sum(n) FROM t") == 42

        server.drop_database("app_copy")
        with pytest.raises(OperationalError, match="app_copy"):
            _select(server.url("app_copy"), "SELECT 1")
        assert server.is_running
    finally:
        server.close()
    assert not server.is_running
