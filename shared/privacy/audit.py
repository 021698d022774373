"""Audit maths: check a ledger without trusting the code that wrote it.

Three questions per ledger:

1. Integrity: is it well formed and append-only? Ids run 1, 2, 3... without gaps, times never
   go back, every row's hash matches its content and the previous row's hash, epsilon never falls
   for a client and unit, and the append-only triggers are still there.
2. Arithmetic: is every recorded epsilon at least what an independent accountant computes from
   the recorded mechanisms? Google's dp-accounting (PLD and RDP, a separate code base from
   Opacus) recomputes each client's and unit's cumulative epsilon row by row; the writer's own
   Opacus accountant recomputes the last row.
3. Budget: did any client and unit go past its budget?
4. Given the signed heads a server recorded (:mod:`shared.privacy.ledger_head`): does the ledger
   still hold every row its device had signed for? The chain alone cannot show a rewrite of the
   whole chain by someone with file access; the heads kept elsewhere can.

Plus the one-run empirical bound of Steinke, Nasr and Jagielski (2023), which turns canary
guesses into an epsilon lower bound (the canary audit itself runs a training and lives with the
trainer).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np

from fedvox.shared.errors import ConfigError
from fedvox.shared.privacy.accounting import ACCOUNTANTS, epsilon, shared_batch_noise_multiplier
from fedvox.shared.privacy.ledger import (
    GENESIS_HASH,
    MECHANISMS,
    POISSON_GAUSSIAN_SHARED_BATCH,
    TRIGGERS,
    UNITS,
    LedgerRow,
    ledger_file,
    read_rows,
    read_triggers,
)
from fedvox.shared.privacy.ledger_head import SignedHead, check_heads

if TYPE_CHECKING:  # dp-accounting takes ~3 s to import: loaded on first recomputation
    import dp_accounting

INTEGRITY = "integrity"
UNDER_REPORTED = "under_reported"
BUDGET_OVERRUN = "budget_overrun"
UNACCOUNTABLE = "unaccountable"
SIGNED_HEAD = "signed_head"

DEFAULT_TOLERANCE = 0.01
"""Recorded epsilon may sit this far below the independent one: relative for epsilon >= 1,
absolute below. Legitimate ledgers sit *above* it (Opacus PRV is 0.005-0.016 above PLD, RDP is
looser still); the slack only absorbs discretisation."""

PLD_DISCRETISATION = 1e-3
"""dp-accounting PLD grid: pessimistic (an upper bound) and within 0.003 of the 1e-4 grid on
5000-step histories at 1/8 of the time (docs/privacy.md)."""


@dataclass(frozen=True)
class LedgerFinding:
    """One thing the audit flags; any finding makes the audit fail."""

    kind: str
    ledger: str
    message: str
    client_id: str | None = None
    unit: str | None = None
    row_id: int | None = None


@dataclass
class Account:
    """One client at one privacy unit in one ledger, recorded and recomputed row by row."""

    ledger: str
    client_id: str
    unit: str
    rows: list[LedgerRow]
    delta: float
    """The delta the recomputed columns are at (the audit's, or else the recorded one)."""
    budget: float | None
    pld: list[float] = field(default_factory=list)
    rdp: list[float] = field(default_factory=list)
    opacus: float | None = None
    """The writer's own accountant on the whole history, at the audit delta."""
    findings: list[LedgerFinding] = field(default_factory=list)

    @property
    def recorded(self) -> float:
        return self.rows[-1].epsilon

    @property
    def accountant(self) -> str:
        return self.rows[-1].accountant

    @property
    def recorded_delta(self) -> float:
        return self.rows[-1].delta

    @property
    def remaining(self) -> float | None:
        return None if self.budget is None else self.budget - self.recorded

    @property
    def status(self) -> str:
        return ", ".join(sorted({f.kind for f in self.findings})) or "ok"


@dataclass
class LedgerAudit:
    """The audit of one ledger file."""

    path: str
    rows: int
    head: str
    """Hash of the last row: compare with a copy kept elsewhere to detect a truncated tail."""
    findings: list[LedgerFinding]
    accounts: list[Account]

    @property
    def all_findings(self) -> list[LedgerFinding]:
        return self.findings + [f for account in self.accounts for f in account.findings]


# ---------------------------------------------------------------------- integrity
def verify_integrity(path: str, rows: Sequence[LedgerRow], triggers: set[str]) -> list[LedgerFinding]:
    """Structural findings: triggers, ids, times, hash chain, per-account monotonicity."""
    findings: list[LedgerFinding] = []

    def flag(message: str, row: LedgerRow | None = None) -> None:
        findings.append(
            LedgerFinding(
                INTEGRITY,
                path,
                message,
                row.client_id if row else None,
                row.unit if row else None,
                row.id if row else None,
            )
        )

    for name in TRIGGERS:
        if name not in triggers:
            flag(f"append-only trigger {name} is missing: someone removed it, rows may have been edited")
    previous: LedgerRow | None = None
    last_epsilon: dict[tuple[str, str], LedgerRow] = {}
    keys: set[tuple[str, int, str, str, str]] = set()
    for row in rows:
        expected_id = previous.id + 1 if previous else 1
        if row.id != expected_id:
            flag(f"row id {row.id} follows {expected_id - 1}: rows {expected_id}..{row.id - 1} are missing", row)
        if not _is_timestamp(row.created_at):
            flag(f"created_at {row.created_at!r} is not an ISO 8601 time", row)
        elif previous and row.created_at < previous.created_at:
            flag(f"created_at {row.created_at} is earlier than row {previous.id}'s {previous.created_at}", row)
        expected_prev = previous.row_hash if previous else GENESIS_HASH
        if row.prev_hash != expected_prev:
            flag("hash chain broken: prev_hash does not match the previous row (a row was removed or reordered)", row)
        if row.row_hash != row.compute_hash():
            flag("row_hash does not match the row's content: the row was edited after it was written", row)
        key = (row.run_id, row.round, row.client_id, row.stage, row.unit)
        if key in keys:
            flag(f"release {key} is charged twice", row)
        keys.add(key)
        earlier = last_epsilon.get((row.client_id, row.unit))
        if earlier and row.epsilon < earlier.epsilon:
            flag(f"cumulative epsilon fell from {earlier.epsilon:.4f} (row {earlier.id}) to {row.epsilon:.4f}", row)
        last_epsilon[(row.client_id, row.unit)] = row
        previous = row
    return findings


def _is_timestamp(value: object) -> bool:
    try:
        datetime.fromisoformat(str(value))
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------- recomputation
def dp_events(row: LedgerRow) -> tuple[dp_accounting.DpEvent, dp_accounting.DpEvent]:
    """The row's mechanism as dp-accounting events ``(for RDP, for PLD)``, from its fields alone.

    For RDP a shared-batch row is a Poisson-sampled *composition* of its components' Gaussians,
    so dp-accounting applies its own effective-noise rule; its PLD accountant only takes a single
    Gaussian, so it gets the recorded effective noise, which must agree with the components.
    Raises :class:`ConfigError` for anything that cannot be accounted.
    """
    import dp_accounting

    if row.mechanism not in MECHANISMS:
        raise ConfigError(f"unknown mechanism {row.mechanism!r} (known: {', '.join(MECHANISMS)})")
    mechanism = row.to_mechanism()
    if row.unit not in UNITS:
        raise ConfigError(f"unknown privacy unit {row.unit!r}")
    if row.accountant not in ACCOUNTANTS:
        raise ConfigError(f"unknown accountant {row.accountant!r}")
    if not 0 < row.delta < 1:
        raise ConfigError(f"delta {row.delta} is not in (0, 1)")
    single: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(mechanism.noise_multiplier)
    joint = single
    if row.mechanism == POISSON_GAUSSIAN_SHARED_BATCH:
        sigmas = _component_noise(row.components)
        if not math.isclose(shared_batch_noise_multiplier(sigmas), mechanism.noise_multiplier, rel_tol=1e-9):
            raise ConfigError(
                f"noise_multiplier {mechanism.noise_multiplier} is not the effective noise of its components {sigmas}"
            )
        joint = dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(s) for s in sigmas])
    elif row.clip_norm is None or not row.clip_norm > 0:
        raise ConfigError(f"clip_norm {row.clip_norm} is not > 0")
    return tuple(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(mechanism.sample_rate, g), mechanism.steps
        )
        for g in (joint, single)
    )


