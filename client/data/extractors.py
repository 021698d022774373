"""The frozen extractors ``prepare`` may add to an item: zh BERT features and speaker embeddings.

GPT-SoVITS runs them offline in preparation (``1-get-text.py``, ``2-get-sv.py``) and reads
their files in training; fedvox stores their outputs in the same cache item as the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from fedvox.client.data.cache import CachedItem
from fedvox.client.data.features import Features, from_pcm16
from fedvox.shared.bert import BertExtractor, BertSpec
from fedvox.shared.errors import DataError
from fedvox.shared.speaker import SpeakerEmbedder, SvSpec
from fedvox.shared.text import Phonemes


@dataclass(frozen=True)
class ExtractorSpecs:
    """Which extractors to run (picklable, for worker processes)."""

    bert: BertSpec | None = None
    sv: SvSpec | None = None
    pro: bool = False  # preparing for a v2Pro/v2ProPlus model, whose s2 reads speaker embeddings

    @property
    def any(self) -> bool:
        return self.bert is not None or self.sv is not None

    def names(self) -> dict[str, str]:
        """The cache settings they decide (their weights' names)."""
        return {"bert": self.bert.name if self.bert else "", "sv": self.sv.name if self.sv else ""}

    def build(self) -> Extractors:
        return Extractors(self.bert.build() if self.bert else None, self.sv.build() if self.sv else None)

    def notes(self, accepted: Sequence[CachedItem]) -> list[str]:
        """What the report must say about the features these extractors did not make."""
        notes = []
        zh = sum(item.language in ("zh", "auto") for item in accepted)
        if zh and self.bert is None:
            notes.append(
                f"{zh} zh (or auto) utterances have zero BERT features (no --bert): the released s1 was "
                "pretrained with chinese-roberta-wwm-ext-large features; pass --bert DIR to match it"
            )
        if self.pro and self.sv is None:
            notes.append(
                "no speaker embeddings (no --sv): a v2Pro/v2ProPlus s2 cannot train on this cache; "
                "pass --sv pretrained_eres2netv2w24s4ep4.ckpt (s1 training does not need them)"
            )
        return notes


@dataclass
class Extractors:
    """The loaded extractors of one featurising process."""

    bert: BertExtractor | None = None
    sv: SpeakerEmbedder | None = None

    def add(self, features: Features, runs: Sequence[Phonemes]) -> Features:
        """``features`` with what the extractors make for this utterance, whose transcript was read
        in ``runs`` (one per language run): BERT features for zh runs, zeros for the others."""
        bert = self.bert.run_features(runs) if self.bert is not None else None
        if bert is not None:
            if bert.shape[0] != features.phoneme_ids.numel():
                raise DataError(f"{bert.shape[0]} BERT vectors for {features.phoneme_ids.numel()} phonemes")
            features = replace(features, bert=bert)
        if self.sv is not None:  # from the stored 32 kHz waveform, as 2-get-sv.py reads 5-wav32k
            features = replace(features, sv=self.sv.embed(from_pcm16(features.wave)))
        return features


__all__ = ["ExtractorSpecs", "Extractors"]
