"""The work beside a federation: baselines and speech-quality scoring in one pool of processes.

The federation keeps ``host.workers`` Ray actors busy; beside it, one pool of as many processes
runs every other job of the run, each as soon as what it needs exists, so no core waits for a
phase to end:

1. once Ray is up (a client has trained: a raylet starting beside busy jobs timed out on a loaded
   host), the baselines, the centralised one first (the longest single job), then the local-only
   ones; then the speech-quality scoring of what needs no training, the recordings (the
   ceiling) and the base model;
2. each local-only model is scored as soon as its baseline has trained, the centralised one too;
3. the federated model once the federation has committed its last round (:meth:`SideWork.federated`).

Every job returns plain data; the run's report is built from what :meth:`SideWork.results` returns.
Spans are wall-clock times (``time.time()``, comparable across processes) so the report can show
which phases overlapped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from fedvox.shared.runconfig import RunConfig
from fedvox.simulations.baselines import central_baseline
from fedvox.simulations.quality.compare import Contender, Spoken, collect_speech, score_recordings, speak
from fedvox.simulations.quality.scoring import TestItem

log = logging.getLogger(__name__)


def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _speak_job(config: RunConfig, contender: Contender, items: Sequence[TestItem], seed: int) -> dict[str, Any]:
    started = time.time()
    scores = speak(config, contender, items, seed)
    return {"name": contender.name, "speakers": contender.speakers, "scores": scores, "span": (started, time.time())}


def _recordings_job(items: Sequence[TestItem], cache: Path | None) -> dict[str, Any]:
    started = time.time()
    scores = score_recordings(items, cache)
    return {"scores": scores, "span": (started, time.time())}


@dataclass
class Spans:
    """Wall-clock spans of a run's phases (``time.time()``), merged per phase."""

    spans: dict[str, tuple[float, float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, phase: str, start: float, end: float) -> None:
        with self.lock:
            low, high = self.spans.get(phase, (start, end))
            self.spans[phase] = (min(low, start), max(high, end))


class SideWork:
    """Baselines and speech-quality jobs of one run in a pool of ``workers`` processes.

    ``baselines``: ``(fn, job)`` pairs (``local_baseline`` / ``central_baseline`` jobs);
    ``items``: the speech-quality test items (none: no scoring); ``base``: the base model's
    trainable state; ``local_state``: where a finished local-only baseline's final state is.
    """

    def __init__(
        self,
        config: RunConfig,
        baselines: Sequence[tuple[Callable, Any]],
        items: Sequence[TestItem],
        *,
        base: Contender | None,
        local_state: Callable[[dict[str, Any]], Contender],
        central_state: Path,
        recordings_cache: Path | None,
        seed: int,
        workers: int,
        threads: int,
        spans: Spans,
    ) -> None:
        self.config, self.items, self.seed = config, tuple(items), seed
        self.jobs = sorted(baselines, key=lambda job: job[0] is not central_baseline)  # the longest first
        self.base, self.local_state, self.central_state = base, local_state, central_state
        self.recordings_cache = recordings_cache
        self.spans, self.workers = spans, workers
        self.pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=get_context("spawn"), initializer=_start_worker, initargs=(threads,)
        )
        self.speech: list[Future] = []
        self.recordings: Future | None = None
        self.baselines: dict[str, Any] = {"local": [], "central": None}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ submitting
    def run_baselines(self, cancelled: threading.Event) -> None:
        """Submit every baseline and the scoring that needs no training, then score each baseline
        as it finishes (runs in a thread of its own until the last baseline is done)."""
        if cancelled.is_set():
            return
        started = time.time()
        futures = {self.pool.submit(fn, job): fn for fn, job in self.jobs}
        if self.items:
            self.recordings = self.pool.submit(_recordings_job, self.items, self.recordings_cache)
            if self.base is not None:
                self._score(self.base)
        for future in as_completed(futures):
            result = future.result()
            if futures[future] is central_baseline:
                self.baselines["central"] = result
                if self.items and self.central_state.is_file():
                    self._score(Contender("central", torch.load(self.central_state, weights_only=True)))
            else:
                self.baselines["local"].append(result)
                if self.items:
                    self._score(self.local_state(result))
        self.baselines["local"].sort(key=lambda r: r["partition"])
        if futures:
            self.spans.add("baselines", started, time.time())
            log.info(
                "baselines done: %d local-only, %s central",
                len(self.baselines["local"]),
                "one" if self.baselines["central"] else "no",
            )

    def federated(self, state: dict[str, torch.Tensor]) -> None:
        """Score the federation's final global model."""
        if self.items:
            self._score(Contender("federated", state))

    def _score(self, contender: Contender) -> None:
        """One job per worker, each speaking a share of the contender's speakers (the federated
        model is scored last, when the other jobs are done: split, it keeps every worker busy)."""
        speakers = sorted(
            {i.speaker for i in self.items if contender.speakers is None or i.speaker in contender.speakers}
        )
        shares = [speakers[k :: self.workers] for k in range(min(self.workers, len(speakers)))]
        with self._lock:
            for share in shares:
                items = [i for i in self.items if i.speaker in share]
                self.speech.append(self.pool.submit(_speak_job, self.config, contender, items, self.seed))

    # ------------------------------------------------------------------ results
    def speech_quality(self) -> dict[str, Any] | None:
        """Every submitted scoring job's result, as ``quality.json`` holds it (None: none submitted)."""
        if self.recordings is None:
            return None
        recordings = self.recordings.result()
        spoken = [f.result() for f in self.speech]
        spans = [recordings["span"], *(s["span"] for s in spoken)]
        start, end = min(s for s, _ in spans), max(e for _, e in spans)
        self.spans.add("speech-quality", start, end)
        return collect_speech(
            self.items,
            recordings["scores"],
            [Spoken(s["name"], s["speakers"], s["scores"], s["span"][1] - s["span"][0]) for s in spoken],
            recordings["span"][1] - recordings["span"][0],
            wall_seconds=end - start,
        )

    def close(self, cancel: bool = False) -> None:
        self.pool.shutdown(wait=True, cancel_futures=cancel)


__all__ = ["SideWork", "Spans"]
