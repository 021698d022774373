"""Audit maths: known ledgers recompute to known values; tampering and overruns are flagged;
the one-run canary bound reproduces the published table."""

from __future__ import annotations

import math

import pytest

from fedvox.shared.errors import ConfigError
from fedvox.shared.privacy.accounting import Mechanism, epsilon
from fedvox.shared.privacy.audit import (
    BUDGET_OVERRUN,
    INTEGRITY,
    UNACCOUNTABLE,
    UNDER_REPORTED,
    audit_ledger,
    one_run_epsilon_lower_bound,
    one_run_p_value,
    posterior_bound,
)
from fedvox.shared.privacy.budget import Budget
from fedvox.shared.privacy.ledger import Component, Ledger, Release
from tests.privacy_ledgers import DELTA, gaussian_epsilon, release, tamper


def kinds(audit) -> set[str]:
    return {finding.kind for finding in audit.all_findings}


@pytest.fixture
def three_rounds(tmp_path):
    """alice: three DP-SGD rounds recorded with PRV (the default)."""
    with Ledger(tmp_path) as ledger:
        for r, noise in enumerate((1.0, 1.2, 0.9)):
            ledger.append(release(r, noise=noise, steps=30))
    return tmp_path


def test_hand_checkable_ledger(tmp_path):
    # Four full-batch Gaussian steps at sigma=2 are one Gaussian at sigma=1: epsilon in closed form.
    with Ledger(tmp_path) as ledger:
        ledger.append(release(0, noise=2.0, sample_rate=1.0, steps=4))
    audit = audit_ledger(tmp_path)
    [account] = audit.accounts
    exact = gaussian_epsilon(1.0, DELTA)
    assert exact == pytest.approx(4.4, abs=0.05)
    assert exact <= account.pld[0] <= exact + 0.01
    assert account.rdp[0] >= exact
    assert exact <= account.recorded <= exact + 0.021
    assert audit.all_findings == []


def test_recomputation_agrees_with_the_ledger(three_rounds):
    audit = audit_ledger(three_rounds)
    assert audit.all_findings == []
    [account] = audit.accounts
    recorded = [row.epsilon for row in account.rows]
    assert account.opacus == recorded[-1]  # the writer's accountant, replayed
    for rec, pld, rdp in zip(recorded, account.pld, account.rdp, strict=True):
        assert pld <= rec <= pld + 0.02  # PRV (upper estimate) vs dp-accounting PLD
        assert rdp > rec  # RDP is looser
    assert audit.rows == 3 and audit.head == account.rows[-1].row_hash


def test_audit_at_another_delta(three_rounds):
    audit = audit_ledger(three_rounds, delta=1e-8)
    [account] = audit.accounts
    assert audit.all_findings == []  # recorded epsilons are still checked at their own delta
    assert account.delta == 1e-8
    assert account.pld[-1] > account.recorded
    history = [row.to_mechanism() for row in account.rows]
    assert account.opacus == epsilon(history, 1e-8, "prv")


def test_lowered_epsilon_is_flagged(three_rounds):
    tamper(three_rounds, "UPDATE releases SET epsilon = epsilon / 2 WHERE id = 3")
    audit = audit_ledger(three_rounds)
    assert kinds(audit) == {INTEGRITY, UNDER_REPORTED}
    assert any("edited" in f.message and f.row_id == 3 for f in audit.findings)


def test_lowered_epsilon_with_a_rewritten_chain_is_still_flagged(three_rounds):
    # The chain looks intact after a full rehash; the independent recomputation still disagrees.
    tamper(three_rounds, "UPDATE releases SET epsilon = epsilon * 0.8", rehash=True)
    audit = audit_ledger(three_rounds)
    assert audit.findings == []
    assert kinds(audit) == {UNDER_REPORTED}
    assert {f.row_id for f in audit.all_findings} >= {1, 2, 3}


def test_identical_histories_are_judged_on_their_own_records(tmp_path):
    # A server charges every eligible speaker the same rounds; the audit recomputes them once.
    with Ledger(tmp_path) as ledger:
        for r in range(2):
            for speaker in ("s1", "s2", "s3"):
                ledger.append(release(r, speaker, noise=1.1, sample_rate=0.3, steps=1, unit="speaker"))
    tamper(tmp_path, "UPDATE releases SET epsilon = epsilon / 2 WHERE client_id = 's2'", rehash=True)
    audit = audit_ledger(tmp_path)
    assert {a.client_id: a.status for a in audit.accounts} == {"s1": "ok", "s2": UNDER_REPORTED, "s3": "ok"}
    assert audit.accounts[0].pld == audit.accounts[1].pld == audit.accounts[2].pld


def test_deleted_row_is_flagged(three_rounds):
    tamper(three_rounds, "DELETE FROM releases WHERE id = 2")
    audit = audit_ledger(three_rounds)
    messages = [f.message for f in audit.findings if f.kind == INTEGRITY]
    assert any("rows 2..2 are missing" in m for m in messages)
    assert any("hash chain broken" in m for m in messages)


def test_truncated_tail_changes_the_head(three_rounds):
    head = audit_ledger(three_rounds).head
    tamper(three_rounds, "DELETE FROM releases WHERE id = 3")
    audit = audit_ledger(three_rounds)
    assert audit.head != head  # only an anchored copy of the head reveals a cut tail


def test_edited_noise_multiplier_is_flagged(three_rounds):
    tamper(three_rounds, "UPDATE releases SET noise_multiplier = 0.5 WHERE id = 1")
    audit = audit_ledger(three_rounds)
    assert kinds(audit) == {INTEGRITY, UNDER_REPORTED}


