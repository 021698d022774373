"""PNG plots of epsilon over rounds, one per client and unit, with the budget drawn."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedvox.shared.atomic import atomic_path
from fedvox.shared.privacy.audit import Account


def plot_accounts(accounts: Sequence[Account], folder: Path) -> list[Path]:
    """Write ``epsilon_<unit>_<client>.png`` for every account into ``folder``; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for account in accounts:
        stem = f"epsilon_{account.unit}_{re.sub(r'[^A-Za-z0-9_.-]', '_', account.client_id)}"
        path = folder / f"{stem}.png"
        n = 2
        while path in written:  # the same client and unit in two ledgers
            path, n = folder / f"{stem}_{n}.png", n + 1
        _plot(account, path)
        written.append(path)
    return written


def _plot(account: Account, path: Path) -> None:
    rounds = [row.round for row in account.rows]
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")  # Agg canvas, no pyplot global state
    ax = fig.subplots()
    ax.plot(rounds, [row.epsilon for row in account.rows], "o-", label=f"recorded ({account.accountant})")
    if account.pld:
        n = len(account.pld)
        ax.plot(rounds[:n], account.pld, "--", label="dp-accounting PLD")
        ax.plot(rounds[:n], account.rdp, ":", label="dp-accounting RDP")
    if account.budget is not None:
        ax.axhline(account.budget, color="tab:red", linestyle="-.", label=f"budget {account.budget:g}")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(f"cumulative epsilon (delta={account.delta:g})")
    ax.set_title(f"client {account.client_id}: {account.unit}-level epsilon")
    ax.grid(alpha=0.3)
    ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


__all__ = ["plot_accounts"]
