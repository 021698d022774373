"""Device keys, the operator's registry of devices, and what ``fedvox-server devices`` reports."""

import json
import shutil
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from typer.testing import CliRunner

from fedvox.server.cli import app
from fedvox.server.deploy.devices import Registry, device_report
from fedvox.server.deploy.home import init_home
from fedvox.shared.device_keys import fingerprint, parse_public_key, ssh_text
from fedvox.shared.errors import ConfigError, DeploymentError

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


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
def test_fingerprints_match_ssh_keygen(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "node.pub").write_text(_line(key) + "\n")
    printed = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "node.pub")], capture_output=True, text=True, check=True)
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
        {"round": 1, "clients": [
            {"node-id": 11, "accepted": True, "client-id": "client-a", "profile": "cpu-fp32", "epsilon-spent": 1.5, "epsilon-budget": 8.0},
            {"node-id": 22, "accepted": False, "client-id": "client-b", "profile": "cuda-bf16", "epsilon-spent": 0.0, "epsilon-budget": 9.0},
        ]},
        {"round": 2, "clients": [
            {"node-id": 11, "accepted": True, "client-id": "client-a", "profile": "cpu-fp32", "epsilon-spent": 2.5, "epsilon-budget": 8.0},
            {"node-id": 23, "accepted": True, "client-id": "client-b", "profile": "cuda-bf16", "epsilon-spent": 1.0, "epsilon-budget": 9.0},
        ]},
        {"round": 3},  # a round no device trained in
    ]
    (home.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))

    report = {d["name"]: d for d in device_report(home)}
    assert (report["alice"]["rounds-joined"], report["alice"]["last-round"], report["alice"]["epsilon-spent"]) == (2, 2, 2.5)
    assert (report["bob"]["rounds-joined"], report["bob"]["node-id"], report["bob"]["profile"]) == (1, 23, "cuda-bf16")
    assert report["alice"]["status"] == "server stopped" and report["carol"]["status"] == "not authorised yet"
    assert report["carol"]["rounds-joined"] == 0 and report["carol"]["epsilon-spent"] is None

    result = runner.invoke(app, ["devices", str(home.root), "--json"])
    assert result.exit_code == 0, result.output
    assert [d["name"] for d in json.loads(result.stdout)] == ["alice", "bob", "carol"]


def test_register_from_the_command_line_while_the_server_is_stopped(home, tmp_path):
    key = ec.generate_private_key(ec.SECP384R1())
    (tmp_path / "alice.pub").write_text(_line(key) + "\n")
    result = runner.invoke(app, ["register", str(home.root), str(tmp_path / "alice.pub"), "--name", "alice"])
    assert result.exit_code == 0, result.output
    assert "authorised when the server starts" in result.output
    assert [d.name for d in Registry(home).devices()] == ["alice"]
    result = runner.invoke(app, ["register", str(tmp_path / "nowhere"), _line(key)])
    assert result.exit_code != 0 and "fedvox-server init" in str(result.exception)
