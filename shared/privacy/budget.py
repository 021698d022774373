"""Per-client epsilon budgets: refuse a round *before* it would overspend.

A budget caps the cumulative epsilon of one client and one privacy unit at the ledger's delta.
The check is made twice: before training (so no compute is wasted) and again inside the ledger's
write transaction (so two processes cannot both pass the check and together overspend). A
refused round is never trained or released, and charges nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from fedvox.shared.errors import BudgetExceededError, ConfigError, PrivacyError
from fedvox.shared.privacy.accounting import DEFAULT_ACCOUNTANT, Mechanism, calibrate_noise_multiplier, epsilon


@dataclass(frozen=True)
class Budget:
    """The most epsilon one client may spend on one privacy unit (at the ledger's delta)."""

    epsilon: float

    def __post_init__(self) -> None:
        if not (self.epsilon > 0 and not math.isnan(self.epsilon)):
            raise ConfigError(f"a privacy budget must be an epsilon > 0, got {self.epsilon}")

    def check(
        self,
        history: Sequence[Mechanism],
        planned: Mechanism,
        *,
        delta: float,
        accountant: str = DEFAULT_ACCOUNTANT,
        subject: str = "this client",
    ) -> float:
        """The cumulative epsilon after ``planned``; raises :class:`BudgetExceededError` if it
        would exceed the budget, saying what was spent, what the round would cost and what to
        change."""
        after = epsilon((*history, planned), delta, accountant)
        if after <= self.epsilon:
            return after
        spent = epsilon(history, delta, accountant)
        raise BudgetExceededError(
            f"{subject}: the planned round ({planned.steps} steps, noise_multiplier "
            f"{planned.noise_multiplier:g}, sample_rate {planned.sample_rate:g}) would take epsilon "
            f"from {spent:.3f} to {after:.3f} at delta={delta:g} ({accountant}), past the budget "
            f"{self.epsilon:g}; nothing was trained or charged. "
            + self._advice(history, planned, spent, delta, accountant)
        )

    def _advice(
        self, history: Sequence[Mechanism], planned: Mechanism, spent: float, delta: float, accountant: str
    ) -> str:
        if spent >= self.epsilon:
            return (
                "The budget is used up: this client cannot train on this data again unless its owner raises the budget."
            )
        steps = _max_steps(self.epsilon, history, planned, delta, accountant)
        try:
            sigma = calibrate_noise_multiplier(
                self.epsilon,
                delta,
                sample_rate=planned.sample_rate,
                steps=planned.steps,
                history=history,
                accountant=accountant,
            )
        except PrivacyError:
            return f"To fit, run at most {steps} steps at this noise."
        return (
            f"To fit, raise noise_multiplier to at least {sigma:.3f}, or run at most {steps} "
            f"steps at this noise; {self.epsilon - spent:.3f} epsilon remains."
        )


def _max_steps(budget: float, history: Sequence[Mechanism], planned: Mechanism, delta: float, accountant: str) -> int:
    """Most steps of ``planned``'s noise and sample rate that still fit (bisection)."""
    lo, hi = 0, planned.steps  # fits(lo) holds; fits(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        mechanism = Mechanism(planned.noise_multiplier, planned.sample_rate, mid)
        if epsilon((*history, mechanism), delta, accountant) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


__all__ = ["Budget"]