def _component_noise(components: str) -> list[float]:
    try:
        parsed = json.loads(components)
        sigmas = [float(c["noise_multiplier"]) for c in parsed]
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"components {components!r} are not a list of noise multipliers") from exc
    if not sigmas or any(not (math.isfinite(s) and s >= 0) for s in sigmas):
        raise ConfigError(f"components {components!r} need finite noise multipliers >= 0")
    return sigmas


@dataclass(frozen=True)
class Implied:
    """What an account's recorded mechanisms imply, whatever epsilons were recorded."""

    reference: tuple[float, ...]
    """Per row: min(PLD, RDP) of dp-accounting at the recorded delta."""
    pld: tuple[float, ...]
    """Per row: dp-accounting PLD at the audit delta."""
    rdp: tuple[float, ...]
    """Per row: dp-accounting RDP at the audit delta."""
    opacus: float | None
    """The writer's Opacus accountant on the whole history, at the audit delta."""
    writer: float | None
    """The same at the recorded delta."""
    unaccountable: tuple[int, str] | None
    """(row index, reason) of the first row that cannot be accounted; nothing after it is."""


def implied(rows: Sequence[LedgerRow], delta: float) -> Implied:
    """Recompute an account's epsilons row by row from its mechanisms alone."""
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETISATION)
    rdp = rdp_privacy_accountant.RdpAccountant()
    reference: list[float] = []
    at_delta: tuple[list[float], list[float]] = ([], [])
    for index, row in enumerate(rows):
        try:
            rdp_event, pld_event = dp_events(row)
        except ConfigError as exc:
            return Implied(tuple(reference), tuple(at_delta[0]), tuple(at_delta[1]), None, None, (index, str(exc)))
        rdp.compose(rdp_event)
        pld.compose(pld_event)
        reference.append(min(_epsilon_of(pld, row.delta), _epsilon_of(rdp, row.delta)))
        at_delta[0].append(_epsilon_of(pld, delta))
        at_delta[1].append(_epsilon_of(rdp, delta))
    history = [row.to_mechanism() for row in rows]
    last = rows[-1]
    opacus = epsilon(history, delta, last.accountant)
    writer = opacus if delta == last.delta else epsilon(history, last.delta, last.accountant)
    return Implied(tuple(reference), tuple(at_delta[0]), tuple(at_delta[1]), opacus, writer, None)


