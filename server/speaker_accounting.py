"""Speaker-level accounting: what DP-FedAvg has cost each speaker, kept in the privacy ledger.

Each round with speaker-level DP is one Gaussian release (noise multiplier ``z``) on a Poisson
sample of clients with rate ``q = clients_per_round / population``: in the ledger's terms a
``Mechanism(z, q, steps=1)`` at ``unit = "speaker"``. Every speaker who *could* have been
sampled (an eligible client) is charged, whether or not the coin picked it; a client that was not
eligible had inclusion probability 0 and is not charged. The population and rate are fixed when
the run first selects clients and kept in its checkpoints: accounting with a rate above the real
one (clients joining later) only over-estimates epsilon.

The ledger is the accountant's state (:mod:`shared.privacy.ledger`). A release is keyed by the
run *and the server attempt* that made it (``run_id/attempt``): a round redone by a restarted
server is a new release with new noise and is charged again, while catching up the rows of a
round already committed (same attempt) gets the existing rows back and charges nothing twice.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedvox.shared.errors import PrivacyError
from fedvox.shared.privacy.accounting import Mechanism, epsilon
from fedvox.shared.privacy.budget import Budget
from fedvox.shared.privacy.ledger import Ledger, Release
from fedvox.shared.runconfig import SpeakerDP

UNIT = "speaker"


class SpeakerAccounting:
    """Per-speaker cumulative epsilon of one run's DP-FedAvg rounds, recorded in ``ledger``."""

    def __init__(self, ledger: Ledger, run_id: str, stage: str, dp: SpeakerDP) -> None:
        self.ledger = ledger
        self.run_id = run_id
        self.stage = stage
        self.dp = dp
        self.budget = Budget(dp.budget_epsilon) if dp.budget_epsilon > 0 else None
        self.sample_rate: float | None = None  # fixed by the strategy at the run's first selection

    @property
    def mechanism(self) -> Mechanism:
        if self.sample_rate is None:
            raise PrivacyError("speaker-level accounting used before the run's sample rate was fixed")
        return Mechanism(self.dp.noise_multiplier, self.sample_rate, steps=1)

    def epsilon_after_round(self, client_id: str) -> float:
        """The speaker's epsilon if it is charged one more round."""
        history = self.ledger.history(client_id, UNIT)
        return epsilon((*history, self.mechanism), self.dp.delta)

    def can_afford_round(self, client_id: str) -> bool:
        return self.budget is None or self.epsilon_after_round(client_id) <= self.budget.epsilon

    def charge(self, server_round: int, client_ids: Iterable[str], attempt: str) -> dict[str, float]:
        """Record the release that server ``attempt`` made in round ``server_round`` for every
        client in ``client_ids``; returns their epsilons.

        Idempotent per ``(run/attempt, round, client)``, so catching up after a crash charges
        nothing twice; another attempt at the same round is another release, charged.
        """
        return {
            client_id: self.ledger.append(
                Release(
                    run_id=f"{self.run_id}/{attempt}",
                    round=server_round,
                    client_id=client_id,
                    stage=self.stage,
                    unit=UNIT,
                    mechanism=self.mechanism,
                    delta=self.dp.delta,
                    clip_norm=self.dp.clip_norm,
                ),
                budget=self.budget,
            ).epsilon
            for client_id in client_ids
        }


__all__ = ["UNIT", "SpeakerAccounting"]
