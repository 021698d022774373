"""A device's own record of the accountant's answers, kept across its processes.

Every message a device answers runs in a new process, and each train message asks the PRV
accountant the same questions the previous one asked (the epsilon after this round was the
last reply's ``epsilon-next``), 1-2 s each on a loaded 2-core machine. This file keeps those
answers: exact memoisation, keyed on every input of the evaluation (the compacted history, delta,
the accountant and its library's version), so a stored value is only ever what the accountant
returned for exactly that question. It never leaves the device and holds nothing the ledger next
to it does not (noise multipliers, sample rates, step counts). A missing, unreadable or stale
file only costs the evaluation again; writes are atomic (:mod:`fedvox.shared.atomic`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from fedvox.shared.atomic import atomic_write_text

log = logging.getLogger(__name__)

FILE = "epsilon-cache.json"
"""Its name in the device's ledger folder."""
MAX_ENTRIES = 256
"""The newest answers kept (a run asks a handful per round; calibration a few dozen per plan)."""


def question(entries: tuple[tuple[float, float, int], ...], delta: float, accountant: str, library: str) -> str:
    """The key of one evaluation: all of its inputs, floats written exactly (``repr`` round-trips)."""
    return json.dumps([accountant, library, delta, [list(entry) for entry in entries]])


class EpsilonStore:
    """``{question: epsilon}`` in one JSON file, newest last."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def get(self, key: str) -> float | None:
        value = self._read().get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def put(self, key: str, value: float) -> None:
        answers = self._read()
        answers.pop(key, None)
        answers[key] = value
        kept = dict(list(answers.items())[-MAX_ENTRIES:])
        try:
            atomic_write_text(self.path, json.dumps(kept))
        except OSError as exc:  # a read-only ledger folder: the evaluation is simply repeated
            log.debug("cannot keep an accountant answer in %s: %s", self.path.name, exc)

    def _read(self) -> dict[str, object]:
        try:
            answers = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.debug("ignoring an unreadable %s: %s", self.path.name, exc)
            return {}
        return answers if isinstance(answers, dict) else {}
