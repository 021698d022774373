"""The public gateway forwards Flower's Fleet API and nothing else (the SuperLink is a fake here)."""

import httpx
import pytest
from starlette.testclient import TestClient

from fedvox.server.deploy import gateway as gateway_module
from fedvox.server.deploy.gateway import FLEET_PATH, FleetGateway


class FakeSuperLink:
    """Records what reaches the SuperLink and answers like it."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(200, content=b"\x08\x01", headers={"content-type": "application/protobuf", "x-flwr": "1"})


@pytest.fixture
def fake(tmp_path):
    superlink = FakeSuperLink()
    gateway = FleetGateway("127.0.0.1:1", tmp_path / "ca.crt", transport=httpx.MockTransport(superlink))
    with TestClient(gateway, base_url="https://testserver") as client:
        yield client, superlink, gateway


def test_fleet_calls_are_forwarded_with_their_body_and_signature_headers(fake):
    client, superlink, _ = fake
    headers = {"content-type": "application/protobuf", "flwr-public-key": "cGs=", "flwr-signature": "c2ln"}
    reply = client.post("/v1/fleet/pull-messages", content=b"\x0a\x02\x08\x07", headers=headers)
    assert reply.status_code == 200 and reply.content == b"\x08\x01" and reply.headers["x-flwr"] == "1"
    (forwarded,) = superlink.requests
    assert forwarded.url.path == "/v1/fleet/pull-messages" and forwarded.content == b"\x0a\x02\x08\x07"
    assert forwarded.headers["flwr-signature"] == "c2ln" and forwarded.headers["flwr-public-key"] == "cGs="
    assert forwarded.url.host == "127.0.0.1"  # never the client's Host header


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/v1/control/start-run"),  # would run code on the server
        ("POST", "/v1/control/register-node"),  # would authorise any device
        ("POST", "/v1/runtime/acquire-task"),  # would take the ServerApp's task and every reply
        ("POST", "/v1/runtime/pull-messages"),
        ("GET", "/v1/fleet/pull-messages"),
        ("POST", "/health"),
        ("POST", "/docs"),
        ("POST", "/v1/fleet/pull-messages/../../control/start-run"),
        ("POST", "/v1/fleet/%2e%2e/control/start-run"),
    ],
)
def test_everything_but_the_fleet_api_is_refused_before_the_superlink(fake, method, path):
    client, superlink, gateway = fake
    reply = client.request(method, path, content=b"x")
    assert reply.status_code == 404
    assert superlink.requests == [] and gateway.refused == 1


def test_only_plain_fleet_route_names_match():
    assert FLEET_PATH.fullmatch("/v1/fleet/push-object")
    for path in ("/v1/fleet/", "/v1/fleet/a/b", "/v1/fleet/..", "/v1/fleet/x?y", "/v1/fleetx/pull"):
        assert not FLEET_PATH.fullmatch(path)


def test_an_oversized_body_is_refused_without_reading_it(fake, monkeypatch):
    client, superlink, _ = fake
    monkeypatch.setattr(gateway_module, "MAX_BODY_BYTES", 1024)
    assert client.post("/v1/fleet/push-object", content=b"x" * 2048).status_code == 413
    assert client.post("/v1/fleet/push-object", content=b"x" * 512).status_code == 200
    assert len(superlink.requests) == 1


def test_a_superlink_that_is_down_is_a_503(tmp_path):
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    gateway = FleetGateway("127.0.0.1:1", tmp_path / "ca.crt", transport=httpx.MockTransport(down))
    with TestClient(gateway, base_url="https://testserver") as client:
        assert client.post("/v1/fleet/send-node-heartbeat", content=b"").status_code == 503
