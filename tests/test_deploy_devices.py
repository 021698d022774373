"""Device keys, the operator's registry of devices, and what ``fedvox-server devices`` reports."""

import base64
import json
import shutil
import subprocess

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from starlette.testclient import TestClient
from typer.testing import CliRunner

from fedvox.server.cli import app
from fedvox.server.deploy.devices import Registry, WaitingRoom, device_report
from fedvox.server.deploy.gateway import FleetGateway
from fedvox.server.deploy.home import init_home
from fedvox.shared.device_keys import fingerprint, parse_public_key, ssh_text
from fedvox.shared.errors import ConfigError, DeploymentError
from tests.deploy_kit import server_running

runner = CliRunner()


def _line(key) -> str:
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


@pytest.fixture
def home(tmp_path):
    return init_home(tmp_path / "home", ["localhost"])


def test_device_keys_are_read_from_their_line_or_file_and_only_nist_ecdsa_is_accepted(tmp_path):
    key = ec.generate_private_key(ec.SECP384R1())
    (tmp_path / "node.pub").write_text(_line(key) + " owner@laptop\n")
    assert ssh_text(parse_public_key(_line(key) + " comment")) == _line(key)
    assert ssh_text(parse_public_key(str(tmp_path / "node.pub"))) == _line(key)
    for other in (ed25519.Ed25519PrivateKey.generate(), rsa.generate_private_key(65537, 2048)):
        with pytest.raises(ConfigError, match="ECDSA key on a NIST curve"):
            parse_public_key(_line(other))
    with pytest.raises(ConfigError, match="not an OpenSSH public key"):
        parse_public_key("ecdsa-sha2-nistp384 garbage")
    rsa_line = "ssh-rsa " + "A" * 364  # no "/" in its base64: one path component past the 255-byte limit
    with pytest.raises(ConfigError, match="not an OpenSSH public key"):
        parse_public_key(rsa_line)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
def test_fingerprints_match_ssh_keygen(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "node.pub").write_text(_line(key) + "\n")
    printed = subprocess.run(
        ["ssh-keygen", "-lf", str(tmp_path / "node.pub")], capture_output=True, text=True, check=True
    )
    assert printed.stdout.split()[1] == fingerprint(key.public_key())


def test_registering_is_idempotent_and_names_and_keys_stay_unique(home):
    registry = Registry(home)
    alice, bob = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    device, new = registry.add(_line(alice), "alice")
    assert new and device.fingerprint == fingerprint(alice.public_key())
    assert registry.add(_line(alice) + " other comment", "alice") == (device, False)
    with pytest.raises(DeploymentError, match="already registered as 'alice'"):
        registry.add(_line(alice), "alice-2")
    with pytest.raises(DeploymentError, match="taken by another key"):
        registry.add(_line(bob), "alice")
    with pytest.raises(ConfigError, match="device name"):
        registry.add(_line(bob), "bob; rm -rf /")
    unnamed, _ = registry.add(_line(bob))
    assert unnamed.name.startswith("device-") and len(registry.devices()) == 2
    registry.record_node("alice", 42)
    registry.record_node("alice", 42)
    assert registry.devices()[0].node_ids == [42]


def test_the_device_report_joins_node_ids_with_what_each_round_recorded(home):
    registry = Registry(home)
    alice, bob = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    registry.add(_line(alice), "alice")
    registry.add(_line(bob), "bob")
    registry.add(_line(ec.generate_private_key(ec.SECP384R1())), "carol")  # never authorised
    registry.record_node("alice", 11)
    registry.record_node("bob", 22)
    registry.record_node("bob", 23)  # the server's database was reset: a new node id
    rounds = [
        {
            "round": 1,
            "clients": [
                {
                    "node-id": 11,
                    "accepted": True,
                    "client-id": "client-a",
                    "profile": "cpu-fp32",
                    "epsilon-spent": 1.5,
                    "epsilon-budget": 8.0,
                },
                {
                    "node-id": 22,
                    "accepted": False,
                    "client-id": "client-b",
                    "profile": "cuda-bf16",
                    "epsilon-spent": 0.0,
                    "epsilon-budget": 9.0,
                },
            ],
        },
        {
            "round": 2,
            "clients": [
                {
                    "node-id": 11,
                    "accepted": True,
                    "client-id": "client-a",
                    "profile": "cpu-fp32",
                    "epsilon-spent": 2.5,
                    "epsilon-budget": 8.0,
                },
                {
                    "node-id": 23,
                    "accepted": True,
                    "client-id": "client-b",
                    "profile": "cuda-bf16",
                    "epsilon-spent": 1.0,
                    "epsilon-budget": 9.0,
                },
            ],
        },
        {"round": 3},  # a round no device trained in
    ]
    (home.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))

    report = {d["name"]: d for d in device_report(home)}
    assert (report["alice"]["rounds-joined"], report["alice"]["last-round"], report["alice"]["epsilon-spent"]) == (
        2,
        2,
        2.5,
    )
    assert (report["bob"]["rounds-joined"], report["bob"]["node-id"], report["bob"]["profile"]) == (1, 23, "cuda-bf16")
    assert report["alice"]["status"] == "server stopped" and report["carol"]["status"] == "not authorised yet"
    assert report["carol"]["rounds-joined"] == 0 and report["carol"]["epsilon-spent"] is None

    result = runner.invoke(app, ["devices", str(home.root), "--json"])
    assert result.exit_code == 0, result.output
    assert [d["name"] for d in json.loads(result.stdout)["devices"]] == ["alice", "bob", "carol"]


