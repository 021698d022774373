"""Score utterances against a speaker's own recordings, and put confidence intervals on the means.

A *test item* is one held-out sentence of one speaker: the text, the speaker's recording of it
(compared with by MCD), a *prompt* (another held-out recording of the speaker, the voice
reference a model is given) and the speaker's *voice* (the d-vector centroid of their held-out
recordings other than the one of this sentence, compared with by speaker similarity). The
recordings themselves are scored the same way (the ceiling: a recording against the speaker's
other recordings; their MCD is 0 by definition and not shown).

Intervals are percentile bootstrap intervals that resample *speakers* (clusters), each
speaker's items kept together, so sentences of one speaker do not count as independent.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedvox.simulations.quality import activity, distortion, intelligibility, speaker

METRICS = ("similarity", "wer", "mcd", "speech")
"""Per-utterance figures: speaker similarity (higher is better), WER, MCD in dB (lower is better),
silero-vad speech fraction (higher is better)."""
HIGHER_IS_BETTER = {"similarity": True, "wer": False, "mcd": False, "speech": True}
BOOTSTRAP_SAMPLES = 2000
CONFIDENCE = 0.95
TOLERANCE = 1e-6
"""Differences smaller than this are float32 rounding of equal scores, not differences."""
MIN_SPEAKERS = 3
"""Fewest speakers a difference is called on: resampling one speaker gives a zero-width interval
and two give at most three distinct means, so their "interval" only says the speakers agree."""


@dataclass(frozen=True)
class TestItem:
    """One held-out sentence of one speaker."""

    speaker: str
    index: int  # the sentence's position in the speaker's held-out list
    language: str
    text: str
    recording: Path  # the speaker's recording of ``text``
    prompt: Path  # another held-out recording: the voice reference models get
    prompt_text: str
    voice: tuple[Path, ...]  # recordings whose d-vector centroid is the speaker's voice (never ``recording``)

    @property
    def key(self) -> str:
        return f"{self.speaker}#{self.index}"


def test_items(speaker_name: str, folder: Path, limit: int | None = None) -> list[TestItem]:
    """The test items of a speaker from its ``heldout.list`` (``path|speaker|language|text``).

    Item ``i`` is prompted with held-out recording ``i + 1`` (cyclically); the voice is every
    held-out recording except the item's own. A speaker needs two held-out recordings.
    """
    rows = [
        line.split("|", 3)
        for line in (folder / "heldout.list").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    if len(rows) < 2:
        return []
    items = []
    for i, (path, _, language, text) in enumerate(rows[: limit or len(rows)]):
        j = (i + 1) % len(rows)
        items.append(
            TestItem(
                speaker=speaker_name,
                index=i,
                language=language,
                text=text,
                recording=folder / path,
                prompt=folder / rows[j][0],
                prompt_text=rows[j][3],
                voice=tuple(folder / row[0] for k, row in enumerate(rows) if k != i),
            )
        )
    return items


@lru_cache(maxsize=512)
def _recording(path: Path) -> tuple[np.ndarray, int]:
    from fedvox.shared.audio import read_audio

    wave, rate = read_audio(path)
    return wave.numpy(), rate


@lru_cache(maxsize=512)
def _embedding(path: Path) -> np.ndarray:
    return speaker.embed(*_recording(path))


def voice_of(item: TestItem) -> np.ndarray:
    """The speaker's d-vector centroid for ``item`` (cached per recording)."""
    return speaker.centroid([_embedding(path) for path in item.voice])


_scored: dict[tuple[str, str, bool], dict[str, float | None]] = {}
"""Scores by item, waveform digest and MCD flag: two models that say exactly the same thing (a
model that training did not change, say) are scored once."""


def score(wave: np.ndarray, sample_rate: int, item: TestItem, *, with_mcd: bool = True) -> dict[str, float | None]:
    """Every metric of one utterance for ``item`` (WER only for English; None where not defined)."""
    wave = np.asarray(wave, dtype=np.float32)
    key = (item.key, hashlib.sha256(wave.tobytes() + str(sample_rate).encode()).hexdigest(), with_mcd)
    if key not in _scored:
        _scored[key] = _score(wave, sample_rate, item, with_mcd)
    return dict(_scored[key])


