"""The operator's side of Flower's Control API: register devices, list nodes, submit and stop runs.

It talks to the server's own SuperLink on the loopback address only (the public port forwards
the Fleet API alone, :mod:`server.deploy.gateway`), over TLS checked against the home's internal
CA, with the home's Control API token (:mod:`server.deploy.control_auth`): the SuperLink answers
no one else. These are the calls ``flwr supernode register``, ``flwr supernode ls``, ``flwr run`` and
``flwr stop`` make, done in process so that one command does what the operator means.
"""

from __future__ import annotations

import hashlib
import logging
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from flwr.cli.build import build_fab_from_files
from flwr.common.config import get_metadata_from_config
from flwr.common.serde import fab_to_proto, user_config_to_proto
from flwr.proto.control_pb2 import (  # pylint: disable=E0611
    ListNodesRequest,
    ListRunsRequest,
    RegisterNodeRequest,
    StartRunRequest,
    StopRunRequest,
)
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.error import FlowerError
from flwr.supercore.fab import Fab
from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

from fedvox.server.deploy.control_auth import BearerToken, read_token
from fedvox.shared.errors import DeploymentError

log = logging.getLogger(__name__)

FINISHED = "finished"


def app_bundle(app_dir: Path) -> bytes:
    """The Flower App bundle (FAB): ``pyproject.toml`` and the folders it installs as ``fedvox.*``
    (``[tool.setuptools] package-dir``), filtered by Flower's own rules (``.py``, ``.toml``,
    ``.json``, ``.md``). ``flwr run`` walks the whole folder, virtual environment included (45,000
    files, 15 s here), to keep about the same ones."""
    pyproject = tomllib.loads((app_dir / "pyproject.toml").read_text())
    folders = pyproject.get("tool", {}).get("setuptools", {}).get("package-dir", {}).values()
    files: dict[str, Path] = {"pyproject.toml": app_dir / "pyproject.toml"}
    packages = [app_dir / Path(folder).parts[0] for folder in sorted(set(folders))]
    for package in sorted(packages):
        for path in package.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                files[path.relative_to(app_dir).as_posix()] = path
    return build_fab_from_files(files)[0]


@dataclass(frozen=True)
class SuperNode:
    """A SuperNode as the SuperLink knows it."""

    node_id: int
    name: str
    public_key: bytes
    status: str  # registered (never connected), online, offline, unregistered


@dataclass(frozen=True)
class RunState:
    run_id: int
    status: str  # pending, starting, running, finished
    sub_status: str  # for finished runs: completed, failed, stopped
    details: str


class Control:
    """A Control API session with the SuperLink at ``address`` (``127.0.0.1:PORT``), as the
    holder of the token in ``token_file``."""

    def __init__(self, address: str, root_certificate: Path, token_file: Path) -> None:
        self.address = address
        self.client = ControlHttpClient.from_server_address(
            address,
            False,
            Path(root_certificate).read_bytes(),
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="flwr CLI"),
                BearerToken(read_token(token_file)),
            ],
        )

    def close(self) -> None:
        self.client.close()

    def register(self, public_key: bytes, name: str) -> int:
        """Authorise a SuperNode key; returns its node id (stable for the key)."""
        with self._call("register a device"):
            return int(self.client.RegisterNode(RegisterNodeRequest(public_key=public_key, name=name)).node_id)

    def nodes(self) -> list[SuperNode]:
        with self._call("list devices"):
            response = self.client.ListNodes(ListNodesRequest())
        return [SuperNode(n.node_id, n.name, n.public_key, n.status) for n in response.nodes_info]

    def start_run(self, app_dir: Path, run_config: Mapping[str, Any]) -> int:
        """Bundle the app in ``app_dir`` (:func:`app_bundle`) and start a run of it with ``run_config``."""
        fab_bytes = app_bundle(app_dir)
        fab_id, version = get_metadata_from_config(tomllib.loads((app_dir / "pyproject.toml").read_text()))
        fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
        request = StartRunRequest(fab=fab_to_proto(fab), override_config=user_config_to_proto(dict(run_config)))
        with self._call("start the run"):
            response = self.client.StartRun(request)
        if not response.HasField("run_id"):
            raise DeploymentError(f"the SuperLink at {self.address} did not start the run")
        log.info(
            "submitted %s %s (FAB %s, %.1f MB) as run %d",
            fab_id,
            version,
            fab.hash_str[:8],
            len(fab_bytes) / 1e6,
            response.run_id,
        )
        return int(response.run_id)

    def runs(self) -> list[RunState]:
        with self._call("list runs"):
            response = self.client.ListRuns(ListRunsRequest())
        return [
            RunState(run.run_id, run.status.status, run.status.sub_status, run.status.details)
            for run in response.run_dict.values()
        ]

    def run(self, run_id: int) -> RunState:
        with self._call(f"read run {run_id}"):
            response = self.client.ListRuns(ListRunsRequest(run_id=run_id))
        run = response.run_dict[run_id]
        return RunState(run.run_id, run.status.status, run.status.sub_status, run.status.details)

    def stop_run(self, run_id: int) -> None:
        with self._call(f"stop run {run_id}"):
            self.client.StopRun(StopRunRequest(run_id=run_id))

    @contextmanager
    def _call(self, what: str) -> Iterator[None]:
        """Turn transport and API errors into one-line :class:`DeploymentError`s."""
        try:
            yield
        except httpx.TransportError as exc:
            raise DeploymentError(
                f"cannot {what}: the server's SuperLink at {self.address} does not answer ({exc}); "
                "is `fedvox-server start` running?"
            ) from exc
        except httpx.HTTPStatusError as exc:
            error = FlowerError.from_json(exc.response.text)
            detail = f"[code {error.code}] {error.message}" if error else exc.response.text[:200]
            raise DeploymentError(f"cannot {what}: the SuperLink refused: {detail}") from exc


__all__ = ["FINISHED", "Control", "RunState", "SuperNode", "app_bundle"]
