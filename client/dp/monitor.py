"""Training telemetry: JSON lines and TensorBoard event files, plus memory readings.

Everything here stays on the device. Per-sample gradient statistics are computed from private
data without noise, so they are for the owner's eyes (and debugging), never for the server.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def peak_memory(device: torch.device) -> dict[str, float]:
    """Memory in MiB: peak allocated/reserved on CUDA (ROCm); on CPU the peak resident set size,
    and on Linux the current one, whole and anonymous (heap and tensors, without the libraries'
    file-backed pages, which the kernel drops and reloads under memory pressure)."""
    if device.type == "cuda":
        return {
            "peak_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20,
            "peak_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20,
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    readings = {"peak_rss_mib": rss / (2**20 if sys.platform == "darwin" else 2**10)}
    statm = Path("/proc/self/statm")
    if statm.exists():  # Linux: the resident set now, so growth over steps shows (the peak hides it)
        resident, file_backed = (int(field) for field in statm.read_text().split()[1:3])
        page = os.sysconf("SC_PAGE_SIZE") / 2**20
        readings["rss_mib"] = resident * page
        readings["rss_anon_mib"] = (resident - file_backed) * page
    return readings


class TrainingMonitor:
    """Append one record per step to ``metrics.jsonl`` and mirror scalars to TensorBoard."""

    def __init__(self, log_dir: str | Path | None) -> None:
        self.log_dir = Path(log_dir) if log_dir else None
        self._writer = None
        self._jsonl = None
        self.on_step: Callable[[int, dict[str, Any]], object] | None = None  # progress, per training step
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.log_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        record = {"time": time.time(), "kind": kind, "step": step, **metrics}
        if self._jsonl:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._writer:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{kind}/{key}", value, step)
        log.debug("%s step %d: %s", kind, step, metrics)
        if kind == "train" and self.on_step is not None:
            self.on_step(step, metrics)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
            self._jsonl = None
        if self._writer:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TrainingMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