def test_register_from_the_command_line_while_the_server_is_stopped(home, tmp_path):
    key = ec.generate_private_key(ec.SECP384R1())
    (tmp_path / "alice.pub").write_text(_line(key) + "\n")
    result = runner.invoke(app, ["register", str(home.root), str(tmp_path / "alice.pub"), "--name", "alice"])
    assert result.exit_code == 0, result.output
    assert "authorised when the server starts" in result.output
    assert [d.name for d in Registry(home).devices()] == ["alice"]
    result = runner.invoke(app, ["register", str(tmp_path / "nowhere"), _line(key)])
    assert result.exit_code != 0 and "fedvox-server init" in str(result.exception)


def _flower_header(key) -> str:
    return base64.b64encode(public_key_to_bytes(key.public_key())).decode()


def test_a_refused_key_waits_for_registration_and_is_registered_by_its_fingerprint(home):
    refusal = httpx.MockTransport(lambda request: httpx.Response(401, content=b"unknown node"))
    gateway = FleetGateway("127.0.0.1:1", home.internal_ca, transport=refusal, on_refused_key=WaitingRoom(home).note)
    stranger = ec.generate_private_key(ec.SECP384R1())
    with TestClient(gateway, base_url="https://testserver") as client:
        for _ in range(2):
            client.post("/v1/fleet/activate-node", content=b"x", headers={"flwr-public-key": _flower_header(stranger)})
        client.post("/v1/fleet/activate-node", content=b"x", headers={"flwr-public-key": "bm90IGEga2V5"})  # garbage
    key_print = fingerprint(stranger.public_key())

    listed = json.loads(runner.invoke(app, ["devices", str(home.root), "--json"]).stdout)
    assert [(w["fingerprint"], w["attempts"]) for w in listed["waiting"]] == [(key_print, 2)]
    shown = runner.invoke(app, ["devices", str(home.root)]).output
    assert f"fedvox-server register {home.root} {key_print} --name NAME" in shown
    assert "BEGIN PUBLIC KEY" not in (home.state / "waiting.json").read_text()

    result = runner.invoke(app, ["register", str(home.root), key_print, "--name", "dora"])
    assert result.exit_code == 0, result.output
    assert [(d.name, d.fingerprint) for d in Registry(home).devices()] == [("dora", key_print)]
    assert WaitingRoom(home).waiting() == []
    result = runner.invoke(app, ["register", str(home.root), "SHA256:nobodyxx", "--name", "eve"])
    assert result.exit_code != 0 and "is waiting for registration" in str(result.exception)


def test_the_devices_table_fits_80_columns_with_every_fingerprint_whole(home):
    for name in ("alice", "bob-the-second-device"):
        Registry(home).add(_line(ec.generate_private_key(ec.SECP384R1())), name)
    result = runner.invoke(app, ["devices", str(home.root)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80, result.output
    for device in Registry(home).devices():
        assert f"{device.name}: {device.fingerprint}" in result.output


def test_devices_answers_from_the_home_while_the_superlink_winds_down_or_does_not_answer(home):
    registry = Registry(home)
    registry.add(_line(ec.generate_private_key(ec.SECP384R1())), "alice")
    registry.record_node("alice", 11)
    with server_running(home, stopping=True):  # the run ended; the SuperLink waits for connections to close
        result = runner.invoke(app, ["devices", str(home.root), "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["devices"][0]["status"] == "server stopping"
    with server_running(home):  # a SuperLink that does not answer (nothing listens on its port)
        result = runner.invoke(app, ["devices", str(home.root), "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["devices"][0]["status"] == "server not answering"
