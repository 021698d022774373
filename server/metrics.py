"""Per-round metrics, as JSON lines (for scripts) and TensorBoard scalars (for people).

One line per committed round in ``<run>/metrics.jsonl``; scalars under ``<run>/tensorboard``,
tagged ``train/loss``, ``epsilon/speaker`` and so on. A round is logged after its checkpoint is
committed, so after a crash the log can lag the checkpoints by one round but never lead them;
:meth:`RoundLog.catch_up` appends the missing line on resume, and TensorBoard's ``purge_step``
drops any scalars of rounds that are being redone.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class RoundLog:
    """Append-only per-round metrics under ``run_dir``."""

    def __init__(self, run_dir: str | Path, first_round: int = 1) -> None:
        from torch.utils.tensorboard import SummaryWriter  # heavy import, only when a run starts

        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=first_round)

    def last_round(self) -> int:
        """The newest round in the JSON-lines file (0 if none)."""
        if not self.path.is_file():
            return 0
        rounds = [json.loads(line)["round"] for line in self.path.read_text().splitlines() if line.strip()]
        return max(rounds, default=0)

    def write(self, server_round: int, metrics: Mapping[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"round": server_round, **metrics}, sort_keys=True) + "\n")
        for key, value in _scalars(metrics):
            self.writer.add_scalar(key, value, server_round)
        self.writer.flush()

    def catch_up(self, server_round: int, metrics: Mapping[str, Any]) -> None:
        """Log a committed round whose line was lost to a crash (no-op if it is there)."""
        if self.last_round() < server_round:
            log.info("metrics: re-logging committed round %d", server_round)
            self.write(server_round, metrics)

    def close(self) -> None:
        self.writer.close()


def _scalars(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """``(tag, value)`` for every finite number; ``train-loss`` becomes ``train/loss``."""
    out: list[tuple[str, float]] = []
    for key, value in metrics.items():
        name = prefix + key if prefix else key.replace("-", "/", 1)
        if isinstance(value, Mapping):
            out.extend(_scalars(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out.append((name, float(value)))
    return out


__all__ = ["RoundLog"]
