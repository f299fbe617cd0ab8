"""The chat page: `GET /` and its files (gemmachat/web/), and opening it in a browser.

The page is plain JavaScript and CSS with no build step; Markdown, sanitising and code
highlighting are vendored, built files of npm packages (gemmachat/web/vendor/README.md). It talks
to the conversation API (gemmachat/server/conversations_routes.py) on the same origin. Model
output is untrusted: the page sanitises every reply, and the Content-Security-Policy below lets
nothing run or load that the server did not serve itself, should sanitising ever miss.
"""

from __future__ import annotations

import os
import sys
import webbrowser
from importlib import resources
from pathlib import Path
from typing import Mapping

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

from gemmachat.server.core import ServerCore

FOLDER = Path(str(resources.files("gemmachat") / "web"))
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {"content-security-policy": CONTENT_SECURITY_POLICY, "x-content-type-options": "nosniff",
           "referrer-policy": "no-referrer", "cache-control": "no-cache"}


def is_page(path: str) -> bool:
    """The page and its files need no API key: the page asks for it, then sends it with its calls."""
    return path == "/" or path.startswith("/web/")


class _Files(StaticFiles):
    def file_response(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        response = super().file_response(*args, **kwargs)
        response.headers.update(HEADERS)
        return response


def add_routes(app: FastAPI, core: ServerCore) -> None:
    page = (FOLDER / "index.html").read_text(encoding="utf-8")

    # HEAD too: Ollama's clients check that a server is up with HEAD / (ollama_routes.py).
    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=HEADERS)

    app.mount("/web", _Files(directory=FOLDER), name="web")


def can_open_browser(environ: Mapping[str, str], platform: str = sys.platform) -> bool:
    # On Linux and the BSDs a browser needs a display; without one, webbrowser would start a
    # text browser (lynx, w3m) in the server's own terminal.
    return platform in ("darwin", "win32") or bool(environ.get("DISPLAY") or environ.get("WAYLAND_DISPLAY"))


def open_browser(url: str, nobrowser: bool, environ: Mapping[str, str] = os.environ) -> None:
    """Open the page in the default browser, unless --nobrowser or there is no display."""
    if nobrowser or not can_open_browser(environ):
        return
    try:
        webbrowser.open(url, new=2)
    except Exception:  # noqa: BLE001 - the server is what matters; the URL is printed anyway
        pass
