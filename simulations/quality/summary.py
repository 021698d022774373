"""From per-item speech-quality scores (``quality.json``) to levels, paired comparisons and a verdict.

Levels: each model's mean over speakers with a 95 % bootstrap interval, on one speaker set per
table (the clients that also trained alone, so that every model is measured on the same voices;
and the unseen speakers). Comparisons are paired: the difference between two models on the very
same items, bootstrapped over speakers. A verdict says "closer" or "further" only when its
interval excludes zero, and otherwise that no difference was measured.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedvox.simulations.quality.compare import RECORDINGS
from fedvox.simulations.quality.scoring import (
    HIGHER_IS_BETTER,
    METRICS,
    MIN_SPEAKERS,
    Estimate,
    cluster_bootstrap,
    paired_differences,
)

LABELS = {
    RECORDINGS: "recordings (ceiling)",
    "base": "base model (floor)",
    "federated": "federated global model",
    "local only": "local only, same privacy",
    "central": "centralised, non-private",
}
NAMES = {  # in sentences
    RECORDINGS: "the recordings",
    "base": "the base model",
    "federated": "the federated model",
    "local only": "local-only training",
    "central": "non-private central training",
}
DECIMALS = {"similarity": 3, "wer": 2, "mcd": 2, "speech": 2}
METRIC_NAMES = {"similarity": "speaker similarity", "wer": "WER", "mcd": "MCD (dB)", "speech": "speech fraction"}
WORDS = {  # (better, worse, no difference)
    "similarity": (
        "closer to the speakers' voices than",
        "further from the speakers' voices than",
        "not measurably different in voice from",
    ),
    "wer": ("more intelligible than", "less intelligible than", "not measurably different in intelligibility from"),
    "mcd": (
        "spectrally closer to the recordings than",
        "spectrally further from the recordings than",
        "not measurably different in spectral distance from",
    ),
    "speech": ("more speech-like than", "less speech-like than", "not measurably different in speech activity from"),
}


@dataclass(frozen=True)
class Comparison:
    """``first - second`` on one speaker group, per metric."""

    first: str
    second: str
    group: str
    speakers: tuple[str, ...]
    differences: dict[str, Estimate | None]

    def called(self, metric: str) -> bool:
        """Whether ``metric``'s difference is measured (its interval excludes zero)."""
        estimate = self.differences.get(metric)
        return estimate is not None and estimate.excludes_zero()

    def sentence(self, metric: str, context: str = "") -> str:
        """A verdict in words with its numbers, e.g. "... is closer to ...: speaker similarity +0.07 ± 0.02 ..."."""
        estimate = self.differences.get(metric)
        if estimate is None:
            return ""
        better, worse, same = WORDS[metric]
        if estimate.excludes_zero():
            improved = (estimate.mean > 0) == HIGHER_IS_BETTER[metric]
            relation = better if improved else worse
        else:
            relation = same
        d = DECIMALS[metric]
        first = NAMES[self.first][0].upper() + NAMES[self.first][1:]
        few = ""
        if estimate.speakers < MIN_SPEAKERS:
            few = f"; too few speakers to call a difference: {MIN_SPEAKERS} needed"
        return (
            f"{first} is {relation} {NAMES[self.second]}{context} on the {self.group} "
            f"({estimate.speakers} speaker(s), {estimate.items} sentence(s)): {METRIC_NAMES[metric]} "
            f"{estimate.mean:+.{d}f} ± {estimate.half_width:.{d}f} "
            f"(95 % CI {estimate.low:+.{d}f} to {estimate.high:+.{d}f}{few})."
        )


def _only(scores: Mapping[str, Any], items: Mapping[str, Any], speakers: set[str]) -> dict[str, Any]:
    return {k: v for k, v in scores.items() if items[k]["speaker"] in speakers}


def _metric(scores: Mapping[str, Mapping[str, float | None]], metric: str) -> dict[str, float | None]:
    return {k: v.get(metric) for k, v in scores.items()}


def levels(quality: Mapping[str, Any], speakers: set[str]) -> dict[str, dict[str, Estimate | None]]:
    """``{model: {metric: estimate}}`` on ``speakers``, for the models scored on all of them."""
    out = {}
    for model, scores in quality["scores"].items():
        mine = _only(scores, quality["items"], speakers)
        if {quality["items"][k]["speaker"] for k in mine} != speakers:
            continue
        out[model] = {m: cluster_bootstrap(_metric(mine, m)) for m in METRICS}
    return out


def compare(quality: Mapping[str, Any], first: str, second: str, speakers: set[str], group: str) -> Comparison | None:
    scores = quality["scores"]
    if first not in scores or second not in scores or not speakers:
        return None
    a, b = (_only(scores[m], quality["items"], speakers) for m in (first, second))
    differences = {m: cluster_bootstrap(paired_differences(_metric(a, m), _metric(b, m))) for m in METRICS}
    if all(v is None for v in differences.values()):
        return None
    return Comparison(first, second, group, tuple(sorted(speakers)), differences)


ALONE = "clients that also trained alone"
"""The speaker group every model was scored on, the local-only baselines included."""


def speaker_groups(quality: Mapping[str, Any]) -> dict[str, set[str]]:
    """The speaker sets tables are made on: clients with a local-only baseline, all clients, unseen."""
    local = set(quality["speakers"].get("local only") or [])
    return {
        "clients": set(quality["clients"]),
        ALONE: local,
        "unseen speakers": set(quality["unseen"]),
    }


def comparisons(quality: Mapping[str, Any]) -> list[Comparison]:
    """The comparisons a run is judged by, most important first."""
    groups = speaker_groups(quality)
    wanted = [
        ("federated", "local only", ALONE),
        ("federated", "base", "clients"),
        ("central", "federated", "clients"),
        ("federated", "base", "unseen speakers"),
    ]
    found = [compare(quality, a, b, groups[g], g) for a, b, g in wanted]
    return [c for c in found if c is not None]


__all__ = ["ALONE", "LABELS", "METRIC_NAMES", "Comparison", "compare", "comparisons", "levels", "speaker_groups"]
