"""The work beside a federation: baselines and speech-quality scoring in one pool of processes.

The federation keeps ``host.workers`` Ray actors busy; beside it, one pool of as many processes
runs every other job of the run, each as soon as what it needs exists, so no core waits for a
phase to end. The pool runs at :data:`NICENESS`: it takes the cores the federation leaves idle
(Ray's start, each round's barrier, the server's aggregation) without slowing its clients.

1. at the run's start, the baselines, the centralised one first (the longest single job), then
   the local-only ones; then the speech-quality scoring of the recordings (the ceiling) and,
   once the federation has written its round 0, of the base model;
2. each local-only model is scored as soon as its baseline has trained, the centralised one too;
3. the federated model once the federation has committed its last round (:meth:`SideWork.federated`).

Every job returns plain data; the run's report is built from :attr:`SideWork.baselines` and
:meth:`SideWork.speech_quality`. Baselines and scores are reused from earlier runs in the same
simulation folder where everything they depend on is the same (:mod:`.reuse`).
Spans are wall-clock times (``time.time()``, comparable across processes) so the report can show
which phases overlapped; each job also reports its process's CPU seconds.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from fedvox.client.device import probe
from fedvox.client.host import prepare_training_process
from fedvox.shared.runconfig import RunConfig
from fedvox.simulations import reuse
from fedvox.simulations.baselines import central_baseline
from fedvox.simulations.quality.compare import Contender, Spoken, collect_speech, score_recordings, speak
from fedvox.simulations.quality.scoring import TestItem

log = logging.getLogger(__name__)

NICENESS = 10
"""How much lower the pool's CPU priority is than the run's (``nice``): at the same priority the
pool's two processes took half of the 2 cores from the federation's two ClientApps (a round-1 DP
step 2.8-4.2 s instead of 1.15 s alone) and the run waited on its slowed rounds; niced, the pool
runs on what the federation leaves idle and on every core once it is done."""


def _start_worker(threads: int, niceness: int) -> None:
    prepare_training_process(threads)
    os.nice(niceness)


def _speak_job(config: RunConfig, contender: Contender, items: Sequence[TestItem], seed: int) -> dict[str, Any]:
    started, cpu = time.time(), time.process_time()
    scores = speak(config, contender, items, seed)
    return {
        "name": contender.name,
        "speakers": contender.speakers,
        "scores": scores,
        "span": (started, time.time()),
        "cpu-s": time.process_time() - cpu,
    }


def _baseline_job(fn: Callable, job: Any, reuse_root: Path | None, name: str | None) -> dict[str, Any]:
    """Train and score one baseline; keep it for later runs under ``name`` (None: not kept)."""
    result = fn(job)
    if reuse_root is not None and name is not None:
        reuse.Store(reuse_root).keep(name, result, job.folder)
    return result


def _recordings_job(items: Sequence[TestItem], cache: Path | None) -> dict[str, Any]:
    started, cpu = time.time(), time.process_time()
    scores = score_recordings(items, cache)
    return {"scores": scores, "span": (started, time.time()), "cpu-s": time.process_time() - cpu}


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
    ``items``: the speech-quality test items (none: no scoring); ``local_state``: where a
    finished local-only baseline's final state is; ``reuse_root``: the simulation folder's
    :mod:`.reuse` store (None: nothing reused or kept).
    """

    def __init__(
        self,
        config: RunConfig,
        baselines: Sequence[tuple[Callable, Any]],
        items: Sequence[TestItem],
        *,
        local_state: Callable[[dict[str, Any]], Contender],
        central_state: Path,
        recordings_cache: Path | None,
        reuse_root: Path | None,
        seed: int,
        workers: int,
        threads: int,
        spans: Spans,
    ) -> None:
        self.config, self.items, self.seed = config, tuple(items), seed
        self.jobs = sorted(baselines, key=lambda job: job[0] is not central_baseline)  # the longest first
        self.local_state, self.central_state = local_state, central_state
        self.recordings_cache = recordings_cache
        self.store = reuse.Store(reuse_root) if reuse_root is not None else None
        self.spans, self.workers = spans, workers
        self.pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=get_context("spawn"),
            initializer=_start_worker,
            initargs=(threads, NICENESS),
        )
        self.speech: list[tuple[str | None, Future]] = []  # (reuse key of the scores, job)
        self.kept_speech: list[Spoken] = []
        self.recordings: Future | None = None
        self.baselines: dict[str, Any] = {"local": [], "central": None}
        self._lock = threading.Lock()
        self._host: dict[str, Any] | None = None

    def _key(self, parts: dict[str, Any]) -> str:
        if self._host is None:  # probed once: it asks the drivers
            self._host = probe().to_dict()
        return reuse.key({**parts, "base": reuse.base_digest(self.config), "host": self._host})

    # ------------------------------------------------------------------ submitting
    def run_baselines(self, cancelled: threading.Event, base: Callable[[], Contender | None]) -> None:
        """Submit every baseline (or reuse it) and the recordings' scoring, the base model's once
        ``base`` returns it (it waits for the federation's round 0; None: not scored), then score
        each baseline as it finishes (runs in a thread of its own until the last baseline is done)."""
        if cancelled.is_set():
            return
        started = time.time()
        futures, kept = {}, []
        for fn, job in self.jobs:
            if self.store is None:
                futures[self.pool.submit(_baseline_job, fn, job, None, None)] = fn
                continue
            name = self._key(job.reuse_parts())
            result = self.store.result(name)
            if result is None:
                futures[self.pool.submit(_baseline_job, fn, job, self.store.root, name)] = fn
            else:
                self.store.restore(name, job.folder)
                kept.append((fn, {**result, "reused": True}))
        if self.items:
            self.recordings = self.pool.submit(_recordings_job, self.items, self.recordings_cache)
            contender = base()
            if contender is not None and not cancelled.is_set():
                self._score(contender)
        for fn, result in kept:
            self._trained(fn, result)
        for future in as_completed(futures):
            self._trained(futures[future], future.result())
        self.baselines["local"].sort(key=lambda r: r["partition"])
        if futures or kept:
            self.spans.add("baselines", started, time.time())
            log.info(
                "baselines done: %d local-only, %s central (%d reused from earlier runs)",
                len(self.baselines["local"]),
                "one" if self.baselines["central"] else "no",
                len(kept),
            )

    def _trained(self, fn: Callable, result: dict[str, Any]) -> None:
        """Record a finished baseline and score its model."""
        if fn is central_baseline:
            self.baselines["central"] = result
            if self.items and self.central_state.is_file():
                self._score(Contender("central", torch.load(self.central_state, weights_only=True)))
        else:
            self.baselines["local"].append(result)
            if self.items:
                self._score(self.local_state(result))

    def federated(self, state: dict[str, torch.Tensor]) -> None:
        """Score the federation's final global model."""
        if self.items:
            self._score(Contender("federated", state), keep=False)  # a new federation's model each run

    def _score(self, contender: Contender, *, keep: bool = True) -> None:
        """Reuse the contender's scores if an earlier run kept them; otherwise one job per worker,
        each speaking a share of the contender's speakers (the federated model is scored last,
        when the other jobs are done: split, it keeps every worker busy)."""
        speakers = sorted(
            {i.speaker for i in self.items if contender.speakers is None or i.speaker in contender.speakers}
        )
        name = None
        if self.store is not None and keep:
            name = self._key(
                {
                    "scores-of": reuse.state_digest(contender.state),
                    "voice": reuse.settings(self.config, private=False, training=False),
                    "items": reuse.items_digest([i for i in self.items if i.speaker in speakers]),
                    "seed": self.seed,
                }
            )
            result = self.store.result(name)
            if result is not None:
                with self._lock:
                    self.kept_speech.append(
                        Spoken(contender.name, contender.speakers, result["scores"], 0.0, 0.0, True)
                    )
                return
        shares = [speakers[k :: self.workers] for k in range(min(self.workers, len(speakers)))]
        with self._lock:
            for share in shares:
                items = [i for i in self.items if i.speaker in share]
                self.speech.append((name, self.pool.submit(_speak_job, self.config, contender, items, self.seed)))

    # ------------------------------------------------------------------ results
    def speech_quality(self) -> dict[str, Any] | None:
        """Every contender's scores, as ``quality.json`` holds them (None: nothing scored); scores
        computed now are kept for later runs."""
        if self.recordings is None:
            return None
        recordings = self.recordings.result()
        spoken = [(name, f.result()) for name, f in self.speech]
        if self.store is not None:
            by_key: dict[str, dict[str, Any]] = {}
            for name, s in spoken:
                if name is not None:
                    by_key.setdefault(name, {}).update(s["scores"])
            for name, scores in by_key.items():
                self.store.keep(name, {"scores": scores})
        spans = [recordings["span"], *(s["span"] for _, s in spoken)]
        start, end = min(s for s, _ in spans), max(e for _, e in spans)
        self.spans.add("speech-quality", start, end)
        return collect_speech(
            self.items,
            recordings["scores"],
            [
                *(
                    Spoken(s["name"], s["speakers"], s["scores"], s["span"][1] - s["span"][0], s["cpu-s"])
                    for _, s in spoken
                ),
                *self.kept_speech,
            ],
            recordings["span"][1] - recordings["span"][0],
            wall_seconds=end - start,
            recordings_cpu_seconds=recordings["cpu-s"],
        )

    def close(self, cancel: bool = False) -> None:
        self.pool.shutdown(wait=True, cancel_futures=cancel)


__all__ = ["NICENESS", "SideWork", "Spans"]
