"""One federated run in its run directory: start or resume it, commit every round, stop cleanly.

A round is *committed* when its checkpoint's JSON is written (:mod:`server.checkpoints`). The
commit happens as soon as the round's aggregate exists and before any message carries it (Flower
sends it next with the evaluate messages): a speaker-level release is charged before it leaves.
Order, and what a crash at each point leaves behind:

1. speaker-level ledger rows for the round, keyed by run *and* server attempt
   - crash before them: nothing was charged or sent; a restart redoes the round from the
     previous one (new attempt, new noise, charged then).
2. checkpoint (tensors, then JSON with the round's training metrics and the speakers charged)
   - crash before the JSON: the round is charged but was never sent (its noised aggregate died
     with the process); the restart redoes it as a new attempt and charges that too. The ledger
     over-counts this one round, never under-counts.
3. the messages carrying the new model (evaluation, the next round); after the evaluation the
   round's evaluation metrics join its checkpoint JSON, then its metrics line is written
   - crash before the line: the restart re-logs it from the checkpoint's JSON (without the
     evaluation metrics if the crash came before they were added).

Clients are a different matter: a round redone after a crash is trained and released again by
its clients, who charge their own utterance-level ledgers again (the plan's ``attempt`` changes),
because their first updates did leave the device.

Run directory layout::

    <run>/checkpoints/round-NNNNN.{safetensors,json}, best.json
    <run>/privacy_ledger.sqlite      speaker-level ledger (with speaker-level DP)
    <run>/metrics.jsonl, <run>/tensorboard/
"""

from __future__ import annotations

import logging
import os
import secrets
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from flwr.serverapp import Grid

from fedvox.server.aggregators import build_aggregator
from fedvox.server.checkpoints import Checkpoint, RoundCheckpoints
from fedvox.server.metrics import RoundLog
from fedvox.server.speaker_accounting import SpeakerAccounting
from fedvox.server.strategy import FedvoxStrategy, RoundRecord
from fedvox.shared.errors import ConfigError, FederationError
from fedvox.shared.privacy.ledger import Ledger
from fedvox.shared.runconfig import RunConfig
from fedvox.shared.wire import from_record, to_record

log = logging.getLogger(__name__)

RESUMABLE_KEYS = frozenset({"num-server-rounds", "round-timeout", "keep-checkpoints", "checkpoint-dir", "evaluate"})
"""Run-configuration keys a resumed run may change; any other change needs a new run."""


def fedvox_home() -> Path:
    """``$FEDVOX_HOME``, default ``~/.fedvox``: where runs without a checkpoint-dir go."""
    return Path(os.environ.get("FEDVOX_HOME", Path.home() / ".fedvox")).expanduser()


def run_directory(config: RunConfig) -> Path:
    """``checkpoint-dir``, or a fresh folder under ``$FEDVOX_HOME/runs``."""
    if config.checkpoint_dir:
        return Path(config.checkpoint_dir).expanduser().resolve()
    return fedvox_home() / "runs" / f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


