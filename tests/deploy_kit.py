"""Test kit for real deployments on 127.0.0.1: a server home, its ``fedvox-server start``, enrolled
devices as ``fedvox-client enroll`` processes, and a tap that records every Fleet exchange.

The tap is the fedvox gateway itself, put between the devices and the server with the server's
certificate: it sees exactly the decrypted HTTP traffic the real gateway sees.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from starlette.requests import Request
from starlette.responses import Response

from bench.deploy_round import RUN_CONFIG as ROUND_CONFIG
from fedvox.server.deploy.control_auth import ensure_token
from fedvox.server.deploy.gateway import FleetGateway, GatewayServer
from fedvox.server.deploy.home import ServerHome, ensure_link_certificate, init_home, write_run_config
from fedvox.server.deploy.pki import write_certificate, write_private_key
from fedvox.shared.cli import OFFLINE_ENV
from fedvox.shared.processes import free_port
from fedvox.shared.runconfig import RunConfig
from tests.tiny import TINY

BIN = Path(sys.executable).parent
# Two quick rounds of tiny s1: a query and two trainings per device, no evaluation (the
# federation bench/deploy_round.py times).
RUN_CONFIG = {**ROUND_CONFIG, **TINY, "num-server-rounds": 2}
TAG = ("FEDVOX_TEST_TAG", f"deploy-{os.getpid()}-{secrets.token_hex(4)}")
"""Marks every process a test starts (inherited by everything those start): :func:`sweep` finds
what a test left behind by it, wherever in the process tree it ended up."""
ENV = {**os.environ, **OFFLINE_ENV, "COLUMNS": "400", "PYTHONUNBUFFERED": "1", TAG[0]: TAG[1]}


def server_home(folder: Path, **overrides: object) -> ServerHome:
    home = init_home(folder, ["127.0.0.1"], host="127.0.0.1", port=free_port())
    write_run_config(home, RunConfig().with_overrides({**RUN_CONFIG, **overrides}))
    return home


@contextmanager
def server_running(home: ServerHome, **state: object) -> Iterator[None]:
    """What a running ``fedvox-server start`` leaves in the home: its lock held, its state file."""
    ensure_link_certificate(home)
    ensure_token(home.control_token)
    with open(home.lock_file, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        (home.server_state).write_text(
            json.dumps(
                {
                    "pid": 4242,
                    "host": "127.0.0.1",
                    "port": 9443,
                    "superlink": f"127.0.0.1:{free_port()}",
                    "run-id": 7,
                    **state,
                }
            )
        )
        try:
            yield
        finally:
            home.server_state.unlink()


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A command in its own session, stdout and stderr into ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env={**(env or ENV), TAG[0]: TAG[1]}, start_new_session=True
        )


def start_server(home: ServerHome, *extra: str) -> subprocess.Popen:
    return spawn([str(BIN / "fedvox-server"), "start", str(home.root), *extra], home.root.parent / "server.out")


def enroll(server: str, home: ServerHome, data: Path, device_home: Path, *extra: str) -> subprocess.Popen:
    args = [
        str(BIN / "fedvox-client"),
        "enroll",
        "--server",
        server,
        "--root-cert",
        str(home.ca_cert),
        "--data",
        str(data),
        "--home",
        str(device_home),
        "--threads",
        "1",
        "--budget-epsilon",
        "100",
        *extra,
    ]
    return spawn(args, device_home.with_suffix(".out"))


def register(home: ServerHome, public_key: Path, name: str) -> str:
    done = subprocess.run(
        [str(BIN / "fedvox-server"), "register", str(home.root), str(public_key), "--name", name],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def wait_for(path: Path, pattern: str, process: subprocess.Popen | None = None, timeout: float = 300.0) -> re.Match:
    """Wait until ``path`` contains ``pattern`` (a regex); fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.is_file() else ""
        if match := re.search(pattern, text):
            return match
        if process is not None and process.poll() is not None:
            raise AssertionError(
                f"exited ({process.returncode}) before {pattern!r} appeared in {path}:\n{text[-3000:]}"
            )
        time.sleep(0.5)
    raise AssertionError(f"{pattern!r} did not appear in {path} within {timeout:.0f} s:\n{text[-3000:]}")


