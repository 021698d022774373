"""The server's public port: TLS, and Flower's Fleet API only, forwarded to the SuperLink on loopback.

Flower 1.41 serves three APIs on one SuperLink port: Fleet (SuperNodes), Control (the operator:
register devices, submit runs, i.e. run code on the server) and Runtime (the ServerApp's own
process: acquire the run's task, pull every client reply). Out of the box the open-source
SuperLink authenticates callers of neither; fedvox adds a Control token and SuperExec
authentication (:mod:`server.deploy.control_auth`, :mod:`server.deploy.launcher`), and still keeps
the SuperLink on 127.0.0.1 and puts this gateway on the public address: it terminates TLS with the server
certificate devices
check, forwards ``POST /v1/fleet/<call>`` unchanged (SuperNode authentication is a signature in
the request headers, which the SuperLink verifies) and answers everything else with 404.

Bad input (random bytes, plain HTTP to the TLS port, a failed handshake, an oversized body)
costs one connection and a log line; the server goes on.
"""

from __future__ import annotations

import base64
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

from fedvox.shared.errors import DeploymentError

log = logging.getLogger(__name__)

FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z0-9-]*")
"""The Fleet API's routes (``/v1/fleet/pull-messages`` ...); nothing else is forwarded."""
ACTIVATE_PATH = "/v1/fleet/activate-node"
PUBLIC_KEY_HEADER = "flwr-public-key"  # Flower's SuperNode authentication: the signing key, base64 PEM
MAX_BODY_BYTES = 64 * 2**20
"""A Fleet request carries at most one 5 MB array chunk (Flower's chunk size) plus framing."""
UPSTREAM_TIMEOUT_S = 300.0
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-encoding",
    }
)


class FleetGateway:
    """ASGI app forwarding the Fleet API to ``upstream`` (``127.0.0.1:PORT``, TLS by ``upstream_ca``)."""

    def __init__(
        self,
        upstream: str,
        upstream_ca: Path,
        transport: httpx.AsyncBaseTransport | None = None,
        on_refused_key: Callable[[bytes], None] | None = None,
    ) -> None:
        self.upstream = f"https://{upstream}"
        self.upstream_ca = upstream_ca
        self.transport = transport  # tests replace the SuperLink
        self.on_refused_key = on_refused_key  # a device key the SuperLink refused at activation (not registered)
        self.client: httpx.AsyncClient | None = None
        self.refused = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":  # websockets: nothing of Flower's uses them
            return
        request = Request(scope, receive)
        response = await self.respond(request)
        await response(scope, receive, send)

    async def respond(self, request: Request) -> Response:
        """The reply to one request: the SuperLink's for a Fleet call, 404 or 413 otherwise."""
        path = request.url.path
        if request.method != "POST" or not FLEET_PATH.fullmatch(path):
            self.refused += 1
            log.warning(
                "gateway: refused %s %s from %s (only the Fleet API is served here)",
                request.method,
                path[:80],
                _peer(request),
            )
            return PlainTextResponse("not found\n", status_code=404)
        try:
            body = await _read_body(request)
        except ClientDisconnect:
            return PlainTextResponse("", status_code=400)
        if body is None:
            self.refused += 1
            log.warning("gateway: refused an oversized %s from %s", path, _peer(request))
            return PlainTextResponse("request too large\n", status_code=413)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            upstream = await self.client.post(path, content=body, headers=headers)
        except httpx.TransportError as exc:
            log.warning("gateway: the SuperLink did not answer %s: %s", path, exc)
            return PlainTextResponse("the SuperLink is unavailable\n", status_code=503)
        if path == ACTIVATE_PATH and upstream.status_code >= 400 and self.on_refused_key is not None:
            await self._refused_key(request)
        reply_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        return Response(upstream.content, status_code=upstream.status_code, headers=reply_headers)

    async def _refused_key(self, request: Request) -> None:
        try:
            key = base64.b64decode(request.headers.get(PUBLIC_KEY_HEADER, ""), validate=True)
        except ValueError:
            return
        if key:
            await run_in_threadpool(self.on_refused_key, key)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                verify = ssl.create_default_context(cafile=str(self.upstream_ca)) if self.transport is None else True
                self.client = httpx.AsyncClient(
                    base_url=self.upstream,
                    verify=verify,
                    timeout=UPSTREAM_TIMEOUT_S,
                    limits=httpx.Limits(max_connections=64),
                    transport=self.transport,
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


class GatewayServer:
    """An ASGI app served by uvicorn in a background thread of ``fedvox-server start``: the gateway
    (TLS with the server certificate), or the dashboard (plain HTTP on loopback: no certificate)."""

    def __init__(
        self,
        gateway: Any,
        host: str,
        port: int,
        certfile: Path | None = None,
        keyfile: Path | None = None,
        announce: str = "devices connect to {address} (TLS; Fleet API only)",
    ) -> None:
        self.gateway, self.host, self.port, self.announce = gateway, host, port, announce
        tls = {"ssl_certfile": str(certfile), "ssl_keyfile": str(keyfile)} if certfile is not None else {}
        config = uvicorn.Config(
            gateway,
            host=host,
            port=port,
            **tls,
            log_config=None,
            access_log=False,
            lifespan="on",
            ws="none",
            timeout_keep_alive=30,
            h11_max_incomplete_event_size=64 * 1024,
        )
        self.server = uvicorn.Server(config)
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # not "Started server process" lines: ours say it
        self.thread = threading.Thread(target=self._serve, name="fleet-gateway", daemon=True)
        self.error: BaseException | None = None

    def _serve(self) -> None:
        try:
            self.server.run()
        except BaseException as exc:
            self.error = exc

    def start(self, timeout: float = 30.0) -> None:
        """Serve, or raise :class:`DeploymentError` if the port cannot be opened."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise DeploymentError(
                    f"cannot listen on {self.host}:{self.port} (in use, or not an address of this "
                    "machine); choose another with --host/--port"
                )
            time.sleep(0.05)
        log.info(self.announce.format(address=f"{self.host}:{self.port}"))

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


async def _read_body(request: Request) -> bytes | None:
    """The request body, or ``None`` once it passes :data:`MAX_BODY_BYTES` (not read further)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _peer(request: Request) -> Any:
    return request.client.host if request.client else "?"


__all__ = ["FLEET_PATH", "MAX_BODY_BYTES", "FleetGateway", "GatewayServer"]
