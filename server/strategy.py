"""The fedvox strategy: one Flower ``FedAvg`` holding an aggregation rule and a commit hook.

:class:`FedvoxStrategy` adds what a privacy-preserving voice federation needs around the rule:

- selection (``configure_train``): query nodes it has not heard from, keep only clients whose
  reported budget covers the round, sample them (Poisson under speaker-level DP), and send the
  global trainable subset in the wire precision with the round plan;
- screening (``aggregate_train``): parse every reply's status, validate its update (decoded from
  the plan's ``update-encoding``) against what was sent (encoding, keys, shapes, dtypes, finite
  values, norm), count and log rejects;
- aggregation: the accepted updates go to its :class:`~fedvox.server.aggregators.Aggregator`
  (the mean, the speaker-level DP mean, Flower's median or trimmed mean, FedAdam on a mean);
- commit: once a round's aggregate is made and *before any message carries it* (Flower sends it
  next in the evaluate messages), the round's :class:`RoundRecord` and the new global model go to
  its ``on_release`` hook, which :mod:`fedvox.server.run` uses to charge the speaker-level ledger
  and write the checkpoint; after evaluation ``on_round_end`` adds what the evaluation reported.

Flower's own ``FedAvg`` keeps its job: ``start`` runs the round loop, ``summary`` logs settings.

Resume: ``Strategy.start`` always counts rounds from 1. Rounds up to ``completed_round`` (the
last committed checkpoint) are configured with no messages and aggregate to nothing, so Flower's
loop walks through them for free and every hook sees the true round number (FedAdam's bias
correction included).

Memory: Flower holds every reply of a round (in the wire precision). Screening keeps only each
update's status and metrics; what the rule adds is in :mod:`fedvox.server.aggregators`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedvox.server.aggregators import WEIGHT_KEY, Accepted, Aggregator, RoundUpdates
from fedvox.server.ledger_heads import read_head
from fedvox.server.selection import ClientBook, Selection, poisson_rate, select_clients
from fedvox.server.speaker_accounting import SpeakerAccounting
from fedvox.server.speaker_dp import SpeakerRelease
from fedvox.shared.errors import ConfigError, FederationError, ProtocolError, UpdateRejected
from fedvox.shared.protocol import (
    ARRAYS,
    CONFIG,
    EVALUATE_METRICS,
    METRICS,
    OPTIONAL_EVALUATE_METRICS,
    STATUS,
    TRAIN_METRICS,
    ClientStatus,
    Plan,
)
from fedvox.shared.runconfig import RunConfig
from fedvox.shared.wire import (
    from_record,
    from_wire,
    read_update,
    record_bytes,
    to_record,
    to_wire,
    validate_update,
)

log = logging.getLogger(__name__)

NODE_POLL_S = 0.5
QUERY_TIMEOUT_S = 120.0
"""How long a status query waits (a deployed ClientApp answers in ~10 s: process start, torch
import, one accountant call); nodes that miss it are asked again next round, never selected."""


@dataclass
class RoundRecord:
    """Everything one round did, for its checkpoint, the metrics log and the ledger."""

    server_round: int
    started: float = field(default_factory=time.monotonic)
    server_s: float = 0.0
    """Time spent in the strategy itself (selection, screening, aggregation, commit), not waiting
    for devices."""
    selection: Selection | None = None
    eligible_clients: list[str] = field(default_factory=list)
    participants: list[str] = field(default_factory=list)
    rejects: Counter[str] = field(default_factory=Counter)
    ineligible: Counter[str] = field(default_factory=Counter)
    bytes_down: int = 0
    bytes_up: int = 0
    train: dict[str, float] = field(default_factory=dict)
    evaluate: dict[str, float] = field(default_factory=dict)
    evaluators: list[str] = field(default_factory=list)
    """Client ids whose validation replies make up ``evaluate`` (best-round selection compares
    only rounds with the same evaluators, :mod:`server.checkpoints`)."""
    utterance_epsilons: list[float] = field(default_factory=list)
    release: SpeakerRelease | None = None
    aggregated: bool = False
    outcome: ArrayRecord | None = None
    """The global trainable subset after the round (fp32), set when the round's training is done."""
    clients: list[dict[str, Any]] = field(default_factory=list)
    """Per train reply: the sender's node id and what it reported (``fedvox-server devices``)."""
    ledger_heads: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per client and device key, the last signed ledger head its replies carried this round
    (:mod:`server.ledger_heads`)."""
    unsigned: int = 0
    """Replies from a client with its ledger open that carried no valid signed head."""

    def summary(self) -> dict[str, Any]:
        """Flat, JSON-ready metrics of the round (speaker epsilons are added at commit)."""
        out: dict[str, Any] = {
            "round-time-s": time.monotonic() - self.started,
            "server-s": self.server_s,
            "participants": len(self.participants),
            "selected": len(self.selection.node_ids) if self.selection else 0,
            "eligible": self.selection.eligible if self.selection else 0,
            "sample-rate": self.selection.sample_rate if self.selection else 0.0,
            "rejects": dict(self.rejects),
            "rejected": sum(self.rejects.values()),
            "ineligible": dict(self.ineligible),
            "bytes-down": self.bytes_down,
            "bytes-up": self.bytes_up,
            "aggregated": self.aggregated,
            **self.train,
            **self.evaluate,
        }
        if self.evaluators:
            out["val-clients"] = self.evaluators
        if self.utterance_epsilons:
            out["epsilon-utterance-max"] = max(self.utterance_epsilons)
            out["epsilon-utterance-mean"] = sum(self.utterance_epsilons) / len(self.utterance_epsilons)
        if self.clients:
            out["clients"] = self.clients
        if self.ledger_heads:
            out["ledger-heads"] = self.ledger_heads
        if self.unsigned:
            out["ledger-heads-missing"] = self.unsigned
        if self.release is not None:
            out["speaker-dp"] = {
                "noise-std": self.release.noise_std,
                "expected-clients": self.release.expected_clients,
                "clipped": self.release.clipped,
            }
        return out


class FedvoxStrategy(FedAvg):
    """Selection, screening and commit around one aggregation rule.

    ``seed`` derives each round's sampling and noise randomness (see :func:`_derive`): keep it
    secret, since noise an adversary can predict is no noise. ``completed_round`` and
    ``population`` restore a resumed run; ``speaker`` is the speaker-level accounting (required
    under speaker-level DP); ``on_release`` receives every round's outcome before it is sent
    anywhere, ``on_round_end`` every finished round (evaluation included).
    """

    def __init__(
        self,
        config: RunConfig,
        aggregator: Aggregator,
        *,
        run_id: str,
        attempt: str,
        seed: int,
        completed_round: int = 0,
        population: int | None = None,
        speaker: SpeakerAccounting | None = None,
        on_release: Callable[[RoundRecord], None] | None = None,
        on_round_end: Callable[[RoundRecord], None] | None = None,
    ) -> None:
        if config.speaker_dp.enabled and speaker is None:
            raise ConfigError("speaker-level DP is on but no speaker accounting was given")
        super().__init__(
            min_train_nodes=config.min_clients,
            min_available_nodes=config.min_clients,
            min_evaluate_nodes=1,
            fraction_evaluate=1.0 if config.evaluate else 0.0,
            weighted_by_key=WEIGHT_KEY,
            train_metrics_aggr_fn=summarize_train,
            evaluate_metrics_aggr_fn=summarize_evaluate,
        )
        self.config = config
        self.aggregator = aggregator
        self.run_id = run_id
        self.attempt = attempt
        self.seed = seed
        self.completed_round = completed_round
        self.population = population
        self.speaker = speaker
        self.on_release = on_release
        self.on_round_end = on_round_end
        self.book = ClientBook()
        self.current: RoundRecord | None = None
        """The round in progress, from selection until it ends."""
        self._global: dict[str, torch.Tensor] = {}  # the fp32 global subset of the round in progress
        self._sent: dict[str, torch.Tensor] = {}  # the same, as clients received it (wire precision)
        self._outbox: list[Message] = []  # the messages of the step in progress: who each reply answers
        self._nodes: list[int] = []  # the connected nodes of the last round

    def summary(self) -> None:
        log.info("aggregation: %s", self.aggregator.name)
        super().summary()

    def plan(self, server_round: int) -> Plan:
        return Plan(self.config, server_round, self.run_id, self.attempt)

    # ------------------------------------------------------------------ training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if server_round <= self.completed_round:
            log.info("round %d: already committed before a restart, skipping", server_round)
            return []
        record = self.current = RoundRecord(server_round)
        nodes = self._connected_nodes(grid)
        waited = time.monotonic() - record.started  # for devices: neither is the server's time
        waited += self._query(grid, self.book.unknown(nodes), server_round)
        if self.population is None:
            self.population = len(nodes)
        rate = None
        if self.speaker is not None:
            rate = self.speaker.sample_rate = poisson_rate(self.config.clients_per_round, self.population)

        eligible = self.book.eligible(
            nodes, self.speaker.can_afford_round if self.speaker else _always, self.config.max_misses
        )
        eligible.sort(key=self.book.client_id)  # node ids change across restarts, client ids do not
        for node in set(nodes) - set(eligible):
            benched = self.book.benched(node, self.config.max_misses)
            record.ineligible["missed" if benched else _ineligibility(self.book.statuses.get(node))] += 1
        if len(eligible) < self.config.min_clients:
            why = ", ".join(f"{reason}: {count}" for reason, count in sorted(record.ineligible.items()))
            raise FederationError(
                f"round {server_round}: only {len(eligible)} of {len(nodes)} connected clients can "
                f"train another round (min-clients = {self.config.min_clients}; not eligible: {why}). "
                "'budget' means spent privacy budgets (raise them or start a new run); other reasons "
                "are in the clients' refusals in the log"
            )
        record.selection = select_clients(eligible, self.config.clients_per_round, rate, self._rng(server_round))
        record.eligible_clients = sorted(self.book.client_id(n) for n in eligible)

        self._global = from_record(arrays)
        wire = to_wire(self._global, self.config.wire_precision)
        self._sent = from_wire(wire)
        plan = self.plan(server_round).to_record()
        plan.update(config)  # what a caller of ``start`` adds to every train message
        record.bytes_down += record_bytes(wire) * len(record.selection.node_ids)
        log.info(
            "round %d: %d of %d eligible clients selected (rate %.3f, %d connected)",
            server_round,
            len(record.selection.node_ids),
            len(eligible),
            record.selection.sample_rate,
            len(nodes),
        )
        content = RecordDict({ARRAYS: wire, CONFIG: plan})
        record.server_s += time.monotonic() - record.started - waited
        return self._send(
            [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in record.selection.node_ids]
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if server_round <= self.completed_round:
            return None, None
        began = time.monotonic()
        record = self._record(server_round)
        replies = list(replies)
        if missing := len(record.selection.node_ids) - len(replies):
            record.rejects["no-reply"] += missing
        selected = [self.book.client_id(n) for n in record.selection.node_ids]  # before errors forget them
        accepted = [a for a in (self._screen_train(r, record) for r in replies) if a is not None]
        refused = [s.client_id for r in replies if (s := self.book.statuses.get(self._node(r))) and not s.ok]
        self.book.record_round(selected, [a.status.client_id for a in accepted], refused)
        taken = {id(a.reply) for a in accepted}
        record.clients = [_client_entry(self._node(r), self.book, id(r) in taken) for r in replies]
        record.participants = sorted(a.status.client_id for a in accepted)
        record.utterance_epsilons = [a.status.epsilon_spent for a in accepted]
        for reason, count in record.rejects.items():
            if count:
                log.warning("round %d: %d update(s) not used: %s", server_round, count, reason)

        # Under speaker-level DP every round is released (noise alone if nobody took part), so
        # whether anyone did is itself protected.
        if len(accepted) < self.config.min_clients and not self.config.speaker_dp.enabled:
            log.warning(
                "round %d: only %d valid update(s) (min-clients = %d); the global model is unchanged",
                server_round,
                len(accepted),
                self.config.min_clients,
            )
            return None, None
        updates = RoundUpdates(
            server_round,
            self._global,
            self._sent,
            accepted,
            expected_clients=record.selection.expected_clients,
            noise=self._noise_generator(server_round),
        )
        aggregate = self.aggregator.aggregate(updates)
        if (release := aggregate.release) is not None:
            record.release = release
            log.info(
                "round %d: speaker-level DP mean of %d update(s), %d clipped to %.3g, noise std %.3g",
                server_round,
                release.participants,
                release.clipped,
                self.config.speaker_dp.clip_norm,
                release.noise_std,
            )
        rows = [RecordDict({METRICS: MetricRecord(a.metrics)}) for a in accepted]
        metrics = self.train_metrics_aggr_fn(rows, self.weighted_by_key) if rows else MetricRecord()
        record.aggregated = True
        record.train = _numbers(metrics)
        outcome = to_record(aggregate.state, "fp32")
        record.server_s += time.monotonic() - began
        return outcome, metrics

    # ------------------------------------------------------------------ evaluation and commit
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if server_round <= self.completed_round:
            return []
        began = time.monotonic()
        record = self._record(server_round)
        record.outcome = arrays  # what Flower's loop made of the round
        if self.on_release is not None:  # charged and committed before these messages carry it
            self.on_release(record)
        if not self.config.evaluate:
            record.server_s += time.monotonic() - began
            return []
        nodes = [n for n in grid.get_node_ids() if n in self.book.statuses and self.book.statuses[n].ok]
        wire = to_wire(from_record(arrays), self.config.wire_precision)
        record.bytes_down += record_bytes(wire) * len(nodes)
        plan = self.plan(server_round).to_record()
        plan.update(config)
        content = RecordDict({ARRAYS: wire, CONFIG: plan})
        record.server_s += time.monotonic() - began
        return self._send([Message(content, dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes])

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Summarize the validation replies, then end the round (the last step of Flower's round)."""
        if server_round <= self.completed_round:
            return None
        began = time.monotonic()
        record = self._record(server_round)
        usable, evaluators = [], []
        for reply in replies:
            status = self._status(reply, record)
            metrics = _required_metrics(reply, EVALUATE_METRICS, OPTIONAL_EVALUATE_METRICS) if status else None
            if metrics is not None and status.ok:
                usable.append(RecordDict({METRICS: MetricRecord({**metrics, WEIGHT_KEY: 1.0})}))
                evaluators.append(status.client_id)
        metrics = self.evaluate_metrics_aggr_fn(usable, self.weighted_by_key) if usable else None
        record.evaluate = _numbers(metrics)
        record.evaluators = sorted(evaluators)
        record.server_s += time.monotonic() - began
        self._end_round(record)
        return metrics

    def _end_round(self, record: RoundRecord) -> None:
        """Hand the finished round to ``on_round_end`` and let go of it (memory stays flat)."""
        self.current = None
        if self.on_round_end is not None:
            self.on_round_end(record)

    # ------------------------------------------------------------------ pieces
    def _record(self, server_round: int) -> RoundRecord:
        if self.current is None or self.current.server_round != server_round:
            raise FederationError(f"round {server_round} was not configured by this strategy")
        return self.current

    def _connected_nodes(self, grid: Grid) -> list[int]:
        """Connected node ids: at least ``min_clients`` (waiting up to ``round_timeout``), and no
        longer growing between two polls, so nodes registering together are all counted (the
        previous round's nodes, all still there, need no second look)."""
        deadline = time.monotonic() + self.config.round_timeout
        previous = self._nodes
        while len(nodes := sorted(grid.get_node_ids())) < self.config.min_clients or nodes != previous:
            if time.monotonic() > deadline:
                raise FederationError(
                    f"only {len(nodes)} client(s) connected after {self.config.round_timeout:.0f} s "
                    f"(min-clients = {self.config.min_clients}); start more SuperNodes or lower min-clients"
                )
            previous = nodes
            time.sleep(NODE_POLL_S)
        self._nodes = nodes
        return nodes

    def _query(self, grid: Grid, nodes: list[int], server_round: int) -> float:
        """Ask ``nodes`` for their status (profile, data, budget under the next round's plan);
        returns how long the replies took (the devices' time, not the server's)."""
        if not nodes:
            return 0.0
        plan = self.plan(server_round).to_record()
        messages = [Message(RecordDict({CONFIG: plan}), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        timeout = min(QUERY_TIMEOUT_S, self.config.round_timeout)
        sent = time.monotonic()
        replies = list(grid.send_and_receive(self._send(messages), timeout=timeout))
        waited = time.monotonic() - sent
        for reply in replies:
            self._status(reply, self._record(server_round))
        log.info("queried %d new client(s), %d answered", len(nodes), len(replies))
        return waited

    def _send(self, messages: list[Message]) -> list[Message]:
        """Keep the step's messages (the grid gives them their ids as it sends them)."""
        self._outbox = messages
        return messages

    def _node(self, reply: Message) -> int:
        """The node a reply is about. An error reply comes from the SuperLink (node 1: the device
        was unavailable or its ClientApp failed), so it is the node its message was sent to."""
        if not reply.has_error():
            return reply.metadata.src_node_id
        answered = reply.metadata.reply_to_message_id
        sent = next((m for m in self._outbox if m.metadata.message_id == answered), None)
        return sent.metadata.dst_node_id if sent is not None else reply.metadata.src_node_id

    def _status(self, reply: Message, record: RoundRecord) -> ClientStatus | None:
        """The reply's status (recorded in the book, its signed ledger head in ``record``), or
        ``None`` if it has none or is an error."""
        node = self._node(reply)
        if reply.has_error():
            log.warning("node %d replied with an error: %s", node, reply.error.reason)
            self.book.statuses.pop(node, None)  # unknown again: re-queried next round
            return None
        try:
            status = ClientStatus.from_record(reply.content.config_records[STATUS])
        except (KeyError, ProtocolError) as exc:
            log.warning("node %d sent no valid status: %s", node, exc)
            self.book.statuses.pop(node, None)
            return None
        self.book.update(node, status)
        if (head := read_head(reply, status.client_id)) is not None:  # per device: two may share an identity
            record.ledger_heads[f"{status.client_id} {head.fingerprint}"] = head.to_json()
        elif status.ok:
            record.unsigned += 1
        return status

    def _screen_train(self, reply: Message, record: RoundRecord) -> Accepted | None:
        status = self._status(reply, record)
        if status is None:
            record.rejects["error" if reply.has_error() else "protocol"] += 1
            return None
        if not status.ok:
            record.rejects["refused-" + status.reason] += 1
            log.info("round %d: %s refused: %s", record.server_round, status.client_id, status.detail)
            return None
        metrics = _required_metrics(reply, TRAIN_METRICS)
        if metrics is None or ARRAYS not in reply.content.array_records:
            record.rejects["protocol"] += 1
            return None
        metrics[WEIGHT_KEY] = 1.0  # uniform: a device's example count is private and never sent
        arrays = reply.content.array_records[ARRAYS]
        record.bytes_up += record_bytes(arrays)
        try:
            update = read_update(arrays)
            if update.encoding != self.config.update_encoding:
                raise UpdateRejected(
                    f"encoding: the update is {update.encoding}, the plan asks for {self.config.update_encoding}"
                )
            norm = validate_update(self._sent, update, self.config.max_update_norm)
        except UpdateRejected as exc:
            reason = str(exc).split(":", 1)[0]
            record.rejects[reason] += 1
            log.warning("round %d: rejected update from %s: %s", record.server_round, status.client_id, exc)
            return None
        return Accepted(reply, status, metrics, norm)

    def _rng(self, server_round: int) -> random.Random:
        return random.Random(_derive(self.seed, "sample", server_round))

    def _noise_generator(self, server_round: int) -> torch.Generator:
        return torch.Generator().manual_seed(_derive(self.seed, "noise", server_round))


# ---------------------------------------------------------------------- metric aggregation
def summarize_train(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Round summary of train replies: how many updates (devices release no loss or timing)."""
    rows, _ = _rows(records, weight_key)
    return MetricRecord({"updates": len(rows)})


def summarize_evaluate(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """The mean of the devices' released (noised) validation losses, one vote per device."""
    rows, weights = _rows(records, weight_key)
    return MetricRecord({"val-loss": _weighted_mean(rows, weights, "val-loss")})


def _rows(records: list[RecordDict], weight_key: str) -> tuple[list[MetricRecord], list[float]]:
    rows = [next(iter(r.metric_records.values())) for r in records]
    return rows, [float(m[weight_key]) for m in rows]


def _weighted_mean(rows: list[MetricRecord], weights: list[float], key: str) -> float:
    return sum(w * float(m[key]) for w, m in zip(weights, rows, strict=True)) / (sum(weights) or 1.0)


# ---------------------------------------------------------------------- helpers
def _required_metrics(reply: Message, keys: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, float] | None:
    """The reply's ``metrics`` restricted to ``keys`` (+ ``optional`` ones present), or ``None``
    if a required one is missing or any is not a finite number."""
    record = reply.content.metric_records.get(METRICS)
    if record is None or any(k not in record for k in keys):
        return None
    values = {k: record[k] for k in (*keys, *optional) if k in record}
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values.values()):
        return None
    return values


def _numbers(metrics: MetricRecord | None) -> dict[str, float]:
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))}


def _client_entry(node: int, book: ClientBook, accepted: bool) -> dict[str, Any]:
    """Who a train reply is about and what its status said (nothing but ids, profile and budget)."""
    entry: dict[str, Any] = {"node-id": node, "accepted": accepted}
    if (status := book.statuses.get(node)) is not None:
        entry.update(
            {
                "client-id": status.client_id,
                "profile": status.profile,
                "outcome": status.outcome,
                "epsilon-spent": status.epsilon_spent,
                "epsilon-budget": status.epsilon_budget,
                "epsilon-next": status.epsilon_next,
            }
        )
    return entry


def _always(_: str) -> bool:
    return True


def _ineligibility(status: ClientStatus | None) -> str:
    if status is None:
        return "silent"
    if not status.ok:
        return status.reason
    return "budget"


def _derive(seed: int, purpose: str, server_round: int) -> int:
    """A 63-bit seed for one round and purpose, so a resumed run draws what it would have."""
    digest = hashlib.sha256(f"{seed}:{purpose}:{server_round}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
