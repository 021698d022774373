"""Local training checkpoints: written atomically, the last few kept, resumable after a kill.

A checkpoint holds what continuing needs and nothing private beyond what the release already
made public: the trainable subset after the release, the optimizers' states, the step counters
and the random generators' states. Restoring the noise generator's state means a segment redone
after a kill draws the same noise, so it is the same release the ledger already holds (if it got
that far) rather than a second one.
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path
from typing import Any

import torch

from fedvox.shared.atomic import atomic_write_bytes
from fedvox.shared.errors import CheckpointError

log = logging.getLogger(__name__)

_NAME = re.compile(r"step-(\d{8})\.pt")


class SegmentCheckpoints:
    """``folder/step-00000040.pt`` files; keeps the newest ``keep``."""

    def __init__(self, folder: str | Path, keep: int = 3) -> None:
        if keep < 1:
            raise CheckpointError("keep at least one checkpoint")
        self.folder = Path(folder)
        self.keep = keep

    def steps(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := _NAME.fullmatch(p.name)))

    def path(self, step: int) -> Path:
        return self.folder / f"step-{step:08d}.pt"

    def save(self, step: int, payload: dict[str, Any]) -> Path:
        buffer = io.BytesIO()
        torch.save({"step": step, **payload}, buffer)
        path = self.path(step)
        atomic_write_bytes(path, buffer.getvalue())
        for old in self.steps()[: -self.keep]:
            self.path(old).unlink(missing_ok=True)
        log.info("checkpoint %s", path)
        return path

    def latest(self) -> dict[str, Any] | None:
        """The newest checkpoint, or ``None``; raises :class:`CheckpointError` if it is unreadable."""
        steps = self.steps()
        if not steps:
            return None
        path = self.path(steps[-1])
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"cannot read checkpoint {path} ({exc}); delete it to resume from the one before"
            ) from exc