def recompute(
    account: Account, tolerance: float = DEFAULT_TOLERANCE, cache: dict[tuple, Implied] | None = None
) -> None:
    """Fill ``account``'s recomputed columns and flag under-reporting and budget overruns.

    Each row's recorded epsilon (at the recorded delta) must reach min(PLD, RDP) of
    dp-accounting at that delta: both are upper bounds on the true epsilon and PLD is tight, so a
    recorded value below them under-states what was spent. The last row must also reach what the
    writer's own Opacus accountant gives for the recorded history. ``cache`` shares the
    recomputation between accounts with identical histories (a server charges every eligible
    speaker the same round).
    """
    cache = {} if cache is None else cache
    key = (account.delta, *(_accounted_fields(row) for row in account.rows))
    if key not in cache:
        cache[key] = implied(account.rows, account.delta)
    result = cache[key]
    account.pld, account.rdp, account.opacus = list(result.pld), list(result.rdp), result.opacus
    # Recomputation stops at an unaccountable row: only the rows before it have a reference.
    for row, reference in zip(account.rows, result.reference, strict=False):
        if row.epsilon < reference - _slack(reference, tolerance):
            account.findings.append(
                _finding(
                    UNDER_REPORTED,
                    account,
                    row,
                    f"row {row.id} records epsilon {row.epsilon:.4f}, below the independent "
                    f"recomputation {reference:.4f} (dp-accounting, delta {row.delta:g})",
                )
            )
    if result.unaccountable is not None:
        index, reason = result.unaccountable
        row = account.rows[index]
        account.findings.append(_finding(UNACCOUNTABLE, account, row, f"cannot account row {row.id}: {reason}"))
        return
    last = account.rows[-1]
    assert result.writer is not None  # every row was accountable
    if last.epsilon < result.writer - _slack(result.writer, tolerance):
        account.findings.append(
            _finding(
                UNDER_REPORTED,
                account,
                last,
                f"row {last.id} records epsilon {last.epsilon:.4f}; Opacus {last.accountant} gives "
                f"{result.writer:.4f} for the recorded history",
            )
        )
    spent = max(last.epsilon, result.reference[-1])
    if account.budget is not None and spent > account.budget:
        account.findings.append(
            _finding(BUDGET_OVERRUN, account, last, f"epsilon {spent:.4f} exceeds the budget {account.budget:g}")
        )


