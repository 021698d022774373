"""The message contract between the fedvox ServerApp and ClientApp.

Three kinds of message travel (Flower's ``MessageType``): ``query`` (the server asks a client
what it can do), ``train`` and ``evaluate``. Every server message carries the round *plan*
(:class:`Plan`): the run configuration in Flower's flat form plus the round, the run id and the
server attempt, so a client trains exactly what the server planned, can tell whether its own
model matches, and keys its ledger rows so that a redone round is charged again. Every client reply carries a
``status`` record (:class:`ClientStatus`): who it is, its device profile, and its utterance-level
privacy budget, so the server can plan the next round without querying again (in deployment
every message starts a fresh ClientApp process, about 7 s). A client that cannot or will not do
what was asked replies with ``outcome = "refused"`` and a reason code instead of crashing.

Record keys:

``arrays``   ArrayRecord holding one packed array, the trainable subset: the global one in
             ``wire-precision`` (fp16 or fp32; Flower cannot carry bf16), an update in
             ``update-encoding`` (int4/int8 deltas, or fp16/fp32 values; :mod:`fedvox.shared.wire`)
``config``   ConfigRecord, the round plan (server -> client)
``metrics``  MetricRecord, numbers (client -> server; only what the device may release:
             docs/privacy.md lists every field and how it is protected)
``status``   ConfigRecord, :class:`ClientStatus` (client -> server, every reply)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from flwr.app import ConfigRecord

from fedvox.shared.errors import ProtocolError
from fedvox.shared.runconfig import RunConfig

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
STATUS = "status"

SERVER_ROUND = "server-round"
"""Plan key naming the round (Flower's strategies inject it too)."""
RUN_ID = "run-id"
"""Plan key: the run's id, stable across server restarts (ledger rows are keyed by it)."""
PROTOCOL = "protocol"
"""Plan key: the version of this contract the server speaks (:data:`PROTOCOL_VERSION`)."""
PROTOCOL_VERSION = 3
"""3: a subset (the global one down, an update up) travels as one packed array with a manifest
(:mod:`fedvox.shared.wire`), not one array per tensor; a client or server of another version
refuses the other's messages with a one-line error. 2: updates travel in the plan's
``update-encoding`` (int4 deltas by default). A plan without the key is version 1 (updates as
fp16/fp32 values)."""
ATTEMPT = "attempt"
"""Plan key: the id of the server process sending it. A round redone after a restart is a new
attempt: clients train and release again, so they must charge their budgets again."""

TRAIN_METRICS = ("bytes-down", "bytes-up")
"""Keys every accepted train reply's ``metrics`` carries: the sizes of the subset received and
sent, fixed by the plan. No loss, count, memory or time: they depend on the recordings (or the
sampled batch) and would leave un-noised (docs/privacy.md)."""

EVALUATE_METRICS = ("val-loss",)
"""Keys every accepted evaluate reply's ``metrics`` carries: a validation loss released with DP
noise and charged by the device (:mod:`client.loss_release`). Averaged uniformly: no example count
leaves a device."""
OPTIONAL_EVALUATE_METRICS: tuple[str, ...] = ()

OK = "ok"
REFUSED = "refused"
REFUSAL_REASONS = ("budget", "data", "model", "device", "policy")
"""Why a client refused: its owner's budget would be exceeded (or the plan asks for more than it
allows), it has no usable data, the plan's model does not match the one it holds, its device
cannot run the plan, or its release policy does not allow it (e.g. a second evaluation in a round)."""

_TYPES = {"str": str, "int": int, "float": float}

# Plan keys that are not run-configuration keys.
_PLAN_KEYS = (SERVER_ROUND, RUN_ID, ATTEMPT, PROTOCOL)


@dataclass(frozen=True)
class ClientStatus:
    """What a client reports about itself, in every reply.

    ``epsilon_next`` is the cumulative utterance-level epsilon the client would reach after
    training one more round of the plan it was sent (``inf`` if no noise level fits); the
    server selects it only if that stays within ``epsilon_budget`` (the owner's). No field
    depends on the size of the client's data: the plan fixes the sample rate.
    """

    client_id: str
    outcome: str = OK
    reason: str = ""
    detail: str = ""
    profile: str = ""
    epsilon_spent: float = 0.0
    epsilon_budget: float = 0.0
    epsilon_next: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome == OK

    @property
    def epsilon_remaining(self) -> float:
        return self.epsilon_budget - self.epsilon_spent

    def can_afford_round(self) -> bool:
        """Whether one more round of the plan keeps the client within its budget."""
        return self.ok and self.epsilon_next <= self.epsilon_budget

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({key.replace("_", "-"): value for key, value in asdict(self).items()})

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ClientStatus:
        """Parse a ``status`` record; raises :class:`ProtocolError` naming what is wrong."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in record:
                if f.name == "client_id":
                    raise ProtocolError("status record has no client-id")
                continue
            value = record[key]
            kind = _TYPES[str(f.type)]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ProtocolError(f"status {key} must be a {kind.__name__}, got {value!r}")
            if isinstance(value, float) and math.isnan(value):
                raise ProtocolError(f"status {key} must be a number, got NaN")
            values[f.name] = value
        status = cls(**values)
        if status.outcome not in (OK, REFUSED):
            raise ProtocolError(f"status outcome must be {OK!r} or {REFUSED!r}, got {status.outcome!r}")
        if status.outcome == REFUSED and status.reason not in REFUSAL_REASONS:
            raise ProtocolError(f"refusal reason must be one of {', '.join(REFUSAL_REASONS)}, got {status.reason!r}")
        return status


@dataclass(frozen=True)
class Plan:
    """What the server asks of a client in one message."""

    config: RunConfig
    server_round: int
    run_id: str
    attempt: str

    def to_record(self) -> ConfigRecord:
        record = ConfigRecord(self.config.to_flat())
        record.update(
            {
                SERVER_ROUND: self.server_round,
                RUN_ID: self.run_id,
                ATTEMPT: self.attempt,
                PROTOCOL: PROTOCOL_VERSION,
            }
        )
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Plan:
        """Parse a received plan; raises :class:`ProtocolError` or :class:`ConfigError`."""
        version = record.get(PROTOCOL, 1)
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"the server speaks fedvox protocol {version}, this client {PROTOCOL_VERSION}: "
                "run the same fedvox release on the server and its clients"
            )
        missing = [key for key in _PLAN_KEYS if key not in record]
        if missing:
            raise ProtocolError(f"the round plan lacks {missing}; was it sent by a fedvox server?")
        flat = {key: value for key, value in record.items() if key not in _PLAN_KEYS}
        return cls(RunConfig.from_flat(flat), int(record[SERVER_ROUND]), str(record[RUN_ID]), str(record[ATTEMPT]))


__all__ = [
    "ARRAYS",
    "ATTEMPT",
    "CONFIG",
    "EVALUATE_METRICS",
    "METRICS",
    "OK",
    "OPTIONAL_EVALUATE_METRICS",
    "PROTOCOL",
    "PROTOCOL_VERSION",
    "REFUSAL_REASONS",
    "REFUSED",
    "RUN_ID",
    "SERVER_ROUND",
    "STATUS",
    "TRAIN_METRICS",
    "ClientStatus",
    "Plan",
]
