"""Shared pieces of the privacy and audit tests: known releases, a closed form, and tampering
behind the ledger's triggers."""

from __future__ import annotations

import math
import sqlite3
from dataclasses import replace
from pathlib import Path

from scipy import optimize, stats

from fedvox.shared.privacy.accounting import Mechanism
from fedvox.shared.privacy.ledger import COLUMNS, GENESIS_HASH, LEDGER_FILENAME, LedgerRow, Release

DELTA = 1e-5


def release(
    round: int,
    client_id: str = "alice",
    *,
    noise: float = 1.0,
    sample_rate: float = 0.05,
    steps: int = 20,
    unit: str = "utterance",
    stage: str = "s1",
    run_id: str = "run-1",
) -> Release:
    """A plain DP-SGD round of ``steps`` at ``noise`` and ``sample_rate`` (clip norm 1)."""
    return Release(run_id, round, client_id, stage, unit, Mechanism(noise, sample_rate, steps), DELTA, clip_norm=1.0)


def gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact epsilon of one Gaussian mechanism with sensitivity 1 (Balle and Wang 2018)."""

    def delta_at(eps: float) -> float:
        return stats.norm.cdf(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * stats.norm.cdf(
            -1 / (2 * sigma) - eps * sigma
        )

    return optimize.brentq(lambda eps: delta_at(eps) - delta, 0, 100, xtol=1e-12)


def tamper(folder: Path, *statements: str, keep_triggers: bool = True, rehash: bool = False) -> None:
    """Edit the ledger the way someone with file access would: drop the append-only triggers,
    run ``statements``, optionally recompute the whole hash chain so every row looks
    self-consistent, and (by default) put the triggers back."""
    con = sqlite3.connect(folder / LEDGER_FILENAME)
    triggers = con.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'").fetchall()
    for name, _ in triggers:
        con.execute(f"DROP TRIGGER {name}")
    for statement in statements:
        con.execute(statement)
    if rehash:
        previous = GENESIS_HASH
        for values in con.execute(f"SELECT {', '.join(COLUMNS)} FROM releases ORDER BY id").fetchall():
            row = replace(LedgerRow(*values), prev_hash=previous)
            previous = row.compute_hash()
            con.execute(
                "UPDATE releases SET prev_hash = ?, row_hash = ? WHERE id = ?", (row.prev_hash, previous, row.id)
            )
    if keep_triggers:
        for _, sql in triggers:
            con.execute(sql)
    con.commit()
    con.close()