def _accounted_fields(row: LedgerRow) -> tuple:
    """The fields that determine a row's epsilon (not its id, time, hashes or recorded epsilon)."""
    return (
        row.mechanism,
        row.noise_multiplier,
        row.sample_rate,
        row.steps,
        row.clip_norm,
        row.components,
        row.unit,
        row.accountant,
        row.delta,
    )


def _finding(kind: str, account: Account, row: LedgerRow, message: str) -> LedgerFinding:
    return LedgerFinding(kind, account.ledger, message, row.client_id, row.unit, row.id)


def _epsilon_of(accountant: dp_accounting.PrivacyAccountant, delta: float) -> float:
    value = float(accountant.get_epsilon(delta))
    return value if math.isfinite(value) else math.inf


def _slack(reference: float, tolerance: float) -> float:
    return tolerance * max(1.0, reference) if math.isfinite(reference) else 0.0


# ---------------------------------------------------------------------- whole ledgers
def audit_ledger(
    path: str | os.PathLike[str],
    *,
    delta: float | None = None,
    budget: float | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    on_account: Callable[[Account], None] | None = None,
    heads: Sequence[SignedHead] = (),
) -> LedgerAudit:
    """Audit one ledger: integrity, then every client and unit recomputed and budget-checked.

    ``delta`` recomputes at another delta than the recorded one (recorded epsilons are still
    checked at their own delta); ``budget`` overrides the budgets recorded in the rows;
    ``heads`` are signed heads of this ledger that someone else kept (a server's record).
    """
    if delta is not None and not 0 < delta < 1:
        raise ConfigError(f"--delta must be in (0, 1), got {delta}")
    if budget is not None and not budget > 0:
        raise ConfigError(f"--budget must be > 0, got {budget}")
    file = ledger_file(path)
    rows = read_rows(file)
    name = str(file)
    findings = verify_integrity(name, rows, read_triggers(file))
    findings += [LedgerFinding(SIGNED_HEAD, name, message) for message in check_heads(rows, heads)]
    groups: dict[tuple[str, str], list[LedgerRow]] = {}
    for row in rows:
        groups.setdefault((row.client_id, row.unit), []).append(row)
    accounts = []
    cache: dict[tuple, Implied] = {}
    for (client_id, unit), group in sorted(groups.items()):
        recorded_budgets = [row.budget_epsilon for row in group if row.budget_epsilon is not None]
        account = Account(
            ledger=name,
            client_id=client_id,
            unit=unit,
            rows=group,
            delta=delta if delta is not None else group[-1].delta,
            budget=budget if budget is not None else (recorded_budgets[-1] if recorded_budgets else None),
        )
        if len({(row.delta, row.accountant) for row in group}) > 1:
            findings.append(
                LedgerFinding(
                    INTEGRITY, name, "rows mix deltas or accountants for one client and unit", client_id, unit
                )
            )
        recompute(account, tolerance, cache)
        accounts.append(account)
        if on_account:
            on_account(account)
    head = rows[-1].row_hash if rows else GENESIS_HASH
    return LedgerAudit(name, len(rows), head, findings, accounts)


