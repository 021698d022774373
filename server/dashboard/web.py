"""The dashboard's web app: one page, its JSON, live updates (server-sent events) and audio.

It listens on 127.0.0.1 unless told otherwise and answers only requests that carry the folder's
credential (:func:`credential`): the ``?token=`` of the URL ``fedvox-server`` prints (exchanged
for an HttpOnly, SameSite=Strict cookie, then dropped from the address bar) or an
``Authorization: Bearer`` header. Host headers other than the bound address are refused, so a web
page elsewhere cannot reach it by DNS rebinding. The one action, registering a waiting device,
additionally needs a same-origin ``POST`` with the ``X-Fedvox-Action`` header, which a cross-site
form cannot send. Everything the page uses ships in this package (no CDN, nothing fetched).
"""

from __future__ import annotations

import asyncio
import hmac
import html
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from fedvox.server.dashboard.view import Source, snapshot
from fedvox.server.deploy.control_auth import ensure_token
from fedvox.shared.errors import FedvoxError

STATIC = Path(__file__).parent / "static"
COOKIE = "fedvox-dashboard"
ACTION_HEADER = "x-fedvox-action"
UPDATE_S = 2.0
REFUSED = "this dashboard needs its credential: open the URL fedvox-server printed (with ?token=...)\n"

Register = Callable[[str, str], list[str]]
"""Register a waiting device by fingerprint under a name; returns what happened, in lines."""


def credential(source: Source) -> str:
    """The folder's dashboard token: ``state/dashboard.token`` in a server home, else
    ``.dashboard.token`` in the folder; made (0600) on first use like the Control API's token, and
    separate from it: the dashboard's holder can read the run and register a waiting device, not
    submit runs."""
    return ensure_token(source.home.state / "dashboard.token" if source.home else source.root / ".dashboard.token")


def dashboard_app(source: Source, token: str, hosts: list[str] | None, register: Register | None = None) -> Starlette:
    """The ASGI app for ``source`` (``hosts``: the Host header values it answers to; ``None``: any)."""

    def host_ok(request: Request) -> bool:
        return hosts is None or request.url.hostname in hosts

    def allowed(request: Request) -> bool:
        if not host_ok(request):
            return False
        given = request.cookies.get(COOKIE) or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return bool(given) and hmac.compare_digest(given, token)

    def guarded(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            if not allowed(request):
                return PlainTextResponse(REFUSED, status_code=401)
            return await handler(request)

        return endpoint

    async def page(request: Request) -> Response:
        given = request.query_params.get("token")
        if given is not None:  # the printed URL: trade the token for a cookie, keep it out of history
            if not host_ok(request) or not hmac.compare_digest(given, token):
                return PlainTextResponse(REFUSED, status_code=401)
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
            return response
        if not allowed(request):
            return PlainTextResponse(REFUSED, status_code=401)
        data = await run_in_threadpool(snapshot, source, request.query_params.get("run"))
        return Response(
            _page(data),
            media_type="text/html; charset=utf-8",
            headers={"content-security-policy": CSP, "cache-control": "no-store"},
        )

    async def api_snapshot(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(snapshot, source, request.query_params.get("run")))

    async def events(request: Request) -> Response:
        run = request.query_params.get("run")

        async def stream() -> AsyncIterator[str]:
            sent = ""
            while not await request.is_disconnected():
                data = await run_in_threadpool(snapshot, source, run)
                body = json.dumps({k: v for k, v in data.items() if k != "updated"}, sort_keys=True)
                if body != sent:
                    sent = body
                    yield f"data: {json.dumps(data)}\n\n"
                else:
                    yield ": unchanged\n\n"  # keeps the connection open through proxies
                await asyncio.sleep(UPDATE_S)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"cache-control": "no-store"})

    async def audio(request: Request) -> Response:
        path = source.audio.get(request.path_params["key"])
        if path is None:
            await run_in_threadpool(snapshot, source, None)  # finds the run's audio
            path = source.audio.get(request.path_params["key"])
        return FileResponse(path) if path is not None and path.is_file() else PlainTextResponse("no such audio\n", 404)

    async def static(request: Request) -> Response:
        path = STATIC / request.path_params["name"]
        if path.parent != STATIC or not path.is_file():
            return PlainTextResponse("not found\n", status_code=404)
        return FileResponse(path)

    async def register_device(request: Request) -> Response:
        if register is None:
            return JSONResponse({"error": "this dashboard is read-only (a finished run)"}, status_code=403)
        if request.headers.get(ACTION_HEADER) != "register":
            return JSONResponse({"error": f"missing {ACTION_HEADER} header"}, status_code=403)
        try:
            body = await request.json()
            lines = await run_in_threadpool(register, str(body["fingerprint"]), str(body["name"]))
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "send JSON with fingerprint and name"}, status_code=400)
        except FedvoxError as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)
        return JSONResponse({"done": lines})

    routes = [
        Route("/", page),
        Route("/api/snapshot", guarded(api_snapshot)),
        Route("/api/events", guarded(events)),
        Route("/api/register", guarded(register_device), methods=["POST"]),
        Route("/audio/{key:path}", guarded(audio)),
        Route("/static/{name}", guarded(static)),
    ]
    return Starlette(routes=routes)


CSP = "default-src 'self'; img-src 'self' data:; media-src 'self'; style-src 'self' 'unsafe-inline'; script-src 'self'"


def _page(data: dict[str, Any]) -> str:
    """The page with the first snapshot inside, so it draws at once (and without a round trip)."""
    template = (STATIC / "index.html").read_text()
    embedded = json.dumps(data).replace("<", "\\u003c")  # nothing in it can close the script element
    return template.replace("{{title}}", html.escape(f"fedvox: {Path(data['folder']).name}")).replace(
        "{{snapshot}}", embedded
    )


__all__ = ["credential", "dashboard_app"]
