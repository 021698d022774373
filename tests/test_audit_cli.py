"""``fedvox-audit`` end to end: tables, JSON, plots, exit codes, and the subcommand routing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedvox.client.audit_cli import app, main, route
from fedvox.shared.privacy.budget import Budget
from fedvox.shared.privacy.ledger import LEDGER_FILENAME, Ledger
from tests.privacy_ledgers import release, tamper

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def simulation(tmp_path_factory) -> Path:
    """A simulation's output: two client ledgers (utterance level) and the server's (speaker level)."""
    root = tmp_path_factory.mktemp("sim")
    for client, noise in (("alice", 1.0), ("bob", 1.3)):
        with Ledger(root / "clients" / client) as ledger:
            for r in range(3):
                ledger.append(release(r, client, noise=noise), budget=Budget(8.0), accountant="rdp")
    with Ledger(root / "server") as ledger:
        for r in range(3):
            ledger.append(
                release(r, "population", noise=1.1, sample_rate=0.5, steps=1, unit="speaker"), accountant="rdp"
            )
    return root


def invoke(*args: str):
    return CliRunner().invoke(app, route([*args]))


def test_table_and_explanations(simulation):
    result = invoke(str(simulation))
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    for text in ("alice", "bob", "population", "utterance", "speaker", "recorded ε", "PLD ε", "RDP ε", "audit passed"):
        assert text in out
    assert "does NOT hide the speaker's voice" in out  # utterance level, in plain words
    assert "hides whether a speaker took part" in out  # speaker level
    assert "<= 1 strong, <= 10 reasonable" in out
    assert out.count("head hash") == 3


def test_json_output(simulation):
    result = invoke(str(simulation), "--json", "--budget", "8")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["findings"] == []
    accounts = {(a["client_id"], a["unit"]): a for a in report["accounts"]}
    assert set(accounts) == {("alice", "utterance"), ("bob", "utterance"), ("population", "speaker")}
    alice = accounts[("alice", "utterance")]
    with Ledger(simulation / "clients" / "alice") as ledger:
        assert alice["recorded_epsilon"] == [row.epsilon for row in ledger.rows()]
    assert alice["releases"] == 3 and alice["steps"] == 60 and alice["rounds"] == [0, 1, 2]
    assert alice["remaining"] == pytest.approx(8.0 - alice["recorded_epsilon"][-1])
    assert alice["pld_epsilon"][-1] <= alice["recorded_epsilon"][-1] <= alice["rdp_epsilon"][-1] + 1e-2
    assert alice["status"] == "ok" and alice["tier"] == "reasonable"


def test_plots(simulation, tmp_path):
    result = invoke(str(simulation), "--plot", str(tmp_path / "plots"))
    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["epsilon_speaker_population.png", "epsilon_utterance_alice.png", "epsilon_utterance_bob.png"]
    for name in pngs:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_flags_fail_the_audit(simulation, tmp_path):
    with Ledger(tmp_path / "tampered") as ledger:
        for r in range(3):
            ledger.append(release(r), accountant="rdp")
    tamper(tmp_path / "tampered", "UPDATE releases SET epsilon = epsilon / 3 WHERE id = 3")
    result = invoke(str(tmp_path / "tampered" / LEDGER_FILENAME), str(simulation / "server"), "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert {f["kind"] for f in report["findings"]} == {"integrity", "under_reported"}
    assert {f["row_id"] for f in report["findings"]} == {3}
    result = invoke(str(simulation), "--budget", "1")
    assert result.exit_code == 1
    assert "budget_overrun" in result.stdout and "audit FAILED" in result.stdout


def test_routing_keeps_room_for_subcommands():
    assert route(["some/ledger"]) == ["ledger", "some/ledger"]
    assert route(["ledger", "some/ledger"]) == ["ledger", "some/ledger"]
    assert route(["--help"]) == ["--help"]
    assert route([]) == []


def test_unusable_input_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main([str(tmp_path / "missing")])
    assert exited.value.code == 2
    assert "no privacy ledger" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exited:
        main([str(tmp_path / "empty")])
    assert exited.value.code == 2


@pytest.mark.slow
def test_console_script(simulation):
    script = Path(sys.executable).parent / "fedvox-audit"
    done = subprocess.run(
        [str(script), str(simulation), "--json"], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ok"] is True
