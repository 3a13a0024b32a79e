"""The history API serves the web app same-origin (``MQCHAT_API_WEB_DIR``), and only
at ``/`` and ``/app/``: every other path keeps the API's own 404. The app itself is
tested in chromium by ``tests/test_js.py``."""

from __future__ import annotations

from pathlib import Path

from history_api import ApiSettings

from .support.history import serve, sqlite_database


def _site(directory: Path) -> Path:
    site = directory / "site"
    site.mkdir()
    (site / "index.html").write_text("<!doctype html><title>mqchat</title>")
    (site / "app.js").write_text("export {};\n")
    return site


async def test_the_page_its_files_and_where_the_broker_is(tmp_path: Path) -> None:
    with sqlite_database(tmp_path) as url:
        settings = ApiSettings(
            database_url=url, web_dir=_site(tmp_path), web_mqtt_url="ws://{host}:9001/mqtt"
        )
        async with serve(settings) as api:
            page = await api.get("/")
            assert page.status_code == 200
            assert "<title>mqchat</title>" in page.text
            assert page.headers["cache-control"] == "no-cache"
            script = await api.get("/app/app.js")
            assert (script.status_code, script.text) == (200, "export {};\n")
            config = await api.get("/app/config.json")
            assert config.json() == {"mqtt_url": "ws://{host}:9001/mqtt"}
            missing = await api.get("/v2/conversations")
            assert missing.status_code == 404
            assert missing.json()["error"]["code"] == "unknown_route"
            # Not part of the API's contract: the OpenAPI document leaves the page out.
            paths = (await api.get("/openapi.json")).json()["paths"]
            assert "/" not in paths
            assert not any(path.startswith("/app") for path in paths)


async def test_without_a_web_dir_there_is_no_page(tmp_path: Path) -> None:
    with sqlite_database(tmp_path) as url:
        async with serve(ApiSettings(database_url=url)) as api:
            response = await api.get("/")
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "unknown_route"
