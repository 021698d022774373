"""The device side of enrolment: its key, its node config, and the one-line errors of the check.

The check runs against real TLS listeners on 127.0.0.1 (the fedvox gateway in a thread, with no
SuperLink behind it); a registered key and a running federation are in ``test_deploy_e2e.py``.
"""

import datetime as dt
import http.server
import ipaddress
import socket
import stat
import threading
from contextlib import contextmanager

import pytest
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from flwr.common.config import parse_config_args
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from fedvox.client.enroll import (
    DeviceHome,
    Enrollment,
    check_server,
    device_key,
    parse_server,
    public_line,
    register_command,
)
from fedvox.client.profiles import ProfileOverrides
from fedvox.server.deploy import pki
from fedvox.server.deploy.gateway import FleetGateway, GatewayServer
from fedvox.server.deploy.home import init_home
from fedvox.shared.device_keys import parse_public_key
from fedvox.shared.errors import CertificateMismatch, ConfigError, DeploymentError, ServerUnreachable
from fedvox.shared.processes import free_port


def test_the_device_key_is_made_once_private_and_in_the_formats_flower_loads(tmp_path):
    home = DeviceHome.at(tmp_path / "fedvox")
    key, created = device_key(home)
    again, created_again = device_key(home)
    assert created and not created_again
    assert public_key_to_bytes(again.public_key()) == public_key_to_bytes(key.public_key())
    assert stat.S_IMODE(home.key.stat().st_mode) == 0o600 and stat.S_IMODE(home.root.stat().st_mode) == 0o700
    # flower-supernode --auth-supernode-private-key reads the OpenSSH private key ...
    loaded = serialization.load_ssh_private_key(home.key.read_bytes(), None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey) and isinstance(loaded.curve, ec.SECP384R1)
    # ... and the operator registers the printed line (or the .pub file).
    assert public_key_to_bytes(parse_public_key(public_line(key))) == public_key_to_bytes(key.public_key())
    assert public_key_to_bytes(parse_public_key(str(home.public_key))) == public_key_to_bytes(key.public_key())
    home.key.chmod(0o644)
    with pytest.raises(DeploymentError, match="readable by other users; run `chmod 600"):
        device_key(home)


def test_the_register_command_is_what_the_operator_pastes(tmp_path):
    key, _ = device_key(DeviceHome.at(tmp_path))
    command = register_command(key, "alice")
    assert command.startswith("fedvox-server register SERVER_HOME '") and command.endswith("' --name alice")
    quoted = command.split("'")[1]
    assert public_key_to_bytes(parse_public_key(quoted)) == public_key_to_bytes(key.public_key())
    # The machine's host name stays on the device; only the name its owner chose goes out. (The
    # key's base64 is random text, which may contain a short host name by chance: look outside it.)
    _, blob, comment = quoted.split(" ")
    assert comment == "fedvox@alice" and socket.gethostname() not in command.replace(blob, "").replace(comment, "")
    stored = DeviceHome.at(tmp_path).public_key.read_text()
    assert public_line(key).split(" ")[2:] == ["fedvox"] and socket.gethostname() not in stored.replace(blob, "")


def test_server_addresses_are_checked():
    assert parse_server(" voice.example.org:9443 ") == "voice.example.org:9443"
    assert parse_server("[2001:db8::7]:9443") == "[2001:db8::7]:9443"
    for bad in ("voice.example.org", "https://voice.example.org:9443", "host:99999", "host:port"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            parse_server(bad)


def test_the_node_config_reaches_the_client_app_as_flower_parses_it(tmp_path):
    enrollment = Enrollment(
        server="127.0.0.1:9443",
        root_cert=tmp_path / "ca.crt",
        data=tmp_path / "my data's cache",
        ledger=tmp_path / "ledger",
        budget_epsilon=8,
        profile={"threads": 1, "device": "cpu"},
        name=None,
    )
    path = tmp_path / "node-config.toml"
    path.write_text(tomli_w.dumps(enrollment.node_config()))
    flat = parse_config_args([str(path)])  # exactly what flower-supernode --node-config does
    assert flat["data-path"] == str(tmp_path / "my data's cache") and flat["budget-epsilon"] == 8.0
    assert flat["ledger-path"] == str(tmp_path / "ledger")
    assert ProfileOverrides.from_mapping(flat) == ProfileOverrides(threads=1, device="cpu")


# ---------------------------------------------------------------------- the check's errors
@contextmanager
def _tls_listener(cert, key):
    """The fedvox gateway with ``cert`` on a free port; nothing behind it (the SuperLink is down)."""
    port = free_port()
    server = GatewayServer(
        FleetGateway(f"127.0.0.1:{free_port()}", cert.parent / "ca.crt"), "127.0.0.1", port, cert, key
    )
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def homes(tmp_path_factory):
    root = tmp_path_factory.mktemp("homes")
    return init_home(root / "server", ["127.0.0.1"]), init_home(root / "other", ["127.0.0.1"])


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    home = DeviceHome.at(tmp_path_factory.mktemp("device"))
    return home, device_key(home)[0]


def test_a_server_that_is_not_there_is_unreachable(homes, device):
    home, key = device
    with pytest.raises(ServerUnreachable, match=r"cannot reach the fedvox server at 127.0.0.1:.*fedvox-server start"):
        check_server(f"127.0.0.1:{free_port()}", homes[0].ca_cert, key, home)


def test_a_gateway_without_its_superlink_is_a_server_restarting(homes, device):
    server, _ = homes
    home, key = device
    with (
        _tls_listener(server.server_cert, server.server_key) as address,
        pytest.raises(ServerUnreachable, match="starting or restarting"),
    ):
        check_server(address, server.ca_cert, key, home)


def test_a_certificate_from_another_ca_or_for_another_name_is_a_mismatch(homes, device):
    server, other = homes
    home, key = device
    with _tls_listener(server.server_cert, server.server_key) as address:
        with pytest.raises(CertificateMismatch, match=r"does not vouch for .*pki/ca.crt"):
            check_server(address, other.ca_cert, key, home)
        port = address.rsplit(":", 1)[1]
        with pytest.raises(CertificateMismatch, match=r"mismatch|not valid"):
            check_server(f"localhost:{port}", server.ca_cert, key, home)  # the certificate names 127.0.0.1 only


def test_an_expired_server_certificate_is_a_mismatch(homes, device, tmp_path):
    server, _ = homes
    home, key = device
    ca_key = pki.load_private_key(server.ca_key)
    ca = pki.load_certificate(server.ca_cert)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    expired = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(past)
        .not_valid_after(past + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(ca_key, hashes.SHA256())
    )
    pki.write_certificate(tmp_path / "expired.crt", expired)
    pki.write_private_key(tmp_path / "expired.key", leaf_key)
    (tmp_path / "ca.crt").write_bytes(server.ca_cert.read_bytes())
    with (
        _tls_listener(tmp_path / "expired.crt", tmp_path / "expired.key") as address,
        pytest.raises(CertificateMismatch, match="expired"),
    ):
        check_server(address, server.ca_cert, key, home)


def test_a_port_without_tls_is_named_as_such(homes, device):
    server, _ = homes
    home, key = device
    httpd = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(DeploymentError, match="does not speak TLS"):
            check_server(f"127.0.0.1:{httpd.server_address[1]}", server.ca_cert, key, home)
    finally:
        httpd.shutdown()
