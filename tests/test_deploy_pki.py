"""The server home: its certificates (made, brought, checked, renewed) and file permissions."""

import datetime as dt
import ssl
import stat

import pytest
from typer.testing import CliRunner

from fedvox.server.cli import app
from fedvox.server.deploy import pki
from fedvox.server.deploy.home import ServerHome, ensure_link_certificate, init_home, renew
from fedvox.shared.errors import ConfigError, DeploymentError

runner = CliRunner()


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_init_makes_a_ca_a_server_certificate_for_every_name_and_keeps_keys_private(tmp_path):
    home = init_home(tmp_path / "home", ["voice.example.org", "192.0.2.7"], port=9555)

    assert _mode(home.root) == 0o700 and _mode(home.pki) == 0o700
    assert _mode(home.ca_key) == _mode(home.server_key) == 0o600
    assert _mode(home.ca_cert) == _mode(home.server_cert) == 0o644
    cert = pki.check_server_pair(home.server_cert, home.server_key, home.ca_cert, ["voice.example.org", "192.0.2.7"])
    assert set(pki.subject_names(cert)) == {"voice.example.org", "192.0.2.7"}
    assert home.settings().port == 9555 and home.settings().names == ("voice.example.org", "192.0.2.7")
    config = home.run_config()
    assert config.checkpoint_dir == str(home.run_dir) and config.model_config == "base"
    # Python's own TLS stack accepts the pair as a server and trusts it through the CA.
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(home.server_cert, home.server_key)
    ssl.create_default_context(cafile=str(home.ca_cert))


def test_a_server_home_is_made_once(tmp_path):
    init_home(tmp_path / "home", ["localhost"])
    with pytest.raises(DeploymentError, match=r"already a server home.*--renew-certificate"):
        init_home(tmp_path / "home", ["localhost"])


def test_the_certificate_check_names_what_is_wrong(tmp_path):
    home = init_home(tmp_path / "home", ["voice.example.org"])
    other = init_home(tmp_path / "other", ["voice.example.org"])
    with pytest.raises(DeploymentError, match=r"not valid for 10.0.0.1"):
        pki.check_server_pair(home.server_cert, home.server_key, home.ca_cert, ["10.0.0.1"])
    with pytest.raises(DeploymentError, match="not signed by the CA"):
        pki.check_server_pair(home.server_cert, home.server_key, other.ca_cert)
    with pytest.raises(DeploymentError, match="does not belong to the certificate"):
        pki.check_server_pair(home.server_cert, other.server_key, home.ca_cert)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=pki.SERVER_DAYS + 1)
    with pytest.raises(DeploymentError, match=r"expired on .*--renew-certificate"):
        pki.check_server_pair(home.server_cert, home.server_key, home.ca_cert, at=later)


def test_name_matching_follows_tls_rules():
    ca_key, ca = pki.create_ca("test CA")
    _, cert = pki.issue_server_certificate(ca_key, ca, ["*.example.org", "2001:db8::1", "Voice.Local"])
    assert pki.covers(cert, "a.example.org") and not pki.covers(cert, "a.b.example.org")
    assert not pki.covers(cert, "example.org")
    assert pki.covers(cert, "2001:db8:0::1") and not pki.covers(cert, "2001:db8::2")
    assert pki.covers(cert, "voice.local.")


def test_an_operator_brings_their_own_certificate_and_it_is_checked_first(tmp_path):
    mine = init_home(tmp_path / "mine", ["voice.example.org"])
    with pytest.raises(DeploymentError, match=r"not valid for other.example.org"):
        init_home(
            tmp_path / "home",
            ["other.example.org"],
            bring_ca=mine.ca_cert,
            bring_cert=mine.server_cert,
            bring_key=mine.server_key,
        )
    assert not (tmp_path / "home").exists()  # nothing half-made
    with pytest.raises(ConfigError, match="all of --ca-cert, --cert and --key"):
        init_home(tmp_path / "home", ["voice.example.org"], bring_ca=mine.ca_cert)

    home = init_home(
        tmp_path / "home",
        ["voice.example.org"],
        bring_ca=mine.ca_cert,
        bring_cert=mine.server_cert,
        bring_key=mine.server_key,
    )
    assert not home.ca_key.exists() and _mode(home.server_key) == 0o600
    assert home.server_cert.read_bytes() == mine.server_cert.read_bytes()
    with pytest.raises(DeploymentError, match="uses a certificate you brought"):
        renew(home, ["new.example.org"])


def test_renewing_issues_a_certificate_for_new_names_under_the_same_ca(tmp_path):
    home = init_home(tmp_path / "home", ["old.example.org"])
    ca_before = home.ca_cert.read_bytes()
    result = runner.invoke(app, ["init", str(home.root), "--renew-certificate", "--name", "new.example.org"])
    assert result.exit_code == 0, result.output
    assert home.ca_cert.read_bytes() == ca_before  # devices keep trusting the same root
    pki.check_server_pair(home.server_cert, home.server_key, home.ca_cert, ["new.example.org"])
    assert ServerHome(home.root).settings().names == ("new.example.org",)


def test_the_loopback_certificate_is_for_127_0_0_1_and_its_ca_key_is_never_kept(tmp_path):
    home = init_home(tmp_path / "home", ["localhost"])
    ensure_link_certificate(home)
    pki.check_server_pair(home.link_cert, home.link_key, home.internal_ca, ["127.0.0.1"])
    assert sorted(p.name for p in home.internal_ca.parent.iterdir()) == ["ca.crt", "link.crt", "link.key"]
    before = home.link_cert.read_bytes()
    ensure_link_certificate(home)  # still valid: kept
    assert home.link_cert.read_bytes() == before


def test_init_from_the_command_line_with_a_run_configuration(tmp_path):
    (tmp_path / "run.toml").write_text("num-server-rounds = 7\n[dp]\nclip-norm = 0.5\n")
    result = runner.invoke(
        app,
        [
            "init",
            str(tmp_path / "home"),
            "--name",
            "localhost",
            "--port",
            "9444",
            "--run-config",
            str(tmp_path / "run.toml"),
        ],
    )
    assert result.exit_code == 0, result.output
    config = ServerHome(tmp_path / "home").run_config()
    assert (config.num_server_rounds, config.dp.clip_norm) == (7, 0.5)
    (tmp_path / "bad.toml").write_text("num-server-round = 7\n")
    result = runner.invoke(app, ["init", str(tmp_path / "bad-home"), "--run-config", str(tmp_path / "bad.toml")])
    assert result.exit_code != 0 and "num-server-round" in str(result.exception)