def posterior_bound(epsilon: float, prior: float = 0.5) -> float:
    """How sure an attacker can become that a record was used, from ``prior`` (ignoring delta).

    An (epsilon, 0)-DP release multiplies the odds of any hypothesis about one record by at most
    e^epsilon: the plainest reading of what an epsilon protects.
    """
    if math.isinf(epsilon):
        return 1.0
    odds = prior / (1 - prior) * math.exp(min(epsilon, 700.0))
    return odds / (1 + odds)


# ---------------------------------------------------------------------- one-run audit bound
def one_run_p_value(guesses: int, correct: int, epsilon: float, *, canaries: int, delta: float = 0.0) -> float:
    """P-value of ``correct`` right guesses out of ``guesses`` if the training were (eps, delta)-DP.

    Steinke, Nasr, Jagielski (2023), Theorem 3.1: ``P[Binomial(r, e^eps/(1+e^eps)) >= v]`` plus,
    for delta > 0, ``2 m delta max_i P[v-i <= Binomial(r, p) < v] / i`` with m canaries.
    """
    from scipy import stats  # 2 s of imports: only the canary audit pays them, not `fedvox-audit --help`

    if not 0 <= correct <= guesses <= canaries:
        raise ConfigError(f"need 0 <= correct ({correct}) <= guesses ({guesses}) <= canaries ({canaries})")
    p = 1 / (1 + math.exp(-epsilon))
    tail = float(stats.binom.sf(correct - 1, guesses, p))
    if delta == 0 or correct == 0:
        return min(tail, 1.0)
    below = stats.binom.pmf(np.arange(correct - 1, -1, -1), guesses, p)  # k = v-1, v-2, ..., 0
    spread = float(np.max(np.cumsum(below) / np.arange(1, correct + 1)))
    return min(tail + 2 * canaries * delta * spread, 1.0)


def one_run_epsilon_lower_bound(
    guesses: int, correct: int, *, canaries: int | None = None, beta: float = 0.05, delta: float = 0.0
) -> float:
    """Largest epsilon that ``correct`` of ``guesses`` refutes at confidence ``1 - beta``.

    Any (epsilon, delta)-DP training would make that many right guesses with probability at
    most beta for every epsilon below the returned one, so the training is not that private.
    """
    canaries = guesses if canaries is None else canaries
    if not 0 < beta < 1:
        raise ConfigError(f"beta must be in (0, 1), got {beta}")
    if not 0 <= delta < 1:
        raise ConfigError(f"delta must be in [0, 1), got {delta}")

    def refuted(eps: float) -> bool:
        return one_run_p_value(guesses, correct, eps, canaries=canaries, delta=delta) <= beta

    if not refuted(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while refuted(hi):
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if refuted(mid) else (lo, mid)
    return lo


__all__ = [
    "BUDGET_OVERRUN",
    "DEFAULT_TOLERANCE",
    "INTEGRITY",
    "UNACCOUNTABLE",
    "UNDER_REPORTED",
    "Account",
    "Implied",
    "LedgerAudit",
    "LedgerFinding",
    "audit_ledger",
    "dp_events",
    "implied",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
    "posterior_bound",
    "recompute",
    "verify_integrity",
]
