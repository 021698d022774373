"""From canary scores to an epsilon lower bound (Steinke, Nasr and Jagielski 2023).

Rank the canaries by score, guess IN for the top ``k`` and OUT for the bottom ``k``, abstain on
the rest, and count the right guesses: under (epsilon, delta)-DP their number is dominated by a
binomial (``shared.privacy.audit.one_run_p_value``). Which ``k`` is best is not known in advance
(few confident guesses or many weaker ones), so a fixed grid of ``k`` is tried, each test at
``beta / len(grid)`` (Bonferroni), and the largest bound is reported: together the grid holds at
confidence ``1 - beta``, whatever ``k`` wins. Ties (every OUT canary scores exactly 0 without
noise) are broken at random, so a guess among equal scores is a coin flip, never a free win.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedvox.shared.errors import ConfigError
from fedvox.shared.privacy.audit import one_run_epsilon_lower_bound

GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5, 0.9)
"""Fractions of the canaries guessed (half IN, half OUT); the rest abstain. Not all of them:
about half the canaries are IN, give or take sqrt(m)/2, so guessing m/2 of each would be wrong
somewhere even for a perfect attack."""


@dataclass(frozen=True)
class Guesses:
    """``k`` IN guesses (top scores) and ``k`` OUT guesses (bottom scores)."""

    k: int
    correct: int
    epsilon: float
    """The lower bound these guesses give at the grid's per-test confidence."""

    @property
    def guesses(self) -> int:
        return 2 * self.k


@dataclass(frozen=True)
class OneRunBound:
    """The audit's epsilon lower bound and how it was reached."""

    epsilon: float
    best: Guesses
    sweep: tuple[Guesses, ...]
    cap: float
    """The bound if every guess of the largest ``k`` were right: the most these canaries can show."""
    confidence: float
    delta: float
    canaries: int


def one_run_bound(
    scores: torch.Tensor,
    member: torch.Tensor,
    *,
    delta: float,
    confidence: float = 0.95,
    generator: torch.Generator | None = None,
) -> OneRunBound:
    """Epsilon lower bound at ``confidence`` from per-canary ``scores`` (higher means IN)."""
    m = len(scores)
    if m < 2 or len(member) != m:
        raise ConfigError(f"need at least 2 canaries with one score and one membership each, got {m}")
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")
    ks = sorted({min(m // 2, max(1, round(f * m / 2))) for f in GUESS_FRACTIONS})
    beta = (1 - confidence) / len(ks)
    shuffle = torch.randperm(m, generator=generator)
    order = shuffle[torch.argsort(scores[shuffle].double(), descending=True, stable=True)]
    member = member.bool()[order]
    sweep = []
    for k in ks:
        correct = int(member[:k].sum()) + int((~member[m - k :]).sum())
        bound = one_run_epsilon_lower_bound(2 * k, correct, canaries=m, beta=beta, delta=delta)
        sweep.append(Guesses(k, correct, bound))
    best = max(sweep, key=lambda g: (g.epsilon, -g.k))
    cap = one_run_epsilon_lower_bound(2 * ks[-1], 2 * ks[-1], canaries=m, beta=beta, delta=delta)
    return OneRunBound(best.epsilon, best, tuple(sweep), cap, confidence, delta, m)
