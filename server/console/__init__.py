"""The web console: static files served at ``/`` (the page) and ``/console/`` (its script,
style sheet and icon), shipped in the package. The page calls the documented JSON API only,
with the key the user enters (kept in the browser's session storage and sent as ``X-API-Key``),
and its Content-Security-Policy lets it reach nothing but the server that served it. The static
files need no key: they hold no data. ``--no-console`` leaves them out.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATIC = Path(__file__).with_name("static")
PREFIX = "/console"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:;"
       " connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def is_console_path(path: str) -> bool:
    """Whether ``path`` is one of the console's static files (served without a key)."""
    return path == "/" or path.startswith(PREFIX + "/")


class _Headers:
    """Add the console's security headers to every static response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, with_headers)


def install_console(app: FastAPI) -> None:
    """Serve the console at ``/`` and its files under ``/console/`` (not in the API schema)."""
    index = STATIC / "index.html"

    @app.get("/", include_in_schema=False)
    def console_page() -> FileResponse:
        return FileResponse(index, media_type="text/html", headers=HEADERS)

    app.mount(PREFIX, _Headers(StaticFiles(directory=STATIC)), name="console")
