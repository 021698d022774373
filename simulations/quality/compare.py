"""Speech quality of a run's models on one test set: recordings, base, federated, local only, central.

Every model speaks every test item of the speakers it is compared on (held-out sentences, each
prompted with another held-out recording of the same speaker) and each utterance is scored
(:mod:`.scoring`). The recordings are scored too: the ceiling. Each model is one job
(``simulations.sidework`` runs them beside the baselines); :func:`collect_speech` puts the raw
per-item scores into one document, so intervals and verdicts are computed from the file
(``simulations.report``).
"""

from __future__ import annotations

import json
import logging
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


@dataclass(frozen=True)
class Spoken:
    """One contender's scores (:func:`speak`), the seconds they took and the CPU seconds they used."""

    name: str
    speakers: frozenset[str] | None
    scores: dict[str, Any]
    seconds: float
    cpu_seconds: float = 0.0
    reused: bool = False  # kept by an earlier run with the same model, items and seed (simulations.reuse)


ORDER = ("base", "federated", "local only", "central")
"""Column order of the models (then any other, by name)."""


def collect_speech(
    items: Sequence[TestItem],
    recordings: dict[str, Any],
    spoken: Sequence[Spoken],
    recordings_seconds: float,
    *,
    wall_seconds: float,
    recordings_cpu_seconds: float = 0.0,
) -> dict[str, Any]:
    """``quality.json``: the recordings' and every contender's scores on ``items``, the speakers
    each model is compared on, and timings (``seconds``: each model's scoring, summed over its
    jobs; ``cpu-seconds``: their processes' CPU time, likewise; ``reused``: models with scores from
    an earlier run; ``total-seconds``: the wall clock from the first job's start to the last one's end)."""
    rank = {name: i for i, name in enumerate(ORDER)}
    scores: dict[str, Any] = {RECORDINGS: recordings}
    seconds: dict[str, float] = {RECORDINGS: recordings_seconds}
    cpu: dict[str, float] = {RECORDINGS: recordings_cpu_seconds}
    reused: set[str] = set()
    speakers: dict[str, set[str] | None] = {}
    for s in sorted(spoken, key=lambda s: (rank.get(s.name, len(ORDER)), s.name)):
        scores.setdefault(s.name, {}).update(
            s.scores
        )  # contenders of one name (each client's local model) share a column
        seconds[s.name] = seconds.get(s.name, 0.0) + s.seconds
        cpu[s.name] = cpu.get(s.name, 0.0) + s.cpu_seconds
        if s.reused:
            reused.add(s.name)
        everyone = s.speakers is None or speakers.get(s.name, set()) is None
        speakers[s.name] = None if everyone else speakers.get(s.name, set()) | s.speakers
    return {
        "items": {
            item.key: {"speaker": item.speaker, "language": item.language, "index": item.index} for item in items
        },
        "speakers": {name: sorted(s) if s is not None else None for name, s in speakers.items()},
        "scores": scores,
        "seconds": seconds,
        "cpu-seconds": cpu,
        "reused": sorted(reused),
        "total-seconds": wall_seconds,
    }


__all__ = ["ORDER", "RECORDINGS", "Contender", "Spoken", "collect_speech", "score_recordings", "speak"]