def test_removed_triggers_and_reordered_times_are_flagged(three_rounds):
    tamper(
        three_rounds,
        "UPDATE releases SET created_at = '2001-01-01T00:00:00.000000+00:00' WHERE id = 3",
        keep_triggers=False,
        rehash=True,
    )
    messages = [f.message for f in audit_ledger(three_rounds).findings]
    assert sum("trigger" in m for m in messages) == 2
    assert any("earlier than row 2" in m for m in messages)


def test_falling_epsilon_is_flagged(three_rounds):
    tamper(three_rounds, "UPDATE releases SET epsilon = 0.1 WHERE id = 2", rehash=True)
    assert any("fell" in f.message for f in audit_ledger(three_rounds).findings)


def test_budget_overruns_are_flagged(tmp_path):
    with Ledger(tmp_path) as ledger:
        ledger.append(release(0, noise=1.0), budget=Budget(3.0), accountant="rdp")
        ledger.append(release(1, noise=0.7, steps=100), accountant="rdp")  # written without the check
    audit = audit_ledger(tmp_path)
    assert kinds(audit) == {BUDGET_OVERRUN}
    [account] = audit.accounts
    assert account.budget == 3.0 and account.remaining < 0
    assert kinds(audit_ledger(tmp_path, budget=100.0)) == set()  # an auditor's budget overrides


def test_unaccountable_mechanisms_are_flagged(tmp_path):
    gan = Release.shared_batch(
        run_id="run-1",
        round=0,
        client_id="alice",
        stage="s2",
        unit="utterance",
        sample_rate=0.05,
        steps=20,
        delta=DELTA,
        components=(Component("generator", 1.5, 1.0), Component("discriminator", 2.0, 1.0)),
    )
    with Ledger(tmp_path) as ledger:
        ledger.append(gan, accountant="rdp")
        ledger.append(release(0, "bob"), accountant="rdp")
    assert kinds(audit_ledger(tmp_path)) == set()
    tamper(
        tmp_path,
        "UPDATE releases SET components = "
        '\'[{"name":"generator","noise_multiplier":1.5,"clip_norm":1.0}]\' WHERE id = 1',
        "UPDATE releases SET mechanism = 'laplace' WHERE id = 2",
        rehash=True,
    )
    audit = audit_ledger(tmp_path)
    messages = {f.client_id: f.message for f in audit.all_findings if f.kind == UNACCOUNTABLE}
    assert "effective noise" in messages["alice"]
    assert "unknown mechanism 'laplace'" in messages["bob"]


def test_shared_batch_rows_recompute_through_dp_accounting_composition(tmp_path):
    gan = Release.shared_batch(
        run_id="run-1",
        round=0,
        client_id="alice",
        stage="s2",
        unit="utterance",
        sample_rate=0.1,
        steps=30,
        delta=DELTA,
        components=(Component("generator", 1.5, 1.0), Component("discriminator", 2.0, 1.0)),
    )
    with Ledger(tmp_path) as ledger:
        row = ledger.append(gan, accountant="rdp")
    [account] = audit_ledger(tmp_path).accounts
    assert account.rdp[0] == pytest.approx(row.epsilon, rel=1e-3)
    assert account.rdp[0] == pytest.approx(epsilon([Mechanism(1.2, 0.1, 30)], DELTA, "rdp"), rel=1e-3)


# ---------------------------------------------------------------------- one-run bound
@pytest.mark.parametrize(
    "guesses,expected",
    [
        (50, (0.31, 0.77, 1.39, 2.78)),
        (100, (0.47, 0.96, 1.63, 3.49)),
        (500, (0.68, 1.20, 1.95, 5.11)),
        (1000, (0.73, 1.25, 2.02, 5.81)),
    ],
)
def test_one_run_bound_reproduces_the_published_table(guesses, expected):
    # opacus-dp.md section 7 (beta = 0.05, delta = 0): rows r, columns 70/80/90/100% correct.
    for fraction, value in zip((0.7, 0.8, 0.9, 1.0), expected, strict=True):
        bound = one_run_epsilon_lower_bound(guesses, round(fraction * guesses))
        assert bound == pytest.approx(value, abs=0.005)


def test_one_run_bound_properties():
    assert one_run_epsilon_lower_bound(100, 50) == 0.0  # chance level proves nothing
    bound = one_run_epsilon_lower_bound(100, 90)
    p = one_run_p_value(100, 90, bound, canaries=100)
    assert p == pytest.approx(0.05, abs=1e-6)  # the bound sits where the p-value crosses beta
    with_delta = one_run_epsilon_lower_bound(100, 90, canaries=1000, delta=1e-4)
    assert 0 < with_delta < bound  # delta only weakens what can be proved
    assert one_run_p_value(100, 90, 1.0, canaries=1000, delta=1e-4) > one_run_p_value(100, 90, 1.0, canaries=1000)
    assert one_run_epsilon_lower_bound(100, 90, beta=0.01) < bound
    with pytest.raises(ConfigError):
        one_run_p_value(10, 11, 1.0, canaries=10)


def test_posterior_bound():
    assert posterior_bound(0.0) == 0.5
    assert posterior_bound(math.log(3)) == pytest.approx(0.75)
    assert posterior_bound(math.inf) == 1.0
    assert posterior_bound(1.0, prior=0.01) == pytest.approx(0.01 * math.e / (0.01 * math.e + 0.99))
