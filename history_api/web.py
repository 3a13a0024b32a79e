"""The web app (clients/js), served same-origin at ``/``: a page that signs in here
needs no CORS, and ``make run`` gives a person a chat in the browser.

Only ``/``, ``/app/config.json`` and the built files under ``/app/`` are served, so
every other path keeps the API's own 404 (``unknown_route``).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from .config import ApiSettings


def install(app: FastAPI, settings: ApiSettings, web_dir: Path) -> None:
    index = web_dir / "index.html"

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        # Never cached: a rebuilt app is picked up at the next load.
        return FileResponse(index, headers={"Cache-Control": "no-cache"})

    @app.get("/app/config.json", include_in_schema=False)
    def config() -> dict[str, str]:
        return {"mqtt_url": settings.web_mqtt_url}

    app.mount("/app", StaticFiles(directory=web_dir), name="web")
