"""Speech quality of a run's models on one test set: recordings, base, federated, local only, central.

Every model speaks every test item of the speakers it is compared on (held-out sentences, each
prompted with another held-out recording of the same speaker) and each utterance is scored
(:mod:`.scoring`). The recordings are scored too: the ceiling. The raw per-item scores are
written, so intervals and verdicts are computed from the file (``simulations.report``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedvox.shared.atomic import atomic_write_text
from fedvox.shared.errors import FedvoxError
from fedvox.shared.runconfig import RunConfig
from fedvox.simulations.quality import scoring
from fedvox.simulations.quality.scoring import TestItem

log = logging.getLogger(__name__)

RECORDINGS = "recordings"
MAX_SECONDS = 8.0
"""Longest synthesis per item; also at most :data:`LENGTH_FACTOR` times the recording plus 1 s."""
LENGTH_FACTOR = 1.5


@dataclass(frozen=True)
class Contender:
    """A model to score: its trainable state and the speakers it is compared on (None: all)."""

    name: str
    state: Mapping[str, torch.Tensor]
    speakers: frozenset[str] | None = None


def _seconds(item: TestItem) -> float:
    import soundfile as sf

    return sf.info(item.recording).duration


def speak(config: RunConfig, contender: Contender, items: Sequence[TestItem], seed: int) -> dict[str, Any]:
    """Synthesise and score every item of ``contender``'s speakers: ``{item key: {metric: value}}``."""
    from fedvox.client.synthesize import read_reference, synthesize
    from fedvox.shared.audio import SAMPLE_RATE
    from fedvox.shared.semantic import tokenizer_spec
    from fedvox.simulations.sample import build_voice

    voice = build_voice(config, contender.state)
    tokenizer = tokenizer_spec().build()
    scores: dict[str, Any] = {}
    for item in items:
        if contender.speakers is not None and item.speaker not in contender.speakers:
            continue
        try:
            wave = synthesize(
                voice,
                item.text,
                item.language,
                read_reference(item.prompt),
                tokenizer,
                reference_text=item.prompt_text,
                reference_language=item.language,
                seed=seed,
                max_seconds=min(MAX_SECONDS, LENGTH_FACTOR * _seconds(item) + 1.0),
            )
        except FedvoxError as exc:  # e.g. s1 produced no tokens: the model said nothing
            log.debug("%s said nothing for one item: %s", contender.name, exc)
            scores[item.key] = {
                "similarity": None,
                "wer": 1.0 if item.language == "en" else None,
                "mcd": None,
                "speech": 0.0,
            }
            continue
        scores[item.key] = scoring.score(wave.numpy(), SAMPLE_RATE, item)
    return scores


def score_recordings(items: Sequence[TestItem], cache: Path | None) -> dict[str, Any]:
    """The ceiling, reused from ``cache`` for recordings scored before (same file, size and time)."""
    known = json.loads(cache.read_text()) if cache is not None and cache.is_file() else {}
    scores = {}
    for item in items:
        stat = item.recording.stat()
        tag = f"{item.key}|{item.recording}|{stat.st_size}|{stat.st_mtime_ns}|{'/'.join(map(str, item.voice))}"
        if tag not in known:
            known[tag] = scoring.score_recording(item)
        scores[item.key] = known[tag]
    if cache is not None:
        atomic_write_text(cache, json.dumps(known, indent=1) + "\n")
    return scores


def evaluate_speech(
    config: RunConfig,
    items: Sequence[TestItem],
    contenders: Sequence[Contender],
    seed: int = 0,
    recordings_cache: Path | None = None,
) -> dict[str, Any]:
    """Scores of the recordings (reused across runs through ``recordings_cache``) and of every
    contender on ``items``, with timings."""
    from fedvox.shared.cli import progress

    started = time.perf_counter()
    scores: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    with progress() as bar:
        task = bar.add_task("speech quality", total=len(contenders) + 1)
        t = time.perf_counter()
        scores[RECORDINGS] = score_recordings(items, recordings_cache)
        seconds[RECORDINGS] = time.perf_counter() - t
        bar.advance(task)
        for contender in contenders:  # contenders of one name (each client's local model) share a column
            t = time.perf_counter()
            scores.setdefault(contender.name, {}).update(speak(config, contender, items, seed))
            seconds[contender.name] = seconds.get(contender.name, 0.0) + time.perf_counter() - t
            bar.advance(task)
    speakers: dict[str, set[str] | None] = {}
    for c in contenders:
        everyone = c.speakers is None or speakers.get(c.name, set()) is None
        speakers[c.name] = None if everyone else speakers.get(c.name, set()) | c.speakers
    return {
        "items": {
            item.key: {"speaker": item.speaker, "language": item.language, "index": item.index} for item in items
        },
        "speakers": {name: sorted(s) if s is not None else None for name, s in speakers.items()},
        "scores": scores,
        "seconds": seconds,
        "total-seconds": time.perf_counter() - started,
    }


__all__ = ["RECORDINGS", "Contender", "evaluate_speech", "score_recordings", "speak"]