def kill_tree(process: subprocess.Popen | psutil.Process) -> None:
    """SIGKILL a process and everything below it at once, as a power cut would."""
    try:
        root = psutil.Process(process.pid)
        everything = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in everything:
        with suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(everything, timeout=30)


def stop(*processes: subprocess.Popen, timeout: float = 60.0) -> None:
    """Stop fedvox commands as Ctrl-C would (all at once), then make sure nothing they started is left."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        kill_tree(process)


def sweep(grace: float = 10.0) -> list[str]:
    """Kill every process still carrying this test run's :data:`TAG`; returns their command lines.

    After :func:`stop` nothing should be left: what is, outlived the command that started it."""
    found = []
    for process in psutil.process_iter(["pid", "status"]):
        if process.pid == os.getpid() or process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if process.environ().get(TAG[0]) == TAG[1]:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    _, alive = psutil.wait_procs(found, timeout=grace if found else 0)  # a tree still winding down
    left = []
    for process in alive:
        try:
            left.append(" ".join(process.cmdline())[:200])
            process.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=10)
    return left


@dataclass
class Exchange:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    reply: bytes


class Tap(FleetGateway):
    """The gateway, recording every request and reply it forwards (or refuses)."""

    def __init__(self, upstream: str, upstream_ca: Path) -> None:
        FleetGateway.__init__(self, upstream, upstream_ca)
        self.exchanges: list[Exchange] = []

    async def respond(self, request: Request) -> Response:
        body = await request.body()  # cached: the gateway reads it again
        response = await super().respond(request)
        self.exchanges.append(
            Exchange(request.url.path, dict(request.headers), body, response.status_code, response.body)
        )
        return response


def start_tap(home: ServerHome) -> tuple[Tap, GatewayServer, str]:
    """A tap in front of the home's public port, presenting the server certificate."""
    settings = home.settings()
    tap = Tap(f"127.0.0.1:{settings.port}", home.ca_cert)
    port = free_port()
    server = GatewayServer(tap, "127.0.0.1", port, home.server_cert, home.server_key)
    server.start()
    return tap, server, f"127.0.0.1:{port}"


def throw_garbage(address: str, home: ServerHome, scratch: Path) -> list[str]:
    """Everything a stranger might send to the public port; returns what each attempt got back."""
    host, port = address.rsplit(":", 1)
    outcomes = []

    def raw(payload: bytes) -> str:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(payload)
            try:
                return repr(sock.recv(200)[:40])
            except OSError as exc:
                return type(exc).__name__

    outcomes.append("random bytes: " + raw(os.urandom(8192)))
    outcomes.append("plain HTTP: " + raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
    outcomes.append("TLS hello then garbage: " + raw(bytes.fromhex("160301") + os.urandom(600)))

    # A client certificate that expired long ago, and one nobody issued: the server asks for none,
    # so they change nothing; the requests themselves are refused.
    expired_key, expired = _client_certificate(expired=True)
    for label, (key, cert) in (
        ("expired client certificate", (expired_key, expired)),
        ("self-signed client certificate", _client_certificate(expired=False)),
    ):
        write_private_key(scratch / f"{label}.key", key)
        write_certificate(scratch / f"{label}.crt", cert)
        context = ssl.create_default_context(cafile=str(home.ca_cert))
        context.load_cert_chain(scratch / f"{label}.crt", scratch / f"{label}.key")
        with httpx.Client(verify=context, timeout=30) as client:
            fleet = client.post(
                f"https://{address}/v1/fleet/pull-messages",
                content=os.urandom(64),
                headers={"content-type": "application/protobuf"},
            )
            control = client.post(
                f"https://{address}/v1/control/list-runs", content=b"", headers={"content-type": "application/protobuf"}
            )
        outcomes.append(f"{label}: fleet {fleet.status_code}, control {control.status_code}")

    # A client that trusts another CA never completes the handshake.
    other = ssl.create_default_context()
    try:
        with httpx.Client(verify=other, timeout=10) as client:
            client.get(f"https://{address}/")
        outcomes.append("wrong CA: connected")
    except httpx.ConnectError as exc:
        outcomes.append(f"wrong CA: {type(exc).__name__}")
    return outcomes


def _client_certificate(expired: bool):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stranger")])
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=400 if expired else 1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=30 if expired else 365))
        .sign(key, hashes.SHA256())
    )
    return key, cert
