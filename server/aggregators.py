"""Aggregation rules the fedvox strategy holds: what a round's screened updates become.

The strategy (:mod:`fedvox.server.strategy`) selects clients, screens their replies and hands the
accepted ones to one :class:`Aggregator` as :class:`RoundUpdates`. Each rule is an object, built
once from the run configuration by :func:`build_aggregator`:

- :class:`WeightedMean`: FedAvg's mean, with uniform weights since devices send no example count
  (FedProx too: its server side is only ``proximal-mu`` in the plan, which the plan always
  carries), summed one update at a time;
- :class:`SpeakerDPMean`: the clipped, noised DP-FedAvg mean (:mod:`fedvox.server.speaker_dp`);
- :class:`FlowerRule`: a Flower strategy's own ``aggregate_train`` (the median, the trimmed mean) on
  the updates re-based onto the fp32 global model;
- :class:`ServerAdam`: Flower's FedAdam server step on the aggregate of an inner rule (the mean,
  or under speaker-level DP the noised mean), its moments checkpointed;
- :class:`ServerStep`: any other rule's move scaled by ``server-step``, DP-FedAvg's server
  learning rate (McMahan et al. 2018): the mean of ``n`` noisy updates carries ``1/sqrt(n)`` of
  one client's DP noise, so the server may take a longer step than any client could alone.

Memory: the means decode one update at a time, so they add a few fp32 models whatever the number
of clients (``bench/server_aggregate.py``). Only Flower's median and trimmed mean, which need
every coordinate of every update at once, hold all updates in fp32.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedTrimmedAvg

from fedvox.server.speaker_dp import SpeakerRelease, clip_factors, noised_mean
from fedvox.shared.errors import ConfigError
from fedvox.shared.protocol import ARRAYS, METRICS, ClientStatus
from fedvox.shared.runconfig import AGGREGATIONS, RunConfig
from fedvox.shared.wire import from_record, read_update, to_record

WEIGHT_KEY = "uniform-weight"
"""The metric a mean weighs each update by (Flower's ``weighted_by_key``): 1 for every accepted
update, set by the strategy's screening. A device's example count is private and never sent."""


@dataclass
class Accepted:
    """A screened train reply: who sent it, its metrics, and the L2 norm of its update relative
    to what its client was sent (the update itself stays in the reply)."""

    reply: Message
    status: ClientStatus
    metrics: dict[str, float]
    norm: float


@dataclass(frozen=True)
class RoundUpdates:
    """One round's accepted updates, as an aggregator reads them."""

    server_round: int
    global_state: Mapping[str, torch.Tensor]
    """The fp32 global trainable subset the round started from."""
    sent: Mapping[str, torch.Tensor]
    """The same, as clients received it (rounded to the wire precision)."""
    accepted: Sequence[Accepted]
    expected_clients: float
    """The selection's expected number of participants (the DP mean's fixed denominator)."""
    noise: torch.Generator
    """This round's noise randomness (derived from the run's secret seed)."""

    def weights(self) -> list[float]:
        return [float(a.metrics[WEIGHT_KEY]) for a in self.accepted]

    def combine(self, coefficients: Sequence[float]) -> dict[str, torch.Tensor]:
        """``sum_i c_i * (update_i - sent)`` in fp32, one pass over each update's received bytes.

        An int8 update is a delta, decoded one tensor at a time; for an update of values, summing
        ``c_i * update_i`` and subtracting ``(sum_i c_i) * sent`` once reads it in place. Either
        way every update is read exactly once and one fp32 model is held whatever the number of
        clients.
        """
        total = {name: torch.zeros_like(t) for name, t in self.sent.items()}
        values_weight = []  # the coefficients of updates of values (their ``sent`` is subtracted once)
        for coefficient, accepted in zip(coefficients, self.accepted, strict=True):
            update = read_update(accepted.reply.content.array_records[ARRAYS])
            for name, value in total.items():
                value.add_(update[name], alpha=coefficient)
            if not update.relative:
                values_weight.append(coefficient)
        if values_weight:
            scale = math.fsum(values_weight)
            for name, value in total.items():
                value.sub_(self.sent[name], alpha=scale)
        return total

    def deltas(self) -> Iterator[dict[str, torch.Tensor]]:
        """Each update relative to what its client was sent, in fp32, one at a time."""
        for accepted in self.accepted:
            update = read_update(accepted.reply.content.array_records[ARRAYS])
            if update.relative:
                yield {name: update[name] for name in self.sent}
            else:
                yield {name: torch.sub(update[name], sent) for name, sent in self.sent.items()}

    def rebased(self) -> list[Message]:
        """The replies made canonical for Flower's rules: each update applied to the fp32 global
        model, with its metrics (every update is then held in fp32 at once)."""
        replies = []
        for accepted, delta in zip(self.accepted, self.deltas(), strict=True):
            arrays = {name: self.global_state[name] + d for name, d in delta.items()}
            content = {ARRAYS: to_record(arrays, "fp32"), METRICS: MetricRecord(accepted.metrics)}
            accepted.reply.content = RecordDict(content)
            replies.append(accepted.reply)
        return replies


@dataclass(frozen=True)
class Aggregate:
    """The next global trainable subset (fp32) and, under speaker-level DP, how it was released."""

    state: dict[str, torch.Tensor]
    release: SpeakerRelease | None = None


class Aggregator(ABC):
    """Turns one round's accepted updates into the next global model."""

    name: str

    @abstractmethod
    def aggregate(self, updates: RoundUpdates) -> Aggregate:
        """The round's aggregate; called with at least ``min-clients`` updates, or under
        speaker-level DP with any number (then the release is noise whoever took part)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors a resumed run needs to continue exactly (none for stateless rules)."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`; a stateless rule refuses state (it belongs to another rule)."""
        if state:
            raise ConfigError(f"the {self.name} rule keeps no state, but the checkpoint holds {sorted(state)[:3]}")


class WeightedMean(Aggregator):
    """FedAvg's mean weighted by :data:`WEIGHT_KEY` (uniform), summed one update at a time (Flower's
    ``aggregate_arrayrecords`` wants every update as an fp32 record at once)."""

    name = "mean"

    def aggregate(self, updates: RoundUpdates) -> Aggregate:
        weights = updates.weights()
        total = math.fsum(weights)
        mean_update = updates.combine([weight / total for weight in weights])
        return Aggregate({name: updates.global_state[name] + value for name, value in mean_update.items()})


class SpeakerDPMean(Aggregator):
    """Speaker-level DP-FedAvg: every update clipped to ``clip_norm``, the sum noised and divided
    by the expected number of participants (:func:`fedvox.server.speaker_dp.noised_mean`)."""

    name = "speaker-dp-mean"

    def __init__(self, clip_norm: float, noise_multiplier: float) -> None:
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier

    def aggregate(self, updates: RoundUpdates) -> Aggregate:
        norms = [accepted.norm for accepted in updates.accepted]
        release = noised_mean(
            updates.combine(clip_factors(norms, self.clip_norm)),
            participants=len(norms),
            clipped=sum(norm > self.clip_norm for norm in norms),
            clip_norm=self.clip_norm,
            noise_multiplier=self.noise_multiplier,
            expected_clients=updates.expected_clients,
            generator=updates.noise,
        )
        state = {name: updates.global_state[name] + release.mean_update[name] for name in updates.global_state}
        return Aggregate(state, release)


class FlowerRule(Aggregator):
    """A Flower strategy's aggregation rule (``FedMedian``, ``FedTrimmedAvg``) on the re-based
    updates; the strategy summarizes the metrics itself, so the rule's own are not used."""

    def __init__(self, rule: FedAvg) -> None:
        self.rule = rule
        self.name = type(rule).__name__

    def aggregate(self, updates: RoundUpdates) -> Aggregate:
        arrays, _ = self.rule.aggregate_train(updates.server_round, updates.rebased())
        assert arrays is not None  # Flower's rules return nothing only without valid replies
        return Aggregate(from_record(arrays))


class ServerAdam(Aggregator):
    """Flower's FedAdam server step on the aggregate of ``inner``.

    FedAdam steps from the weighted mean of the replies it is given; it is given one, the inner
    rule's aggregate (whose mean is itself), so under speaker-level DP Adam runs on the noised
    mean and the noise is never rescaled after the fact. Its float64 step is cast back to fp32.
    """

    def __init__(self, inner: Aggregator, adam: FedAdam) -> None:
        self.inner = inner
        self.adam = adam
        self.name = f"FedAdam({inner.name})"

    def aggregate(self, updates: RoundUpdates) -> Aggregate:
        inner = self.inner.aggregate(updates)
        # What Flower's FedOpt.configure_train records: the global model the step starts from.
        self.adam.current_arrays = {name: t.numpy() for name, t in updates.global_state.items()}
        content = RecordDict({ARRAYS: to_record(inner.state, "fp32"), METRICS: MetricRecord({WEIGHT_KEY: 1})})
        reply = Message(content, dst_node_id=0, message_type=MessageType.TRAIN)
        arrays, _ = self.adam.aggregate_train(updates.server_round, [reply])
        assert arrays is not None  # FedAdam returns nothing only for no reply
        return Aggregate(from_record(arrays), inner.release)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for moment in ("m_t", "v_t"):
            for name, value in (getattr(self.adam, moment) or {}).items():
                state[f"{moment}/{name}"] = torch.from_numpy(np.ascontiguousarray(value))
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for moment in ("m_t", "v_t"):
            values = {k.split("/", 1)[1]: v.numpy() for k, v in state.items() if k.startswith(moment + "/")}
            setattr(self.adam, moment, values or None)


class ServerStep(Aggregator):
    """``inner``'s aggregate moved ``step`` times as far from the global model. Under speaker-level
    DP the noised mean is scaled after its release: post-processing, privacy unchanged."""

    def __init__(self, inner: Aggregator, step: float) -> None:
        self.inner = inner
        self.step = step
        self.name = f"{inner.name} x {step:g}"

    def aggregate(self, updates: RoundUpdates) -> Aggregate:
        inner = self.inner.aggregate(updates)
        state = {name: torch.lerp(updates.global_state[name], value, self.step) for name, value in inner.state.items()}
        return Aggregate(state, inner.release)


def build_aggregator(config: RunConfig) -> Aggregator:
    """The rule ``config.aggregation`` names, on the DP mean when speaker-level DP is on, its move
    scaled by ``server-step`` where that is not 1.

    The run configuration already refuses speaker-level DP with the median or trimmed mean, and a
    server step with FedAdam (which has its own).
    """
    dp = config.speaker_dp
    mean: Aggregator = SpeakerDPMean(dp.clip_norm, dp.noise_multiplier) if dp.enabled else WeightedMean()
    if config.aggregation == "fedadam":
        adam = FedAdam(eta=config.server_learning_rate, eta_l=config.learning_rate, weighted_by_key=WEIGHT_KEY)
        return ServerAdam(mean, adam)
    rule: Aggregator
    if config.aggregation in ("fedavg", "fedprox"):
        rule = mean
    elif config.aggregation == "median":
        rule = FlowerRule(FedMedian(weighted_by_key=WEIGHT_KEY))
    elif config.aggregation == "trimmed-mean":
        rule = FlowerRule(FedTrimmedAvg(beta=config.trim_fraction, weighted_by_key=WEIGHT_KEY))
    else:
        raise ConfigError(f"unknown aggregation {config.aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
    return rule if config.server_step == 1 else ServerStep(rule, config.server_step)


__all__ = [
    "WEIGHT_KEY",
    "Accepted",
    "Aggregate",
    "Aggregator",
    "FlowerRule",
    "RoundUpdates",
    "ServerAdam",
    "ServerStep",
    "SpeakerDPMean",
    "WeightedMean",
    "build_aggregator",
]