class FederatedRun:
    """Drive a strategy through ``config.num_server_rounds`` rounds, resuming where it stopped.

    ``initial_state`` is the global trainable subset a fresh run starts from; ``base`` names the
    frozen model it belongs to (written into every checkpoint). ``seed`` makes sampling and
    noise reproducible (tests, simulations); by default it is drawn from the OS and never stored.
    """

    def __init__(
        self,
        config: RunConfig,
        initial_state: Mapping[str, torch.Tensor],
        *,
        base: Mapping[str, Any] | None = None,
        seed: int | None = None,
    ) -> None:
        self.config = config
        self.initial_state = dict(initial_state)
        self.base = dict(base or {})
        self.seed = secrets.randbits(63) if seed is None else seed
        self.run_dir = run_directory(config)
        self.store = RoundCheckpoints(self.run_dir / "checkpoints", config.keep_checkpoints)
        self.attempt = uuid.uuid4().hex
        self.completed = -1  # last committed round; -1 before the initial checkpoint
        self.stopped: str | None = None  # why the run stopped before its last round
        self.strategy: FedvoxStrategy | None = None
        self.speaker: SpeakerAccounting | None = None
        self.round_log: RoundLog | None = None
        self.metrics: dict[str, Any] = {}  # the last committed round's, until its evaluation is logged

    def execute(self, grid: Grid) -> int:
        """Run (or finish) the federation on ``grid``; returns the last committed round."""
        latest = self.store.latest()
        meta = latest.meta if latest else {}
        if latest is not None:
            _check_resumable(meta["run-config"], self.config)
            self.completed = latest.round
        self.run_id = meta.get("run-id", uuid.uuid4().hex)
        ledger = Ledger(self.run_dir) if self.config.speaker_dp.enabled else None
        if ledger is not None:
            self.speaker = SpeakerAccounting(ledger, self.run_id, self.config.stage, self.config.speaker_dp)
            self.speaker.sample_rate = meta.get("sample-rate")
        self.round_log = RoundLog(self.run_dir, first_round=self.completed + 1)
        try:
            if latest is not None:
                self._catch_up(latest)
            if self.completed >= self.config.num_server_rounds:
                log.info("run %s is complete (round %d); nothing to do", self.run_dir, self.completed)
                return self.completed
            aggregator = build_aggregator(self.config)
            if latest is not None:
                aggregator.load_state_dict(latest.strategy_state)
            self.strategy = FedvoxStrategy(
                self.config,
                aggregator,
                run_id=self.run_id,
                attempt=self.attempt,
                seed=self.seed,
                completed_round=max(self.completed, 0),
                population=meta.get("population"),
                speaker=self.speaker,
                on_release=self._commit_round,
                on_round_end=self._log_round,
            )
            arrays = to_record(latest.state if latest is not None else self.initial_state, "fp32")
            if latest is None:
                self._commit(0, from_record(arrays), None)
            log.info(
                "%s run %s in %s at round %d of %d",
                "resuming" if latest else "starting",
                self.run_id,
                self.run_dir,
                max(self.completed, 0) + 1,
                self.config.num_server_rounds,
            )
            try:
                self.strategy.start(
                    grid,
                    arrays,
                    num_rounds=self.config.num_server_rounds,
                    timeout=self.config.round_timeout,
                )
            except FederationError as exc:
                self.stopped = str(exc)
                log.warning("stopping after round %d: %s", self.completed, exc)
        finally:
            self.round_log.close()
            if ledger is not None:
                ledger.close()
        return self.completed

    # ------------------------------------------------------------------ commit
    def _commit_round(self, record: RoundRecord) -> None:
        """The strategy's ``on_release`` hook: charge and commit the round before its model is sent."""
        assert record.outcome is not None  # set by the strategy before it calls the hook
        self._commit(record.server_round, from_record(record.outcome), record)

    def _commit(self, server_round: int, state: Mapping[str, torch.Tensor], record: RoundRecord | None) -> None:
        """Ledger rows, then the checkpoint (module docstring); round 0 (no record) is the start."""
        started = time.monotonic()
        self.metrics = record.summary() if record else {}
        charged: list[str] = []
        if self.speaker is not None and record is not None and record.release is not None:
            charged = record.eligible_clients
            epsilons = list(self.speaker.charge(server_round, charged, self.attempt).values())
            if epsilons:
                self.metrics["epsilon-speaker-max"] = max(epsilons)
                self.metrics["epsilon-speaker-mean"] = sum(epsilons) / len(epsilons)
        meta = {
            "run-id": self.run_id,
            "attempt": self.attempt,
            "run-config": self.config.to_flat(),
            "base": self.base,
            "strategy": self.strategy.aggregator.name,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "metrics": self.metrics,
            "population": self.strategy.population,
            "sample-rate": self.speaker.sample_rate if self.speaker else None,
            "speaker-charged": charged,
            # the ledger's head once this round's speaker rows are in
            "ledger-head": self.speaker.ledger.head() if self.speaker else None,
        }
        self.store.save(server_round, state, meta, self.strategy.aggregator.state_dict())
        self.completed = server_round
        log.info("round %d charged and committed in %.2f s", server_round, time.monotonic() - started)

    def _log_round(self, record: RoundRecord) -> None:
        """The strategy's ``on_round_end`` hook: the committed round's metrics, evaluation included."""
        speaker = {k: v for k, v in self.metrics.items() if k.startswith("epsilon-speaker")}
        metrics = {**record.summary(), **speaker}
        if record.evaluate:
            self.store.annotate(record.server_round, metrics)
        self.round_log.write(record.server_round, metrics)

    def _catch_up(self, latest: Checkpoint) -> None:
        """Finish a commit a crash interrupted: the round's ledger rows (checkpoints written before
        the rows came first) and its metrics line."""
        charged = latest.meta.get("speaker-charged", [])
        if charged:
            self.speaker.charge(latest.round, charged, latest.meta["attempt"])
        if latest.round > 0:
            self.round_log.catch_up(latest.round, latest.meta["metrics"])


def _check_resumable(stored: Mapping[str, Any], config: RunConfig) -> None:
    current = config.to_flat()
    keys = (set(stored) | set(current)) - RESUMABLE_KEYS
    changed = sorted(k for k in keys if stored.get(k) != current.get(k))
    if changed:
        raise ConfigError(
            f"the run in {config.checkpoint_dir} was started with a different configuration "
            f"({', '.join(f'{k}: {stored.get(k)!r} -> {current.get(k)!r}' for k in changed)}); "
            f"only {', '.join(sorted(RESUMABLE_KEYS))} may change on resume. Restore the original "
            "values or choose a new checkpoint-dir"
        )


__all__ = ["RESUMABLE_KEYS", "FederatedRun", "fedvox_home", "run_directory"]
