"""The privacy ledger: append-only, hash-chained, idempotent, consistent across processes."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from fedvox.shared.errors import ConfigError, LedgerIntegrityError, PrivacyError
from fedvox.shared.privacy.accounting import Mechanism, _epsilon, accountant_version, epsilon
from fedvox.shared.privacy.audit import verify_integrity
from fedvox.shared.privacy.ledger import (
    COLUMNS,
    GENESIS_HASH,
    LEDGER_FILENAME,
    POISSON_GAUSSIAN_SHARED_BATCH,
    Component,
    Ledger,
    Release,
    read_rows,
    read_triggers,
)
from tests.privacy_ledgers import DELTA, release


def test_rows_record_every_column_and_the_cumulative_epsilon(tmp_path):
    with Ledger(tmp_path) as ledger:
        first = ledger.append(release(0, noise=1.0), accountant="rdp")
        second = ledger.append(release(1, noise=1.4), accountant="rdp")
        ledger.append(release(0, "bob", noise=2.0), accountant="rdp")
        assert ledger.spent("alice", "utterance") == second.epsilon
        assert ledger.history("alice", "utterance") == [Mechanism(1.0, 0.05, 20), Mechanism(1.4, 0.05, 20)]
        head = ledger.head()
    assert COLUMNS[:17] == (
        "id",
        "created_at",
        "run_id",
        "round",
        "client_id",
        "stage",
        "unit",
        "mechanism",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "clip_norm",
        "components",
        "delta",
        "accountant",
        "accountant_version",
        "epsilon",
    )
    assert first.epsilon == epsilon([Mechanism(1.0, 0.05, 20)], DELTA, "rdp")
    assert second.epsilon == epsilon([Mechanism(1.0, 0.05, 20), Mechanism(1.4, 0.05, 20)], DELTA, "rdp")
    assert second.epsilon > first.epsilon
    assert (first.mechanism, first.clip_norm, first.components, first.accountant_version) == (
        "poisson_gaussian",
        1.0,
        "[]",
        accountant_version(),
    )
    assert first.code_version.startswith("fedvox ")
    rows = read_rows(tmp_path)
    assert [r.id for r in rows] == [1, 2, 3]
    assert rows[0].prev_hash == GENESIS_HASH and rows[1].prev_hash == rows[0].row_hash
    assert head == rows[-1].row_hash
    assert rows[2].epsilon < rows[1].epsilon  # bob has his own account
    assert verify_integrity(str(tmp_path), rows, read_triggers(tmp_path)) == []


def test_triggers_refuse_update_and_delete(tmp_path):
    with Ledger(tmp_path) as ledger:
        ledger.append(release(0))
    con = sqlite3.connect(tmp_path / LEDGER_FILENAME)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        con.execute("UPDATE releases SET epsilon = 0")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        con.execute("DELETE FROM releases")
    con.close()
    assert len(read_rows(tmp_path)) == 1


def test_the_same_release_is_never_charged_twice(tmp_path):
    with Ledger(tmp_path) as ledger:
        row = ledger.append(release(0))
        again = ledger.append(release(0))  # a resumed run replays its release
        assert again == row
        with pytest.raises(PrivacyError, match="already in the ledger"):
            ledger.append(release(0, noise=2.0))  # same key, different mechanism
    with Ledger(tmp_path) as reopened:
        assert reopened.append(release(0)) == row
    assert len(read_rows(tmp_path)) == 1


def test_one_delta_and_accountant_per_client_and_unit(tmp_path):
    with Ledger(tmp_path) as ledger:
        ledger.append(release(0), accountant="rdp")
        with pytest.raises(PrivacyError, match="Keep the ledger's delta and accountant"):
            ledger.append(release(1), accountant="prv")
        other_delta = Release("run-1", 1, "alice", "s1", "utterance", Mechanism(1.0, 0.05, 20), 1e-6, clip_norm=1.0)
        with pytest.raises(PrivacyError, match="delta"):
            ledger.append(other_delta, accountant="rdp")
        ledger.append(release(0, unit="speaker"), accountant="prv")  # another unit is another account
    assert len(read_rows(tmp_path)) == 2


def test_shared_batch_release_records_its_components(tmp_path):
    gan = Release.shared_batch(
        run_id="run-1",
        round=0,
        client_id="alice",
        stage="s2",
        unit="utterance",
        sample_rate=0.05,
        steps=20,
        delta=DELTA,
        components=(Component("generator", 1.5, 1.0), Component("discriminator", 2.0, 0.5)),
    )
    with Ledger(tmp_path) as ledger:
        row = ledger.append(gan, accountant="rdp")
    assert row.mechanism == POISSON_GAUSSIAN_SHARED_BATCH
    assert row.noise_multiplier == pytest.approx(1.2)
    assert row.clip_norm is None
    assert json.loads(row.components) == [
        {"name": "generator", "noise_multiplier": 1.5, "clip_norm": 1.0},
        {"name": "discriminator", "noise_multiplier": 2.0, "clip_norm": 0.5},
    ]
    assert row.epsilon == epsilon([Mechanism(1.2, 0.05, 20)], DELTA, "rdp")


@pytest.mark.parametrize(
    "change,match",
    [
        ({"unit": "voice"}, "unit"),
        ({"client_id": ""}, "client_id"),
        ({"round": -1}, "round"),
        ({"delta": 0.0}, "delta"),
        ({"clip_norm": None}, "clip_norm"),
        ({"components": (Component("generator", 1.0, 1.0),)}, "components"),
    ],
)
def test_invalid_releases_are_refused(change, match):
    fields = {
        "run_id": "r",
        "round": 0,
        "client_id": "c",
        "stage": "s1",
        "unit": "utterance",
        "mechanism": Mechanism(1.0, 0.1, 1),
        "delta": DELTA,
        "clip_norm": 1.0,
    }
    with pytest.raises(ConfigError, match=match):
        Release(**{**fields, **change})


def test_a_foreign_database_is_not_taken_for_a_ledger(tmp_path):
    con = sqlite3.connect(tmp_path / LEDGER_FILENAME)
    con.execute("CREATE TABLE releases (id INTEGER, what TEXT)")
    con.commit()
    con.close()
    with pytest.raises(LedgerIntegrityError, match="not a fedvox privacy ledger"):
        Ledger(tmp_path)
    (tmp_path / "junk.sqlite").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(LedgerIntegrityError):
        read_rows(tmp_path / "junk.sqlite")


def _append_rounds(folder: Path, client: str, rounds: list[int]) -> None:
    """A writer process: knows nothing but the ledger folder (no accountant memo either)."""
    _epsilon.cache_clear()
    with Ledger(folder) as ledger:
        for r in rounds:
            ledger.append(release(r, client, noise=1.0 + r / 10))


def _run(processes: list[multiprocessing.Process]) -> None:
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
        assert process.exitcode == 0


# Real processes, forked so they start without re-importing torch (seconds each on 2 cores).
_FORK = multiprocessing.get_context("fork")


def test_three_processes_record_what_one_process_records(tmp_path):
    for r in range(3):
        _run([_FORK.Process(target=_append_rounds, args=(tmp_path / "three", "alice", [r]))])
    _epsilon.cache_clear()
    with Ledger(tmp_path / "one") as ledger:
        single = [ledger.append(release(r, noise=1.0 + r / 10)).epsilon for r in range(3)]
    assert [row.epsilon for row in read_rows(tmp_path / "three")] == single


def test_concurrent_writers_keep_one_intact_chain(tmp_path):
    with Ledger(tmp_path):
        pass  # create the schema once, so the writers race only on appends
    _run([_FORK.Process(target=_append_rounds, args=(tmp_path, client, [0, 1, 2])) for client in "abcd"])
    rows = read_rows(tmp_path)
    assert [row.id for row in rows] == list(range(1, 13))
    assert {(row.client_id, row.round) for row in rows} == {(c, r) for c in "abcd" for r in range(3)}
    assert verify_integrity(str(tmp_path), rows, read_triggers(tmp_path)) == []
    alice_like = [row.epsilon for row in rows if row.client_id == "a"]
    assert all(row.epsilon in alice_like for row in rows)  # same mechanisms, same epsilons
