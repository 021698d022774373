"""Global checkpoints: one per completed round, written so a crash never leaves a half round.

A round ``r`` is two files in the run's ``checkpoints/`` folder:

``round-0000r.safetensors``  the global trainable subset (``model/<name>``) and any strategy
                             tensors such as FedAdam's moments (``strategy/<name>``)
``round-0000r.json``         metadata: round, run configuration, metrics, ledger position,
                             accountant and sampler state, the tensors' SHA-256

Both are written atomically and the JSON last, so the JSON's presence is the commit mark: a
round without it never happened. The store keeps the last ``keep`` rounds and the best one
(named in ``best.json``) and deletes the rest, JSON first.

The best round compares like with like. Only a round that aggregated (its model changed) is a
candidate, and validation losses are compared only between rounds that the same devices
evaluated (``val-clients``): a loss over one device's examples says nothing against a loss over
seven. When the evaluators change, comparison starts again from that round. Without any
comparable loss, the export takes the newest aggregated round (:meth:`RoundCheckpoints.export_choice`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedvox.shared.atomic import atomic_write_text
from fedvox.shared.errors import CheckpointError
from fedvox.shared.models.interop import load_safetensors, save_safetensors

log = logging.getLogger(__name__)

MODEL_PREFIX = "model/"
STRATEGY_PREFIX = "strategy/"
_ROUND_FILE = re.compile(r"round-(\d{5})\.json")


@dataclass(frozen=True)
class Checkpoint:
    """One committed round."""

    round: int
    state: dict[str, torch.Tensor]
    strategy_state: dict[str, torch.Tensor]
    meta: dict[str, Any]


class RoundCheckpoints:
    """Per-round global checkpoints in ``folder`` (see the module docstring)."""

    def __init__(self, folder: str | Path, keep: int) -> None:
        if keep < 1:
            raise CheckpointError(f"keep must be at least 1 checkpoint, got {keep}")
        self.folder = Path(folder)
        self.keep = keep

    def tensors_path(self, server_round: int) -> Path:
        return self.folder / f"round-{server_round:05d}.safetensors"

    def meta_path(self, server_round: int) -> Path:
        return self.folder / f"round-{server_round:05d}.json"

    def rounds(self) -> list[int]:
        """Committed rounds, oldest first."""
        if not self.folder.is_dir():
            return []
        found = (_ROUND_FILE.fullmatch(p.name) for p in self.folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def save(
        self,
        server_round: int,
        state: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any],
        strategy_state: Mapping[str, torch.Tensor] | None = None,
    ) -> Path:
        """Commit round ``server_round``; returns the tensors' path."""
        tensors = {MODEL_PREFIX + k: v.float() for k, v in state.items()}
        tensors.update({STRATEGY_PREFIX + k: v for k, v in (strategy_state or {}).items()})
        path = self.tensors_path(server_round)
        save_safetensors(tensors, path, metadata={"round": server_round, "format": "fedvox-global-subset"})
        record = dict(meta, round=server_round, tensors=path.name, sha256=_sha256(path))
        atomic_write_text(self.meta_path(server_round), json.dumps(record, indent=1, sort_keys=True))
        self._update_best(server_round, record)
        self._prune()
        return path

    def annotate(self, server_round: int, metrics: Mapping[str, Any]) -> None:
        """Replace committed round ``server_round``'s metrics (its evaluation came after the commit)."""
        path = self.meta_path(server_round)
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read checkpoint metadata {path}: {exc}") from exc
        record["metrics"] = dict(metrics)
        atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True))
        self._update_best(server_round, record)

    def load(self, server_round: int) -> Checkpoint:
        meta_path = self.meta_path(server_round)
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read checkpoint metadata {meta_path}: {exc}") from exc
        path = self.folder / meta["tensors"]
        if _sha256(path) != meta["sha256"]:
            raise CheckpointError(
                f"{path} does not match the SHA-256 recorded in {meta_path.name}; the file was "
                "changed after it was written: restore it or delete both files of that round"
            )
        tensors, _ = load_safetensors(path)
        return Checkpoint(
            round=server_round,
            state=_strip(tensors, MODEL_PREFIX),
            strategy_state=_strip(tensors, STRATEGY_PREFIX),
            meta=meta,
        )

    def latest(self) -> Checkpoint | None:
        """The newest committed round, or ``None`` for a fresh run."""
        rounds = self.rounds()
        return self.load(rounds[-1]) if rounds else None

    def best_round(self) -> int | None:
        best = self._read_best()
        return best["round"] if best else None

    def export_choice(self) -> tuple[int, str]:
        """The round to export by default and why: the best round, else the newest that aggregated,
        else the newest committed one."""
        rounds = self.rounds()
        if not rounds:
            raise CheckpointError(f"{self.folder} holds no committed round")
        best = self._read_best()
        if best is not None and best["round"] in rounds:
            since, evaluators = best.get("since", best["round"]), len(best.get("val-clients", []))
            return best["round"], (
                f"lowest validation loss ({best['val-loss']:.4g}) of the aggregated rounds from round {since} on, "
                f"all evaluated by the same {evaluators} device(s)"
            )
        for server_round in reversed(rounds):
            if self._meta(server_round).get("metrics", {}).get("aggregated"):
                return server_round, "newest round whose aggregation changed the model (no comparable validation loss)"
        return rounds[-1], "newest committed round (no round aggregated)"

    def _meta(self, server_round: int) -> dict[str, Any]:
        try:
            return json.loads(self.meta_path(server_round).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read checkpoint metadata {self.meta_path(server_round)}: {exc}") from exc

    def _read_best(self) -> dict[str, Any] | None:
        path = self.folder / "best.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def _update_best(self, server_round: int, record: Mapping[str, Any]) -> None:
        """``best.json`` after a commit (see the module docstring for what is comparable)."""
        metrics = record.get("metrics", {})
        loss = metrics.get("val-loss")
        if loss is None or not metrics.get("aggregated"):
            return
        evaluators = sorted(metrics.get("val-clients", []))
        best = self._read_best()
        if best is not None and best.get("val-clients") == evaluators:
            if loss >= best["val-loss"]:
                return
            since = best.get("since", best["round"])
        else:
            since = server_round  # new evaluators: comparison starts here
        entry = {"round": server_round, "val-loss": loss, "val-clients": evaluators, "since": since}
        atomic_write_text(self.folder / "best.json", json.dumps(entry))

    def _prune(self) -> None:
        rounds = self.rounds()
        keep = set(rounds[-self.keep :])
        best = self.best_round()
        if best is not None:
            keep.add(best)
        for old in rounds:
            if old not in keep:
                self.meta_path(old).unlink(missing_ok=True)  # uncommit first
                self.tensors_path(old).unlink(missing_ok=True)
                log.debug("pruned checkpoint of round %d", old)


def _strip(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint tensors {path}: {exc.strerror}") from exc
    return digest.hexdigest()


__all__ = ["Checkpoint", "RoundCheckpoints"]
