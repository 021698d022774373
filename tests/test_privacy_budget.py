"""Budgets: a round that would overspend is refused before training and charges nothing."""

from __future__ import annotations

import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedvox.shared.errors import BudgetExceededError, ConfigError
from fedvox.shared.privacy.accounting import Mechanism, calibrate_noise_multiplier, epsilon
from fedvox.shared.privacy.budget import Budget
from fedvox.shared.privacy.ledger import Ledger, read_rows
from tests.privacy_ledgers import DELTA, release


def test_refusal_says_what_was_spent_what_it_would_cost_and_what_to_change(tmp_path):
    budget = Budget(3.0)
    with Ledger(tmp_path) as ledger:
        ledger.append(release(0, noise=1.0), budget=budget, accountant="rdp")
        spent = ledger.spent("alice", "utterance")
        planned = Mechanism(0.7, 0.05, 200)
        with pytest.raises(BudgetExceededError) as refused:
            budget.check(ledger.history("alice", "utterance"), planned, delta=DELTA, accountant="rdp", subject="alice")
        message = str(refused.value)
        after = epsilon([*ledger.history("alice", "utterance"), planned], DELTA, "rdp")
        assert f"from {spent:.3f} to {after:.3f}" in message
        assert "budget 3" in message and "nothing was trained or charged" in message
        sigma = calibrate_noise_multiplier(
            3.0, DELTA, sample_rate=0.05, steps=200, history=ledger.history("alice", "utterance"), accountant="rdp"
        )
        assert f"raise noise_multiplier to at least {sigma:.3f}" in message
        steps = int(message.split("run at most ")[1].split()[0])
        assert epsilon([*ledger.history("alice", "utterance"), Mechanism(0.7, 0.05, steps)], DELTA, "rdp") <= 3.0
        assert epsilon([*ledger.history("alice", "utterance"), Mechanism(0.7, 0.05, steps + 1)], DELTA, "rdp") > 3.0
        # the ledger re-checks under its write lock and records nothing
        with pytest.raises(BudgetExceededError):
            ledger.append(release(1, noise=0.7, steps=200), budget=budget, accountant="rdp")
    assert len(read_rows(tmp_path)) == 1


def test_an_exhausted_budget_says_so(tmp_path):
    with Ledger(tmp_path) as ledger:
        ledger.append(release(0, noise=0.6, steps=100), accountant="rdp")
        with pytest.raises(BudgetExceededError, match="budget is used up"):
            ledger.append(release(1), budget=Budget(1.0), accountant="rdp")


def test_budget_must_be_positive():
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError):
            Budget(bad)


def test_the_check_before_training_is_what_the_ledger_records(tmp_path):
    budget = Budget(8.0)
    planned = release(1, noise=1.2)
    with Ledger(tmp_path) as ledger:
        ledger.append(release(0), budget=budget)
        expected = budget.check(ledger.history("alice", "utterance"), planned.mechanism, delta=DELTA)
        assert ledger.append(planned, budget=budget).epsilon == expected
        assert ledger.rows()[-1].budget_epsilon == 8.0


requests = st.lists(
    st.tuples(
        st.floats(0.4, 4.0),  # noise multiplier
        st.sampled_from([0.0, 0.002, 0.01, 0.05, 0.2, 1.0]),  # sample rate (few values: RDP curves are memoised)
        st.integers(0, 300),  # steps
        st.sampled_from(["alice", "bob"]),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=30, deadline=None)
@given(budget=st.floats(0.5, 12.0), requests=requests)
def test_no_sequence_of_requests_exceeds_the_budget(budget, requests):
    with tempfile.TemporaryDirectory() as folder, Ledger(folder) as ledger:
        for r, (noise, sample_rate, steps, client) in enumerate(requests):
            before = read_rows(folder)
            try:
                row = ledger.append(
                    release(r, client, noise=noise, sample_rate=sample_rate, steps=steps),
                    budget=Budget(budget),
                    accountant="rdp",
                )
            except BudgetExceededError:
                assert read_rows(folder) == before  # a refusal charges nothing
                continue
            assert row.epsilon <= budget
            assert ledger.spent(client, "utterance") == row.epsilon
        for client in ("alice", "bob"):
            history = ledger.history(client, "utterance")
            assert epsilon(history, DELTA, "rdp") <= budget
