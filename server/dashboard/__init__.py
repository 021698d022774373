"""The operator's dashboard: a local web page of a federation's rounds, losses, privacy budgets
and devices, live while ``fedvox-server start`` runs and read-only for a finished run or a
simulation (:mod:`.view` reads what it shows, :mod:`.web` serves it)."""

from __future__ import annotations

from fedvox.server.dashboard.view import Source
from fedvox.server.dashboard.web import Register, credential, dashboard_app
from fedvox.server.deploy.gateway import GatewayServer

DEFAULT_HOST = "127.0.0.1"


def serve_dashboard(
    source: Source, host: str = DEFAULT_HOST, port: int = 0, register: Register | None = None
) -> tuple[GatewayServer, str]:
    """Serve ``source`` in a background thread; returns the server and the URL with its credential
    (``port`` 0: a free one)."""
    from fedvox.shared.processes import free_port

    port = port or free_port()
    # Bound to every interface, any Host name may be right (the token still guards it).
    hosts = None if host in ("0.0.0.0", "::", "") else list(dict.fromkeys([host, "127.0.0.1", "localhost"]))
    token = credential(source)
    server = GatewayServer(
        dashboard_app(source, token, hosts, register),
        host,
        port,
        announce="dashboard on http://{address}/ (needs the token printed with it)",
    )
    server.start()
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return server, f"http://{shown}:{port}/?token={token}"


__all__ = ["DEFAULT_HOST", "serve_dashboard"]
