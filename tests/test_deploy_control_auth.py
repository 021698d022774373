"""The SuperLink's Control and Runtime APIs answer the server home's owner only (a real SuperLink on loopback).

Before: any local account reached the loopback Control API; a client that skipped certificate
verification listed runs and registered a node key that then joined a round, while
``fedvox-server devices`` did not list it.
"""

from __future__ import annotations

import os

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.proto.control_pb2 import ListRunsRequest, RegisterNodeRequest  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.error import ApiErrorCode
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from flwr.supercore.protobuf.client import PROTOBUF_MEDIA_TYPE
from flwr.supercore.runtime_version_compatibility import RuntimeVersionMetadata

from fedvox.server.deploy.control import Control
from fedvox.server.deploy.control_auth import BearerToken
from fedvox.server.deploy.devices import UNKNOWN_DEVICE, device_report
from fedvox.server.deploy.home import ensure_link_certificate
from fedvox.server.deploy.launcher import ServerProcess, app_directory
from fedvox.shared.device_keys import fingerprint
from fedvox.shared.errors import DeploymentError
from fedvox.shared.processes import stop_tree
from tests.deploy_kit import server_home


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server home's SuperLink started the way ``fedvox-server start`` starts it."""
    home = server_home(tmp_path_factory.mktemp("control") / "home")
    process = ServerProcess(home)
    ensure_link_certificate(home)
    process._start_superlink()  # returns once the owner's Control calls are answered
    yield home, process
    process.control.close()
    stop_tree(process.superexec.pid, process.superlink.pid)


def _stranger(address: str, token: str | None = None) -> ControlHttpClient:
    """Another local account: no token (or a guessed one), certificate checks skipped."""
    return ControlHttpClient(f"https://{address}", verify=False, interceptors=[BearerToken(token)] if token else [])


@pytest.mark.parametrize("token", [None, "guessed-token"])
def test_a_control_call_without_the_home_token_is_refused(server, token):
    _home, process = server
    key = public_key_to_bytes(ec.generate_private_key(ec.SECP384R1()).public_key())
    stranger = _stranger(process.address, token)
    try:
        for call in (
            lambda: stranger.ListRuns(ListRunsRequest()),
            lambda: stranger.RegisterNode(RegisterNodeRequest(public_key=key, name="intruder")),
        ):
            with pytest.raises(httpx.HTTPStatusError) as refused:
                call()
            assert refused.value.response.status_code == 401
    finally:
        stranger.close()
    assert all(node.public_key != key for node in process.control.nodes())  # nothing was registered


def test_the_home_owner_is_answered_and_every_key_the_superlink_holds_is_listed(server):
    home, process = server
    run_id = process.control.start_run(app_directory(), home.run_config().to_flat())  # acts as Flower's one account
    assert run_id in {run.run_id for run in process.control.runs()}
    process.control.stop_run(run_id)
    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    node_id = process.control.register(public_key_to_bytes(key), "behind-fedvox")  # not through `register`
    (entry,) = [d for d in device_report(home, process.control.nodes()) if d["node-id"] == node_id]
    assert entry["name"] == UNKNOWN_DEVICE and entry["fingerprint"] == fingerprint(key)


def test_the_runtime_api_hands_a_run_to_no_one_but_the_home_superexec(server):
    """Only the SuperExec holding the home's secret may take a run's task (and so act as its ServerApp)."""
    _, process = server
    version = dict(RuntimeVersionMetadata.from_local_component("flwr-serverapp").as_metadata())
    response = httpx.post(
        f"https://{process.address}/v1/runtime/acquire-task",
        content=AcquireTaskRequest().SerializeToString(),
        headers={"content-type": PROTOBUF_MEDIA_TYPE, "accept": PROTOBUF_MEDIA_TYPE, **version},
        verify=False,
    )
    assert response.status_code == 401 and response.json()["code"] == ApiErrorCode.RUNTIME_AUTHENTICATION_FAILED
    assert process.superexec.poll() is None  # the home's own SuperExec runs, with the secret


def test_the_token_is_private_to_the_home(server):
    home, process = server
    assert home.control_token.stat().st_mode & 0o777 == 0o600
    os.chmod(home.control_token, 0o644)
    try:
        with pytest.raises(DeploymentError, match="readable by other accounts"):
            Control(process.address, home.internal_ca, home.control_token)
    finally:
        os.chmod(home.control_token, 0o600)
