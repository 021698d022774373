"""What ``prepare`` did: ``report.json`` for scripts and a short summary for people."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedvox.client.data.cache import CachedItem
from fedvox.client.data.reasons import FIXES, Rejection
from fedvox.shared.atomic import atomic_write_text

SHOWN_REJECTIONS = 20


@dataclass
class PrepareReport:
    """Accepted and rejected entries of one list, with the figures a device owner asks for."""

    list_file: str
    out: str
    tokenizer: str
    accepted: int
    total_duration_s: float
    languages: dict[str, int]
    speakers: dict[str, int]
    reasons: dict[str, int]
    rejected: list[Rejection]
    featurised: int  # made by this run
    reused: int  # found in the cache, unchanged
    featurise_s: float  # wall time spent featurising
    workers: int
    stale_removed: int = 0
    notes: list[str] = field(default_factory=list)  # what the features lack or how they were made
    utterances_per_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.utterances_per_s = self.featurised / self.featurise_s if self.featurise_s > 0 else 0.0

    @classmethod
    def build(
        cls,
        *,
        list_file: Path,
        out: Path,
        tokenizer: str,
        accepted: Sequence[CachedItem],
        rejected: Sequence[Rejection],
        featurised: int,
        featurise_s: float,
        workers: int,
        stale_removed: int,
        notes: Sequence[str] = (),
    ) -> PrepareReport:
        ordered = sorted(rejected, key=lambda r: r.line)
        return cls(
            list_file=str(list_file),
            out=str(out),
            tokenizer=tokenizer,
            accepted=len(accepted),
            total_duration_s=round(sum(item.duration_s for item in accepted), 3),
            languages=dict(sorted(Counter(item.language for item in accepted).items())),
            speakers=dict(sorted(Counter(item.speaker for item in accepted).items())),
            reasons=dict(sorted(Counter(str(r.reason) for r in ordered).items())),
            rejected=ordered,
            featurised=featurised,
            reused=len(accepted) - featurised,
            featurise_s=round(featurise_s, 3),
            workers=workers,
            stale_removed=stale_removed,
            notes=list(notes),
        )

    def to_json(self) -> str:
        data = asdict(self)
        data["rejected"] = [{**asdict(r), "reason": str(r.reason)} for r in self.rejected]
        data["utterances_per_s"] = round(self.utterances_per_s, 2)
        return json.dumps(data, indent=1, ensure_ascii=False) + "\n"

    def summary(self) -> str:
        per_language = "".join(f", {lang} {n}" for lang, n in self.languages.items())
        lines = [
            f"{self.accepted} accepted ({self.total_duration_s / 60:.1f} min{per_language}), "
            f"{len(self.rejected)} rejected",
            f"features: {self.featurised} made, {self.reused} reused from the cache"
            + (f" at {self.utterances_per_s:.1f} utterances/s" if self.featurised else "")
            + f"; tokenizer {self.tokenizer}",
            *(f"note: {note}" for note in self.notes),
        ]
        for reason, count in self.reasons.items():
            lines.append(f"  {reason}: {count} (fix: {FIXES[reason]})")
        lines += [f"    {r.message}" for r in self.rejected[:SHOWN_REJECTIONS]]
        if len(self.rejected) > SHOWN_REJECTIONS:
            lines.append(f"    ... {len(self.rejected) - SHOWN_REJECTIONS} more in {self.out}/report.json")
        return "\n".join(lines)

    def write(self, folder: Path) -> None:
        atomic_write_text(folder / "report.json", self.to_json())
        atomic_write_text(folder / "report.txt", self.summary() + "\n")
