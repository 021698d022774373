"""``fedvox-client enroll``: this device joins a real federation as an authenticated Flower SuperNode.

1. The device's key pair (EC P-384, OpenSSH format, what Flower's SuperNode authentication
   takes) is made once and kept in ``<fedvox home>/device/`` (private key 0600, folder 0700).
   The operator authorises its public key with ``fedvox-server register``; the private key never
   leaves the device.
2. Before starting a SuperNode, a check call on the server's Fleet API (activate, then
   deactivate the node, signed with the key) tells apart the failures a device owner can act on:
   the server does not answer (:class:`ServerUnreachable`), its certificate is not the one the
   given root vouches for (:class:`CertificateMismatch`), or this key is not registered
   (:class:`NotRegistered`). It also ends a session a crashed SuperNode left open, so a restarted
   device rejoins at once instead of after Flower's heartbeat timeout.
3. ``flower-supernode`` runs with TLS, the key, and a node config (``device/node-config.toml``:
   ``data-path``, ``ledger-path``, ``budget-epsilon``, ``profile.*``) that the fedvox ClientApp
   reads (and ``fedvox-home``: where the recordings' one ledger is recorded). The supervisor
   restarts it whenever it exits (network loss, server restart), after the same check, with
   backoff; a missing registration is waited for, not fatal.

Only the SuperNode talks to the server, and only the ClientApp process it starts per message
reads the data folder; what it sends back is the trainable subset and metrics (docs/deployment.md).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL
from flwr.proto.fleet_pb2 import ActivateNodeRequest, DeactivateNodeRequest  # pylint: disable=E0611
from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from flwr.supernode.fleet_http_client import FleetHttpClient
from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

from fedvox.shared.app_host import HOST_ENV
from fedvox.shared.atomic import atomic_path, atomic_write_text
from fedvox.shared.errors import CertificateMismatch, ConfigError, DeploymentError, NotRegistered, ServerUnreachable
from fedvox.shared.processes import die_with_parent, flower_command, flower_env, free_port, stop_tree

log = logging.getLogger(__name__)
supernode_log = logging.getLogger("fedvox.supernode")

CHECK_TIMEOUT_S = 20.0
BACKOFF_S = (2.0, 5.0, 10.0, 20.0, 30.0)
"""Waits before retrying an unreachable server; the last one repeats."""
REGISTRATION_POLL_S = 5.0
STALE_GRACE_S = 6.0
"""How long a crashed session stays closed before the node activates again: longer than the
ServerApp's 3 s reply poll, so the server answers the work the crashed SuperNode held with an
error (the round goes on) instead of waiting for it until the round times out."""
STABLE_S = 60.0
"""A SuperNode that ran this long before exiting restarts without backoff."""
ANSI = re.compile(r"\x1b\[[0-9;]*m")
GAVE_UP = "Giving up reconnection"
"""What Flower 1.41's SuperNode logs when its connection fails for good (e.g. the server's
certificate changed). Its main thread then ends but the process does not exit (its local
Runtime API threads keep it alive), so the supervisor ends it and checks the server again."""
GAVE_UP_GRACE_S = 10.0
CLIENTAPP_PRELOAD = (
    "fedvox.client.app",
    # what its handlers import on first use: torch's compiler stack (nn.init's first call imports
    # torch._dynamo, about 2 s on 2 cores), the stages' trainers, the device key that signs
    "torch._dynamo",
    "fedvox.client.stages.s1",
    "fedvox.client.stages.s2",
    "fedvox.shared.device_keys",
)
"""What the ClientApp host imports once, so that no message waits for it (:mod:`shared.app_host`)."""


@dataclass(frozen=True)
class DeviceHome:
    """``<fedvox home>/device``: this device's key, node config, Flower state and logs."""

    root: Path

    @classmethod
    def at(cls, fedvox_home: Path | None = None) -> DeviceHome:
        base = fedvox_home or Path(os.environ.get("FEDVOX_HOME", Path.home() / ".fedvox"))
        return cls(Path(base).expanduser().resolve() / "device")

    key = property(lambda self: self.root / "supernode.key")
    public_key = property(lambda self: self.root / "supernode.key.pub")
    state = property(lambda self: self.root / "node.json")
    node_config = property(lambda self: self.root / "node-config.toml")
    flwr_home = property(lambda self: self.root / "flwr")
    logs = property(lambda self: self.root / "logs")
    lock = property(lambda self: self.root / "enroll.lock")

    def node_id(self) -> int | None:
        """The node id the server gave this key (saved after the first successful check)."""
        try:
            return int(json.loads(self.state.read_text())["node-id"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def ledger_path(self) -> Path:
        """The privacy ledger this device's enrollment uses (from its node config)."""
        try:
            return Path(tomllib.loads(self.node_config.read_text())["ledger-path"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            raise ConfigError(
                f"no enrollment in {self.root} (no {self.node_config.name}); give --data, or --home of the enrolled "
                "device"
            ) from None

    def enrolled_budget(self, data: Path) -> float | None:
        """The ``budget-epsilon`` this device's enrollment gives for the data folder ``data``, if any:
        its SuperNode records that value in the ledger again at every message."""
        try:
            config = tomllib.loads(self.node_config.read_text())
        except (OSError, tomllib.TOMLDecodeError):
            return None
        same = Path(str(config.get("data-path", ""))).expanduser().resolve() == data.expanduser().resolve()
        return float(config["budget-epsilon"]) if same and "budget-epsilon" in config else None

    def save_node_id(self, server: str, node_id: int) -> None:
        atomic_write_text(self.state, json.dumps({"server": server, "node-id": node_id}) + "\n")


# ---------------------------------------------------------------------- the key
def device_key(home: DeviceHome) -> tuple[ec.EllipticCurvePrivateKey, bool]:
    """The device's private key, created on first use; returns it and whether it is new."""
    home.root.mkdir(parents=True, exist_ok=True)
    os.chmod(home.root, 0o700)
    if home.key.is_file():
        if home.key.stat().st_mode & 0o077:
            raise DeploymentError(f"{home.key} is readable by other users; run `chmod 600 {home.key}`")
        try:
            key = serialization.load_ssh_private_key(home.key.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise DeploymentError(
                f"{home.key} is not a usable OpenSSH private key ({exc}); move it away to make a new one"
            ) from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise DeploymentError(f"{home.key} is not an ECDSA key; Flower's SuperNode authentication needs one")
        return key, False
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    with atomic_path(home.key) as tmp:  # mkstemp: 0600 from the start
        tmp.write_bytes(private)
    atomic_write_text(home.public_key, public_line(key) + "\n")
    return key, True


def public_line(key: ec.EllipticCurvePrivateKey, name: str | None = None) -> str:
    """The public key as one OpenSSH line, what the operator registers. Its comment names the
    device only by the name its owner chose (``--name``), never by the machine's host name."""
    text = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{text} fedvox@{name}" if name else f"{text} fedvox"


def register_command(key: ec.EllipticCurvePrivateKey, name: str | None) -> str:
    """The exact command the operator runs on the server to authorise this device."""
    command = f"fedvox-server register SERVER_HOME '{public_line(key, name)}'"
    return command + (f" --name {name}" if name else "")


# ---------------------------------------------------------------------- the check
def parse_server(server: str) -> str:
    """``HOST:PORT`` (``[v6]:PORT``) as Flower takes it; a clear error otherwise."""
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})", server.strip())
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ConfigError(f"--server {server!r}: give HOST:PORT, e.g. voice.example.org:9443 or 192.0.2.7:9443")
    return server.strip()


def check_root_certificate(path: Path) -> None:
    try:
        x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"--root-cert {path}: not a PEM certificate ({exc}); use the ca.crt the operator gave you"
        ) from exc


def check_server(server: str, root_cert: Path, key: ec.EllipticCurvePrivateKey, home: DeviceHome) -> int:
    """Prove this key to the server without staying connected; returns the node id.

    A stale session (a SuperNode of this key that died without saying goodbye) makes activation
    fail until Flower's heartbeat timeout; with the node id saved from an earlier check it is
    closed here. Flower reports "not registered" and "still online" alike (code 2004): a failed
    activation that closing the saved session does not cure means the key is not registered.
    """
    interceptors = [
        RuntimeVersionHttpInterceptor(component_name="SuperNode"),
        NodeAuthHttpInterceptor(key, key.public_key()),
    ]
    request = ActivateNodeRequest(
        public_key=public_key_to_bytes(key.public_key()), heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL
    )
    client = FleetHttpClient.from_server_address(server, False, Path(root_cert).read_bytes(), interceptors)
    try:
        with _explained(server, root_cert):
            try:
                node_id = int(client.ActivateNode(request).node_id)
            except httpx.HTTPStatusError as exc:
                saved = home.node_id()
                if exc.response.status_code != 412 or saved is None:
                    raise
                try:
                    client.DeactivateNode(DeactivateNodeRequest(node_id=saved))
                except httpx.HTTPStatusError:
                    raise exc from None
                log.info("closed the session a previous SuperNode of this device left open")
                time.sleep(STALE_GRACE_S)  # offline long enough for the server to release its pending work
                node_id = int(client.ActivateNode(request).node_id)
            client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
    finally:
        client.close()
    home.save_node_id(server, node_id)
    return node_id


@contextmanager
def _explained(server: str, root_cert: Path) -> Iterator[None]:
    """Transport and API failures as the deployment errors a device owner can act on."""
    try:
        yield
    except httpx.ConnectError as exc:
        text = str(exc)
        if "CERTIFICATE_VERIFY_FAILED" in text or "mismatch" in text:
            raise CertificateMismatch(
                f"the server at {server} presented a certificate that {root_cert} does not vouch for "
                f"({_ssl_reason(text)}); ask the operator for the server home's pki/ca.crt and connect "
                "by a name or address its certificate lists"
            ) from None
        if "SSL" in text:
            raise DeploymentError(
                f"{server} does not speak TLS like a fedvox server ({_ssl_reason(text)}); check the port"
            ) from None
        raise ServerUnreachable(
            f"cannot reach the fedvox server at {server} ({text or 'connection failed'}); check the address and that "
            "`fedvox-server start` runs"
        ) from None
    except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
        raise ServerUnreachable(
            f"the fedvox server at {server} does not answer ({type(exc).__name__}: {exc})"
        ) from None
    except httpx.HTTPStatusError as exc:
        status = exc.response.status_code
        if status == 412:
            raise NotRegistered(
                f"the server at {server} does not know this device's key: the operator must register it"
            ) from None
        if status == 401:
            raise DeploymentError(
                f"the server at {server} rejected this device's signature; check that this machine's clock is right"
            ) from None
        if status in (502, 503, 504):
            raise ServerUnreachable(
                f"the fedvox server at {server} is starting or restarting (HTTP {status})"
            ) from None
        raise DeploymentError(f"the server at {server} answered HTTP {status}; is it a fedvox server?") from None


def _ssl_reason(text: str) -> str:
    match = re.search(r"\] ([^()]+?)(?: \(_ssl|$)", text)
    return (match.group(1) if match else text).strip()


# ---------------------------------------------------------------------- the supervisor
@dataclass(frozen=True)
class Enrollment:
    """What ``fedvox-client enroll`` was asked to do (the node config's source)."""

    server: str
    root_cert: Path
    data: Path
    ledger: Path
    budget_epsilon: float | None
    profile: dict[str, object]
    name: str | None
    fedvox_home: Path | None = None  # where the identity's one ledger is recorded (client.identity)

    def node_config(self) -> dict[str, object]:
        config: dict[str, object] = {"data-path": str(self.data), "ledger-path": str(self.ledger)}
        if self.fedvox_home is not None:
            config["fedvox-home"] = str(self.fedvox_home)
        if self.budget_epsilon is not None:
            config["budget-epsilon"] = float(self.budget_epsilon)
        if self.profile:
            config["profile"] = dict(self.profile)
        return config


class Supervisor:
    """Keep one ``flower-supernode`` of this device connected until stopped (SIGINT, SIGTERM)."""

    def __init__(self, enrollment: Enrollment, home: DeviceHome, key: ec.EllipticCurvePrivateKey) -> None:
        self.enrollment, self.home, self.key = enrollment, home, key
        self.stopping = threading.Event()
        self.process: subprocess.Popen | None = None

    def run(self) -> None:
        with self._locked():
            node_config = {  # the key signs ledger heads; the ClientApp keeps its messages' times in the logs
                **self.enrollment.node_config(),
                "signing-key": str(self.home.key),
                "log-dir": str(self.home.logs),
            }
            atomic_write_text(self.home.node_config, tomli_w.dumps(node_config))
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: self.stopping.set())
            failures = 0
            while not self.stopping.is_set():
                if not self._ready():
                    continue
                started = time.monotonic()
                code = self._supernode()
                if self.stopping.is_set():
                    break
                failures = 0 if time.monotonic() - started > STABLE_S else failures + 1
                wait = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
                log.warning("the SuperNode exited (status %s); reconnecting in %.0f s", code, wait)
                self.stopping.wait(wait)
            log.info("stopped; this device left the federation")

    def _ready(self) -> bool:
        """One check against the server; waits (and returns False) when it cannot join yet."""
        e = self.enrollment
        unreachable, told = 0, False
        while not self.stopping.is_set():
            try:
                node_id = check_server(e.server, e.root_cert, self.key, self.home)
                log.info("registered as node %d; joining the federation at %s", node_id, e.server)
                return True
            except NotRegistered as exc:
                if not told:  # the command itself was printed above, unwrapped, for copying
                    log.warning("%s with the `fedvox-server register` command printed above", exc)
                    log.info(
                        "waiting for the registration (checking every %.0f s; Ctrl-C to stop)", REGISTRATION_POLL_S
                    )
                    told = True
                self.stopping.wait(REGISTRATION_POLL_S)
            except ServerUnreachable as exc:
                wait = BACKOFF_S[min(unreachable, len(BACKOFF_S) - 1)]
                log.warning("%s; retrying in %.0f s", exc, wait)
                unreachable += 1
                self.stopping.wait(wait)
        return False

    def _supernode(self) -> int | None:
        """One SuperNode (and its ClientApp host) until it exits or the supervisor stops."""
        e = self.enrollment
        env = flower_env(self.home.flwr_home)
        command = [
            flower_command("flower-supernode", env),
            "--superlink",
            e.server,
            "--root-certificates",
            str(e.root_cert),
            "--auth-supernode-private-key",
            str(self.home.key),
            "--node-config",
            str(self.home.node_config),
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
        ]
        self.home.logs.mkdir(exist_ok=True)
        host, host_dir = self._clientapp_host()
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**env, HOST_ENV: str(host_dir / "host.sock")},
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        gave_up = threading.Event()
        reader = threading.Thread(target=self._relay, args=(self.process, gave_up), daemon=True)
        reader.start()
        while self.process.poll() is None and not self.stopping.is_set():
            if gave_up.wait(1.0):
                self.stopping.wait(GAVE_UP_GRACE_S)  # its chance to exit by itself
                log.warning("the SuperNode gave up its connection to %s; checking the server again", e.server)
                break
        if self.process.poll() is None:  # stopping, or hung after giving up: Flower deactivates the node on SIGTERM
            stop_tree(self.process.pid, host.pid, timeout=20)
        else:
            stop_tree(host.pid)
        shutil.rmtree(host_dir, ignore_errors=True)
        reader.join(timeout=5)
        return self.process.returncode

    def _clientapp_host(self) -> tuple[subprocess.Popen, Path]:
        """The warm process this SuperNode's ClientApps are forked from (:mod:`shared.app_host`),
        listening in a new 0700 folder; until it is ready they start as Flower starts them."""
        folder = Path(tempfile.mkdtemp(prefix="fedvox-app-host-"))
        with open(self.home.logs / "app-host.log", "ab") as out:
            host = subprocess.Popen(
                [sys.executable, "-m", "fedvox.shared.app_host", str(folder / "host.sock"), *CLIENTAPP_PRELOAD],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=flower_env(self.home.flwr_home),
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        return host, folder

    def _relay(self, process: subprocess.Popen, gave_up: threading.Event) -> None:
        """The SuperNode's output into ``device/logs/supernode.log`` and this console."""
        with open(self.home.logs / "supernode.log", "ab") as out:
            for raw in process.stdout:
                out.write(raw)
                out.flush()
                line = ANSI.sub("", raw.decode(errors="replace")).rstrip()
                if GAVE_UP in line:
                    gave_up.set()
                if line.strip():
                    supernode_log.info("%s", line)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.home.lock, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DeploymentError(
                    f"another `fedvox-client enroll` runs with {self.home.root}; one SuperNode per device key "
                    "(use another --home for a second device on this machine)"
                ) from None
            yield


__all__ = [
    "DeviceHome",
    "Enrollment",
    "Supervisor",
    "check_root_certificate",
    "check_server",
    "device_key",
    "parse_server",
    "public_line",
    "register_command",
]
