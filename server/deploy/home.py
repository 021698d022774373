"""A server home: everything one fedvox federation's server keeps, in one folder.

::

    DIR/server.toml          where devices connect (host, port) and the names the certificate carries
    DIR/run-config.toml      the run configuration (shared.runconfig; checkpoint-dir is DIR/run)
    DIR/devices.json         registered devices (name, public key, node ids)
    DIR/pki/ca.crt           the root devices trust (hand it to every device owner)
    DIR/pki/ca.key           the CA's key (0600; only with the CA fedvox made)
    DIR/pki/server.crt/.key  the certificate devices check (key 0600)
    DIR/pki/internal/        loopback TLS between the gateway, the SuperLink and the ServerApp
    DIR/state/superlink.db   Flower's SQLite state (nodes, runs); server.json (the running server)
    DIR/state/control.token  the Control API credential (0600): only the home's owner controls the server
    DIR/state/superexec.secret  what the SuperExec proves itself with to the Runtime API (0600)
    DIR/logs/                server.log (fedvox-server), superlink.log (Flower, ServerApp)
    DIR/run/                 checkpoints, metrics.jsonl, the speaker-level ledger, exports

The home is created 0700: it holds private keys, every device's update history and the model.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from flwr.common.config import unflatten_dict

from fedvox.server.deploy import pki
from fedvox.shared.atomic import atomic_write_text
from fedvox.shared.errors import ConfigError, DeploymentError
from fedvox.shared.runconfig import RunConfig

DEFAULT_PORT = 9443
DEFAULT_HOST = "0.0.0.0"
INTERNAL_RENEW = dt.timedelta(days=30)
"""The loopback certificate is re-issued at start when it has less than this left."""

RUN_CONFIG_HEADER = """\
# The fedvox run configuration of this server home (docs/federation.md explains every key).
# Edit it before `fedvox-server start`. checkpoint-dir is always this home's run/ folder.
"""


@dataclass(frozen=True)
class ServerSettings:
    """``server.toml``: where the public port listens and what the server certificate names."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    names: tuple[str, ...] = ()

    def to_toml(self) -> str:
        return "# fedvox server settings (fedvox-server start --host/--port override host and port)\n" + tomli_w.dumps(
            {"host": self.host, "port": self.port, "names": list(self.names)}
        )


class ServerHome:
    """Paths and files of a server home; :func:`init_home` creates one."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.settings_file = self.root / "server.toml"
        self.run_config_file = self.root / "run-config.toml"
        self.devices_file = self.root / "devices.json"
        self.pki = self.root / "pki"
        self.ca_cert = self.pki / "ca.crt"
        self.ca_key = self.pki / "ca.key"
        self.server_cert = self.pki / "server.crt"
        self.server_key = self.pki / "server.key"
        self.internal_ca = self.pki / "internal" / "ca.crt"
        self.link_cert = self.pki / "internal" / "link.crt"
        self.link_key = self.pki / "internal" / "link.key"
        self.state = self.root / "state"
        self.database = self.state / "superlink.db"
        self.server_state = self.state / "server.json"
        self.control_token = self.state / "control.token"
        self.superexec_secret = self.state / "superexec.secret"
        self.lock_file = self.state / "server.lock"
        self.flwr_home = self.state / "flwr"
        self.logs = self.root / "logs"
        self.run_dir = self.root / "run"

    def require(self) -> ServerHome:
        """This home, or a :class:`DeploymentError` if ``fedvox-server init`` never made it."""
        if not self.settings_file.is_file():
            raise DeploymentError(
                f"{self.root} is not a fedvox server home; create it with `fedvox-server init {self.root}`"
            )
        return self

    def settings(self) -> ServerSettings:
        try:
            data = tomllib.loads(self.settings_file.read_text())
            return ServerSettings(host=str(data["host"]), port=int(data["port"]), names=tuple(data.get("names", ())))
        except (OSError, KeyError, ValueError, TypeError, tomllib.TOMLDecodeError) as exc:
            raise DeploymentError(
                f"cannot read {self.settings_file}: {exc}; fix it or run init again in a new folder"
            ) from exc

    def run_config(self) -> RunConfig:
        """The run configuration, validated, with ``checkpoint-dir`` set to this home's run folder."""
        return RunConfig.from_toml(self.run_config_file, {"checkpoint-dir": str(self.run_dir)})

    def running(self) -> dict[str, Any] | None:
        """What ``fedvox-server start`` wrote about itself while it runs (it holds the lock), else ``None``."""
        if not self.lock_file.is_file():
            return None
        fd = os.open(self.lock_file, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return json.loads(self.server_state.read_text())
            except (OSError, ValueError):
                return None
        finally:
            os.close(fd)  # also releases a lock taken just now
        return None


def default_names() -> list[str]:
    """Names a device on this machine or its network may use: loopback, host name, FQDN."""
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()]
    return list(dict.fromkeys(n for n in names if n))


