"""Where a deployed ClientApp message's time went, kept on the device (never sent).

One JSON line per message in ``<log-dir>/clientapp-times.jsonl`` (the enrolled device's
``device/logs``, from the node config's ``log-dir``): when the process that answers it was
launched, when the fedvox handler started and ended, and how long its DP steps took. Step times
follow the Poisson-sampled batch sizes, so they are data-dependent: like the trainer's own
telemetry they stay on the device, for its owner and for ``bench/deploy_round.py``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from fedvox.shared.app_host import FORKED_ENV, LAUNCHED_ENV

log = logging.getLogger(__name__)

TIMES_FILE = "clientapp-times.jsonl"


def launched_at() -> float:
    """When the command answering this message was started (seconds since the epoch): the
    ``flwr-clientapp`` launcher's start for a child of the ClientApp host, else this process's."""
    stamp = os.environ.get(LAUNCHED_ENV)
    return float(stamp) if stamp else psutil.Process().create_time()


@dataclass
class MessageClock:
    """The times of one message, filled in as the handler goes."""

    kind: str
    launched: float = field(default_factory=launched_at)
    forked: float = field(default_factory=lambda: float(os.environ.get(FORKED_ENV) or 0.0))
    """When the ClientApp host forked this process (0: Flower started it)."""
    started: float = field(default_factory=time.time)
    ended: float = 0.0
    run_id: str = ""
    round: int = 0
    training_s: float = 0.0

    def record(self, log_dir: Path | None) -> None:
        """Append this message's line to ``log_dir`` (no folder: nothing is kept)."""
        if log_dir is None:
            return
        self.ended = time.time()
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            with open(log_dir / TIMES_FILE, "a", encoding="utf-8") as out:
                out.write(json.dumps(asdict(self), sort_keys=True) + "\n")
        except OSError as exc:  # telemetry must never cost a reply
            log.warning("could not record the message's times in %s: %s", log_dir, exc)


def read_times(log_dir: Path) -> list[dict[str, float | str | int]]:
    """Every recorded message of ``log_dir``, oldest first (a torn last line is skipped)."""
    path = Path(log_dir) / TIMES_FILE
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


__all__ = ["TIMES_FILE", "MessageClock", "launched_at", "read_times"]
