"""Which clients train a round: only those that can afford it, sampled so accounting holds.

The server keeps the last :class:`~shared.protocol.ClientStatus` each node reported (in a query
reply or a train/evaluate reply). A node is *eligible* for a round when it is connected, has
data, and its reported cumulative epsilon after one more round stays within its own budget
(and, with speaker-level DP, within the speaker budget). Nodes the server has never heard from
are queried first; a silent node is never selected, so it is never charged.

A node that was selected but gave no usable update (an error reply such as a straggler past the
deadline, no reply, a malformed or rejected update) has *missed* the round; after ``max-misses``
misses in a row it is *benched*: no longer eligible for the rest of the run, so it is no longer
charged privacy budget for updates nobody uses. Misses are counted by client id (node ids change
when a device reconnects); a usable update resets the count; a refusal is neither.

Sampling:

- speaker-level DP: Poisson sampling, each eligible client independently with probability
  ``q = clients_per_round / population`` (``population`` = nodes connected when the run first
  selects, fixed for the run). This is the sampling the subsampled-Gaussian accountant assumes;
  the expected number of participants is ``q * eligible``.
- otherwise: ``clients_per_round`` eligible clients uniformly without replacement (all of them
  when ``clients_per_round`` is 0); the recorded rate is ``selected / eligible``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from fedvox.shared.protocol import ClientStatus


@dataclass
class ClientBook:
    """The last status every node reported, keyed by Flower node id."""

    statuses: dict[int, ClientStatus] = field(default_factory=dict)
    misses: dict[str, int] = field(default_factory=dict)
    """Rounds in a row each client (by id) was selected and gave no usable update."""

    def update(self, node_id: int, status: ClientStatus) -> None:
        self.statuses[node_id] = status

    def record_round(self, selected: Iterable[str], used: Iterable[str], refused: Iterable[str]) -> None:
        """After a round: selected clients whose update was ``used`` reset their misses, the others
        (except those that ``refused``) miss once more."""
        used, refused = set(used), set(refused)
        for client in selected:
            if client in used:
                self.misses.pop(client, None)
            elif client not in refused:
                self.misses[client] = self.misses.get(client, 0) + 1

    def benched(self, node_id: int, max_misses: int) -> bool:
        """Whether the node's client has missed ``max_misses`` rounds in a row (never with 0)."""
        return max_misses > 0 and self.misses.get(self.client_id(node_id), 0) >= max_misses

    def unknown(self, node_ids: Iterable[int]) -> list[int]:
        """Connected nodes that have not reported a status yet."""
        return [node for node in node_ids if node not in self.statuses]

    def eligible(
        self, node_ids: Iterable[int], speaker_ok: Callable[[str], bool] = lambda _: True, max_misses: int = 0
    ) -> list[int]:
        """Connected, not benched nodes whose last status says one more round fits every budget."""
        return [
            node
            for node in node_ids
            if node in self.statuses
            and self.statuses[node].can_afford_round()
            and speaker_ok(self.statuses[node].client_id)
            and not self.benched(node, max_misses)
        ]

    def client_id(self, node_id: int) -> str:
        status = self.statuses.get(node_id)
        return status.client_id if status else f"node-{node_id}"


@dataclass(frozen=True)
class Selection:
    """The outcome of sampling one round, with what the accountant needs to know."""

    node_ids: list[int]
    eligible: int
    sample_rate: float
    poisson: bool

    @property
    def expected_clients(self) -> float:
        """Expected number of participants (the fixed denominator of DP-FedAvg's mean)."""
        return self.sample_rate * self.eligible if self.poisson else float(len(self.node_ids))


def select_clients(
    eligible: list[int], clients_per_round: int, poisson_rate: float | None, rng: random.Random
) -> Selection:
    """Sample a round's participants: Poisson at ``poisson_rate`` if given, else uniformly."""
    if poisson_rate is not None:
        chosen = [node for node in eligible if rng.random() < poisson_rate]
        return Selection(chosen, len(eligible), poisson_rate, poisson=True)
    size = len(eligible) if clients_per_round == 0 else min(clients_per_round, len(eligible))
    chosen = rng.sample(eligible, size)
    return Selection(chosen, len(eligible), size / len(eligible) if eligible else 0.0, poisson=False)


def poisson_rate(clients_per_round: int, population: int) -> float:
    """``q = clients_per_round / population`` (1 when every client is asked to take part)."""
    return 1.0 if clients_per_round == 0 else min(1.0, clients_per_round / max(population, 1))


__all__ = ["ClientBook", "Selection", "poisson_rate", "select_clients"]