def _score(wave: np.ndarray, sample_rate: int, item: TestItem, with_mcd: bool) -> dict[str, float | None]:
    check = activity.check_speech(wave, sample_rate)
    if check.rms_dbfs <= activity.SILENCE_DBFS:
        return {"similarity": None, "wer": 1.0 if item.language == "en" else None, "mcd": None, "speech": 0.0}
    similarity = speaker.similarity(speaker.embed(wave, sample_rate), voice_of(item))
    if item.language != "en":
        wer = None
    elif check.distinct_values < activity.MIN_DISTINCT_VALUES:  # a DC level or a buzz: no words to recognise
        wer = 1.0
    else:
        wer = intelligibility.word_error_rate(item.text, intelligibility.transcribe(wave, sample_rate))
    mcd = None
    if with_mcd:
        reference, reference_rate = _recording(item.recording)
        mcd = distortion.mel_cepstral_distortion(wave, reference, sample_rate, reference_rate)
    return {"similarity": similarity, "wer": wer, "mcd": mcd, "speech": check.speech_fraction}


def score_recording(item: TestItem) -> dict[str, float | None]:
    """The ceiling: the speaker's own recording of the sentence (MCD against itself is 0: left out)."""
    return score(*_recording(item.recording), item, with_mcd=False)


# ---------------------------------------------------------------------- intervals
@dataclass(frozen=True)
class Estimate:
    """A mean over speakers with a bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    speakers: int
    items: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes_zero(self) -> bool:
        """Whether the interval lies clear of zero (by more than float32 rounding of equal scores),
        on enough speakers (:data:`MIN_SPEAKERS`) for the interval to mean anything."""
        return self.speakers >= MIN_SPEAKERS and (self.low > TOLERANCE or self.high < -TOLERANCE)

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "speakers": self.speakers, "items": self.items}


def cluster_bootstrap(
    values: Mapping[str, float | None], cluster: Callable[[str], str] = lambda k: k.split("#")[0], seed: int = 0
) -> Estimate | None:
    """Mean of ``values`` (by item key) over clusters (speakers), with a percentile bootstrap CI.

    Each speaker's items are averaged first, so every speaker weighs the same whatever its
    number of sentences; the bootstrap resamples speakers with replacement. None if no value.
    """
    groups: dict[str, list[float]] = defaultdict(list)
    for key, value in values.items():
        if value is not None and math.isfinite(value):
            groups[cluster(key)].append(value)
    if not groups:
        return None
    means = np.array([np.mean(v) for v in groups.values()])
    rng = np.random.default_rng(seed)
    draws = means[rng.integers(0, len(means), size=(BOOTSTRAP_SAMPLES, len(means)))].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Estimate(float(means.mean()), float(low), float(high), len(means), sum(len(v) for v in groups.values()))


def paired_differences(a: Mapping[str, float | None], b: Mapping[str, float | None]) -> dict[str, float | None]:
    """``a - b`` on the items both scored (a paired comparison on the same speakers and sentences)."""
    return {k: a[k] - b[k] for k in a.keys() & b.keys() if a[k] is not None and b[k] is not None}


def by_metric(scores: Iterable[tuple[str, Mapping[str, float | None]]]) -> dict[str, dict[str, float | None]]:
    """``[(item key, {metric: value})]`` -> ``{metric: {item key: value}}``."""
    out: dict[str, dict[str, float | None]] = {m: {} for m in METRICS}
    for key, values in scores:
        for metric in METRICS:
            out[metric][key] = values.get(metric)
    return out


__all__ = [
    "HIGHER_IS_BETTER",
    "METRICS",
    "MIN_SPEAKERS",
    "Estimate",
    "TestItem",
    "by_metric",
    "cluster_bootstrap",
    "paired_differences",
    "score",
    "score_recording",
    "test_items",
    "voice_of",
]
