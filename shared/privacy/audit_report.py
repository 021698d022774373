"""What ``fedvox-audit`` prints: the per-account table, the findings, and what epsilon means."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from fedvox.shared.privacy.audit import Account, LedgerAudit, LedgerFinding, posterior_bound

TIERS = ((1.0, "strong"), (10.0, "reasonable"))
"""Common reading of epsilon (Ponomareva et al., "How to DP-fy ML", 2023); above 10 is weak."""

PROTECTS = {
    "utterance": (
        "Utterance level (DP-SGD on each device): epsilon bounds how much any single recording "
        "can change what that device sent to the server. It does NOT hide the speaker's voice: "
        "every recording carries it, so the model still learns to sound like the speaker."
    ),
    "speaker": (
        "Speaker level (DP-FedAvg on the server): epsilon bounds how much everything one speaker "
        "contributed can change the global model, so it hides whether a speaker took part at "
        "all. It trusts the server to clip and add the noise (the server sees each update), and "
        "it only leaves a useful model with many speakers per round."
    ),
}


def tier(epsilon: float) -> str:
    for bound, name in TIERS:
        if epsilon <= bound:
            return name
    return "weak"


def explain(unit: str, epsilon: float, delta: float) -> str:
    """Plain words for one unit, with the largest epsilon spent at it as the example."""
    sure = posterior_bound(epsilon)
    return (
        f"{PROTECTS[unit]} Here the largest epsilon is {format_epsilon(epsilon)} at delta={delta:g} "
        f"({tier(epsilon)}): someone who thought it 50/50 that a given {unit}'s data was used can "
        f"become at most {100 * sure:.4g}% sure, except with probability about delta."
    )


TIER_NOTE = (
    "Common tiers: epsilon <= 1 strong, <= 10 reasonable, above 10 weak. Delta is the small "
    "chance the guarantee may fail outright; keep it well below 1/(number of recordings or "
    "speakers)."
)


def render(audits: Sequence[LedgerAudit], console: Console) -> None:
    """A table per ledger, then the findings, then what each unit's epsilon protects."""
    for audit in audits:
        console.print(_table(audit))
        console.print(f"{audit.rows} rows, head hash {audit.head}", highlight=False)
    accounts = [account for audit in audits for account in audit.accounts]
    if any(account.delta != account.recorded_delta for account in accounts):
        console.print(
            "PLD and RDP columns are at the audit's --delta; recorded epsilons were checked at their own delta."
        )
    findings = [finding for audit in audits for finding in audit.all_findings]
    for finding in findings:
        console.print(f"[bold red]{finding.kind}[/] {_where(finding)}: {finding.message}", highlight=False)
    console.print()
    for unit in PROTECTS:
        spent = [a for a in accounts if a.unit == unit]
        if spent:
            worst = max(spent, key=lambda a: a.recorded)
            console.print(explain(unit, worst.recorded, worst.recorded_delta), highlight=False)
    console.print(TIER_NOTE, highlight=False)
    if findings:
        console.print(f"[bold red]audit FAILED[/]: {len(findings)} finding(s)")
    else:
        console.print(f"[bold green]audit passed[/]: {len(accounts)} account(s) in {len(audits)} ledger(s)")


def _table(audit: LedgerAudit) -> Table:
    table = Table(title=f"privacy ledger {audit.path}", box=box.SIMPLE_HEAD, header_style="bold")
    for column in (
        "client",
        "unit",
        "releases",
        "steps",
        "noise",
        "sample rate",
        "delta",
        "recorded ε",
        "PLD ε",
        "RDP ε",
        "budget",
        "remaining",
        "status",
    ):
        table.add_column(column, justify="left" if column in ("client", "unit", "status") else "right")
    for account in audit.accounts:
        rows = account.rows
        table.add_row(
            account.client_id,
            account.unit,
            str(len(rows)),
            str(sum(row.steps for row in rows)),
            _span([row.noise_multiplier for row in rows]),
            _span([row.sample_rate for row in rows]),
            f"{account.delta:g}",
            f"{format_epsilon(account.recorded)} {account.accountant}",
            format_epsilon(account.pld[-1]) if account.pld else "-",
            format_epsilon(account.rdp[-1]) if account.rdp else "-",
            "-" if account.budget is None else f"{account.budget:g}",
            "-" if account.remaining is None else format_epsilon(account.remaining),
            "[green]ok[/]" if account.status == "ok" else f"[bold red]{account.status}[/]",
        )
    return table


def to_json(audits: Sequence[LedgerAudit], *, delta: float | None, tolerance: float) -> dict[str, Any]:
    """Machine-readable audit; non-finite numbers are written as the string ``"inf"``."""
    findings = [finding for audit in audits for finding in audit.all_findings]
    return json_safe(
        {
            "ok": not findings,
            "delta": delta,
            "tolerance": tolerance,
            "ledgers": [
                {"path": a.path, "rows": a.rows, "head": a.head, "findings": [_finding(f) for f in a.findings]}
                for a in audits
            ],
            "accounts": [_account(account) for audit in audits for account in audit.accounts],
            "findings": [_finding(f) for f in findings],
        }
    )


def _account(account: Account) -> dict[str, Any]:
    return {
        "ledger": account.ledger,
        "client_id": account.client_id,
        "unit": account.unit,
        "releases": len(account.rows),
        "steps": sum(row.steps for row in account.rows),
        "noise_multiplier": [row.noise_multiplier for row in account.rows],
        "sample_rate": [row.sample_rate for row in account.rows],
        "rounds": [row.round for row in account.rows],
        "accountant": account.accountant,
        "recorded_delta": account.recorded_delta,
        "delta": account.delta,
        "recorded_epsilon": [row.epsilon for row in account.rows],
        "pld_epsilon": account.pld,
        "rdp_epsilon": account.rdp,
        "opacus_epsilon": account.opacus,
        "budget": account.budget,
        "remaining": account.remaining,
        "tier": tier(account.recorded),
        "posterior_bound": posterior_bound(account.recorded),
        "status": account.status,
        "findings": [_finding(f) for f in account.findings],
    }


def _finding(finding: LedgerFinding) -> dict[str, Any]:
    return {
        "kind": finding.kind,
        "ledger": finding.ledger,
        "client_id": finding.client_id,
        "unit": finding.unit,
        "row_id": finding.row_id,
        "message": finding.message,
    }


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as strings: JSON has no inf or nan."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "-inf" if value < 0 else "nan"
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def format_epsilon(value: float) -> str:
    """Epsilon as people read it: three decimals, or ``inf`` where nothing is certified."""
    return "inf" if math.isinf(value) else f"{value:.3f}"


def _span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.4g}" if lo == hi else f"{lo:.4g}–{hi:.4g}"


def _where(finding: LedgerFinding) -> str:
    where = [finding.ledger]
    if finding.client_id is not None:
        where.append(f"client {finding.client_id}")
    if finding.unit is not None:
        where.append(finding.unit)
    if finding.row_id is not None:
        where.append(f"row {finding.row_id}")
    return ", ".join(where)


__all__ = ["PROTECTS", "TIER_NOTE", "explain", "format_epsilon", "json_safe", "render", "tier", "to_json"]
