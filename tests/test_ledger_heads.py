"""Signed ledger heads: a device's ledger checked against what a server recorded of it.

The forger here has full file access: drops the triggers, rewrites or deletes rows, recomputes
every epsilon and the whole hash chain, and puts the triggers back. The chain audit alone
passes such a ledger; the heads the server kept do not.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from fedvox.client.audit_cli import app, route
from fedvox.server.run import FederatedRun
from fedvox.shared.errors import LedgerIntegrityError
from fedvox.shared.privacy.accounting import epsilon
from fedvox.shared.privacy.audit import SIGNED_HEAD, audit_ledger
from fedvox.shared.privacy.ledger import Ledger, read_rows
from fedvox.shared.privacy.ledger_head import SIGNING_KEY_FILE, SignedHead, check_heads, sign_head, signing_key
from fedvox.shared.runconfig import RunConfig
from tests.federation_kit import LocalGrid, initial_state, make_client_app
from tests.privacy_ledgers import DELTA, release, tamper
from tests.tiny import TINY


def _ledger_with_heads(folder, rounds=3):
    """A device ledger of ``rounds`` releases and the head it signed after each (the server's record)."""
    key = signing_key(folder / SIGNING_KEY_FILE)
    heads = []
    with Ledger(folder) as ledger:
        for r in range(1, rounds + 1):
            ledger.append(release(r), accountant="rdp")
            heads.append(sign_head(ledger, "alice", key, f"run-1/{r}"))
    return heads


def _forge_lower_noise(folder):
    """Claim round 2 had more noise: recompute every later epsilon and the whole chain."""
    tamper(folder, "UPDATE releases SET noise_multiplier = 3.0 WHERE id = 2")
    rows = read_rows(folder)
    fixed = [epsilon([r.to_mechanism() for r in rows[: i + 1]], DELTA, "rdp") for i in range(len(rows))]
    updates = (f"UPDATE releases SET epsilon = {e!r} WHERE id = {r.id}" for r, e in zip(rows, fixed, strict=True))
    tamper(folder, *updates, rehash=True)


def test_a_signed_head_verifies_and_any_changed_field_does_not(tmp_path):
    head = _ledger_with_heads(tmp_path)[-1]
    head.verify()
    assert SignedHead.from_json(json.loads(json.dumps(head.to_json()))) == head
    for change in ({"rows": 2}, {"head": "0" * 64}, {"client_id": "bob"}, {"context": "run-1/9"}):
        with pytest.raises(LedgerIntegrityError, match="does not verify"):
            replace(head, **change).verify()
    other = sign_head(Ledger(tmp_path), "alice", signing_key(tmp_path / "other.key"), head.context)
    assert check_heads(read_rows(tmp_path), [head, other]) == ["client 'alice''s heads are signed by 2 different keys"]


def test_a_rewritten_chain_passes_the_chain_audit_but_not_the_signed_heads(tmp_path):
    heads = _ledger_with_heads(tmp_path)
    _forge_lower_noise(tmp_path)

    assert audit_ledger(tmp_path).all_findings == []  # what the chain alone cannot see
    findings = audit_ledger(tmp_path, heads=heads).all_findings
    assert [f.kind for f in findings] == [SIGNED_HEAD, SIGNED_HEAD]  # heads after rows 2 and 3; row 1 is intact
    assert all("rewritten since" in f.message for f in findings)


def test_a_truncated_ledger_passes_the_chain_audit_but_not_the_signed_heads(tmp_path):
    heads = _ledger_with_heads(tmp_path)
    tamper(tmp_path, "DELETE FROM releases WHERE id = 3")

    assert audit_ledger(tmp_path).all_findings == []
    (finding,) = audit_ledger(tmp_path, heads=heads).all_findings
    assert "signed 3 row(s)" in finding.message and "truncated" in finding.message


def test_the_server_records_signed_heads_and_the_audit_holds_a_device_to_them(tmp_path):
    """End to end: replies carry signed heads, rounds record them, ``fedvox-audit --heads`` checks."""
    config = RunConfig.from_flat(
        {
            **TINY,
            "checkpoint-dir": str(tmp_path / "run"),
            "num-server-rounds": 2,
            "local-steps": 1,
            "min-clients": 2,
            "wire-precision": "fp32",
        }
    )
    FederatedRun(config, initial_state(), seed=0).execute(LocalGrid(make_client_app(tmp_path / "clients"), num_nodes=2))

    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        clients = sorted(head["client-id"] for head in line["ledger-heads"].values())
        assert clients == ["speaker-0", "speaker-1"] and "ledger-heads-missing" not in line
        for head in line["ledger-heads"].values():
            SignedHead.from_json(head).verify()
    last = {head["client-id"]: head for head in lines[-1]["ledger-heads"].values()}
    assert last["speaker-0"]["rows"] == 2  # the evaluate reply after round 2's release

    device = tmp_path / "clients" / "client-0"
    result = CliRunner().invoke(app, route([str(device), "--heads", str(tmp_path / "run")]))
    assert result.exit_code == 0, result.output
    tamper(device, "UPDATE releases SET noise_multiplier = 9.0 WHERE id = 1", rehash=True)  # chain recomputed
    assert CliRunner().invoke(app, route([str(device)])).exit_code == 0
    result = CliRunner().invoke(app, route([str(device), "--heads", str(tmp_path / "run")]))
    assert result.exit_code == 1 and "signed_head" in result.output and "rewritten since" in result.output
