"""The device's store of accountant answers: exact memoisation across processes, keyed on every input."""

import json

import pytest

from fedvox.shared.privacy import accounting
from fedvox.shared.privacy.accounting import Mechanism, epsilon, remember_epsilons
from fedvox.shared.privacy.epsilon_store import EpsilonStore

HISTORY = (Mechanism(1.1, 0.3, 4), Mechanism(0.9, 0.3, 2))


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setattr(accounting, "STORE_AFTER_S", 0.0)
    accounting._epsilon.cache_clear()  # as a new process: nothing in memory
    remember_epsilons(store := EpsilonStore(tmp_path / "epsilon-cache.json"))
    yield store
    remember_epsilons(None)
    accounting._epsilon.cache_clear()


def _new_process_that_cannot_evaluate(monkeypatch):
    accounting._epsilon.cache_clear()

    def evaluate(*_):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(accounting, "_evaluate", evaluate)


def test_a_later_process_reads_the_exact_answer_and_a_changed_input_is_evaluated(store, monkeypatch):
    first = epsilon(HISTORY, 1e-5, "rdp")
    assert len(json.loads(store.path.read_text())) == 1
    _new_process_that_cannot_evaluate(monkeypatch)
    assert epsilon(HISTORY, 1e-5, "rdp") == first  # bit for bit
    assert epsilon(reversed(HISTORY), 1e-5, "rdp") == first  # the same composition
    for changed in (
        lambda: epsilon(HISTORY, 2e-5, "rdp"),
        lambda: epsilon(HISTORY, 1e-5, "prv"),
        lambda: epsilon((*HISTORY, Mechanism(1.1, 0.3, 1)), 1e-5, "rdp"),
        lambda: epsilon((Mechanism(1.1 + 1e-12, 0.3, 4), HISTORY[1]), 1e-5, "rdp"),
    ):
        with pytest.raises(AssertionError, match="evaluated again"):
            changed()


def test_another_accountant_release_is_a_different_question(store, monkeypatch):
    epsilon(HISTORY, 1e-5, "rdp")
    _new_process_that_cannot_evaluate(monkeypatch)
    monkeypatch.setattr(accounting, "accountant_version", lambda: "opacus 9.9")
    with pytest.raises(AssertionError, match="evaluated again"):
        epsilon(HISTORY, 1e-5, "rdp")


def test_an_unreadable_store_only_costs_the_evaluation(store):
    store.path.write_text("{not json")
    value = epsilon(HISTORY, 1e-5, "rdp")
    assert json.loads(store.path.read_text()) and value == accounting._evaluate(
        accounting.compact(HISTORY), 1e-5, "rdp"
    )