def init_home(
    root: str | Path,
    names: list[str] | None = None,
    *,
    run_config: Path | None = None,
    bring_ca: Path | None = None,
    bring_cert: Path | None = None,
    bring_key: Path | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
) -> ServerHome:
    """Create a server home at ``root`` (which must not be one already)."""
    home = ServerHome(root)
    if home.settings_file.exists():
        raise DeploymentError(
            f"{home.root} is already a server home; to issue a new server certificate run "
            f"`fedvox-server init {home.root} --renew-certificate`"
        )
    brought = [p for p in (bring_ca, bring_cert, bring_key) if p is not None]
    if brought and len(brought) != 3:
        raise ConfigError("to bring your own certificate give all of --ca-cert, --cert and --key")
    names = list(dict.fromkeys(names or default_names()))
    config = RunConfig.from_toml(run_config) if run_config else RunConfig()
    if brought:  # check before creating anything
        pki.check_server_pair(bring_cert, bring_key, bring_ca, names)

    for folder in (home.root, home.pki, home.state, home.logs, home.run_dir):
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
    if brought:
        pki.write_certificate(home.ca_cert, pki.load_certificate(bring_ca))
        pki.write_certificate(home.server_cert, pki.load_certificate(bring_cert))
        pki.write_private_key(home.server_key, pki.load_private_key(bring_key))
    else:
        ca_key, ca_cert = pki.create_ca(f"fedvox CA ({socket.gethostname()})")
        pki.write_private_key(home.ca_key, ca_key)
        pki.write_certificate(home.ca_cert, ca_cert)
        _issue(home, names)
    write_run_config(home, config)
    atomic_write_text(home.settings_file, ServerSettings(host, port, tuple(names)).to_toml())
    return home


def renew(home: ServerHome, names: list[str] | None = None) -> list[str]:
    """Issue a new server certificate from the home's CA (for new names, or before expiry)."""
    home.require()
    if not home.ca_key.is_file():
        raise DeploymentError(
            f"{home.root} uses a certificate you brought (no {home.ca_key}); issue a new one with your CA "
            f"and copy it to {home.server_cert} and {home.server_key}"
        )
    settings = home.settings()
    names = list(dict.fromkeys(names or settings.names or default_names()))
    _issue(home, names)
    atomic_write_text(home.settings_file, ServerSettings(settings.host, settings.port, tuple(names)).to_toml())
    return names


def write_run_config(home: ServerHome, config: RunConfig) -> None:
    flat = config.to_flat()
    flat["checkpoint-dir"] = str(home.run_dir)
    atomic_write_text(home.run_config_file, RUN_CONFIG_HEADER + tomli_w.dumps(unflatten_dict(flat)))


def ensure_link_certificate(home: ServerHome) -> None:
    """(Re)issue the loopback certificate (127.0.0.1) the SuperLink serves to the gateway and the
    ServerApp. Its one-off CA signs it and is thrown away: nothing else can be signed by it."""
    if home.link_cert.is_file() and home.internal_ca.is_file():
        expires = pki.load_certificate(home.link_cert).not_valid_after_utc
        if expires - dt.datetime.now(dt.UTC) > INTERNAL_RENEW:
            return
    home.link_cert.parent.mkdir(mode=0o700, exist_ok=True)
    ca_key, ca_cert = pki.create_ca("fedvox loopback CA", days=pki.SERVER_DAYS)
    key, cert = pki.issue_server_certificate(ca_key, ca_cert, ["127.0.0.1", "localhost"])
    pki.write_private_key(home.link_key, key)
    pki.write_certificate(home.link_cert, cert)
    pki.write_certificate(home.internal_ca, ca_cert)


def _issue(home: ServerHome, names: list[str]) -> None:
    key, cert = pki.issue_server_certificate(
        pki.load_private_key(home.ca_key), pki.load_certificate(home.ca_cert), names
    )
    pki.write_private_key(home.server_key, key)
    pki.write_certificate(home.server_cert, cert)


__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "ServerHome",
    "ServerSettings",
    "default_names",
    "ensure_link_certificate",
    "init_home",
    "renew",
    "write_run_config",
]
