"""Map-style datasets over the feature cache, and collate functions producing the batch contract.

Each prepared utterance appears exactly once: no repetition of small datasets and no length
buckets (GPT-SoVITS does both). DP-SGD draws Poisson batches of indices from these datasets and
its privacy accounting assumes exactly that. Collation follows ``shared.models.batches``: s1
phonemes left-padded, everything else right-padded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from fedvox.client.data.cache import CachedItem, FeatureCache
from fedvox.client.data.features import from_pcm16
from fedvox.shared.audio import HOP_LENGTH, SEMANTIC_RATE, SPEC_CHANNELS, linear_spectrogram
from fedvox.shared.bert import BERT_DIM
from fedvox.shared.errors import DataError
from fedvox.shared.models.batches import S1Batch, S2Batch
from fedvox.shared.models.config import EOS, PHONEME_VOCAB

log = logging.getLogger(__name__)

MAX_SECONDS = 54
MIN_PHONES_PER_SECOND = 3
MAX_PHONES_PER_SECOND = 25


class _CacheDataset(Dataset):
    """The prepared utterances ``items`` (default: all) of the cache at ``cache``."""

    def __init__(self, cache: FeatureCache | str, items: Sequence[CachedItem] | None = None):
        self.cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
        index = self.cache.read_index()
        self.tokenizer = index.settings.tokenizer
        self.symbols_version = index.settings.symbols_version
        known = {item.id for item in index.items}
        chosen = index.items if items is None else tuple(items)
        unknown = [item.id for item in chosen if item.id not in known]
        if unknown:
            raise DataError(f"{len(unknown)} items are not in the feature cache at {self.cache.root}")
        self.items: tuple[CachedItem, ...] = tuple(chosen)

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, index: int) -> dict[str, torch.Tensor]:
        # An item's id hashes the settings it was made with, so every item the index lists holds
        # codes of the index's tokenizer: no per-item check is needed.
        return self.cache.load_item(self.items[index].id)


@dataclass(frozen=True)
class S1Example:
    """One s1 training example: phonemes (+ BERT features) -> semantic tokens."""

    phoneme_ids: torch.Tensor  # long [X]
    semantic_ids: torch.Tensor  # long [T25]
    bert_features: torch.Tensor | None = None  # float [X, 1024]; None means zeros

    @classmethod
    def synthetic(cls, phonemes: int, tokens: int, generator: torch.Generator) -> S1Example:
        """Random v2 phonemes and semantic codes of exactly these lengths (benchmarks)."""
        return cls(
            torch.randint(1, PHONEME_VOCAB["v2"], (phonemes,), generator=generator),
            torch.randint(0, EOS, (tokens,), generator=generator),
        )


class S1Dataset(_CacheDataset):
    """Phoneme ids, semantic tokens and the zh BERT features ``prepare --bert`` stored (zeros
    for other languages and without ``--bert``, as GPT-SoVITS; see ``docs/data.md``).

    Drops, as GPT-SoVITS's s1 loader does, utterances with more than 54 s of tokens, more than
    54 * 25 / 2.5 phonemes, or fewer than 3 or more than 25 phonemes per second (usually a
    transcript that does not match its recording).
    """

    def __init__(self, cache: FeatureCache | str, items: Sequence[CachedItem] | None = None):
        super().__init__(cache, items)
        kept = tuple(item for item in self.items if _s1_usable(item))
        if len(kept) < len(self.items):
            log.info(
                "s1: %d of %d utterances dropped (length or phonemes per second out of range)",
                len(self.items) - len(kept),
                len(self.items),
            )
        self.items = kept

    def __getitem__(self, index: int) -> S1Example:
        tensors = self._load(index)
        bert = tensors.get("bert")
        return S1Example(
            tensors["phoneme_ids"].long(), tensors["semantic_ids"].long(), None if bert is None else bert.float()
        )


def _s1_usable(item: CachedItem) -> bool:
    seconds = item.semantic_tokens / SEMANTIC_RATE
    return (
        0 < item.semantic_tokens <= MAX_SECONDS * SEMANTIC_RATE
        and item.phonemes <= MAX_SECONDS * SEMANTIC_RATE / 2.5
        and MIN_PHONES_PER_SECOND <= item.phonemes / seconds <= MAX_PHONES_PER_SECOND
    )


@dataclass(frozen=True)
class S2Example:
    """One s2 training example; ``spec`` has exactly two frames per semantic token."""

    semantic_ids: torch.Tensor  # long [T25]
    spec: torch.Tensor  # float [1025, 2 * T25]
    wave: torch.Tensor  # float [1, 2 * T25 * 640]
    phoneme_ids: torch.Tensor  # long [X]
    sv_embedding: torch.Tensor | None = None  # float [20480] (prepare --sv), for v2Pro/v2ProPlus

    @classmethod
    def synthetic(cls, phonemes: int, tokens: int, generator: torch.Generator) -> S2Example:
        """Random semantic codes, spectrogram, waveform and v2 phonemes of exactly these lengths,
        without a speaker embedding (benchmarks)."""
        return cls(
            semantic_ids=torch.randint(0, EOS, (tokens,), generator=generator),
            spec=torch.rand(SPEC_CHANNELS, 2 * tokens, generator=generator),
            wave=0.1 * torch.randn(1, 2 * tokens * HOP_LENGTH, generator=generator),
            phoneme_ids=torch.randint(1, PHONEME_VOCAB["v2"], (phonemes,), generator=generator),
        )


class S2Dataset(_CacheDataset):
    """Semantic tokens, linear spectrogram, 32 kHz waveform, phoneme ids and (with ``prepare
    --sv``) the speaker embedding of each utterance."""

    def __getitem__(self, index: int) -> S2Example:
        tensors = self._load(index)
        wave = from_pcm16(tensors["wave"])
        return S2Example(
            semantic_ids=tensors["semantic_ids"].long(),
            spec=linear_spectrogram(wave),
            wave=wave.unsqueeze(0),
            phoneme_ids=tensors["phoneme_ids"].long(),
            sv_embedding=tensors["sv"].float() if "sv" in tensors else None,
        )


def collate_s1(examples: Sequence[S1Example]) -> S1Batch:
    """Left-pad phonemes (and BERT features) with 0, right-pad semantic tokens with EOS."""
    phoneme_lengths = torch.tensor([len(e.phoneme_ids) for e in examples])
    semantic_lengths = torch.tensor([len(e.semantic_ids) for e in examples])
    batch, width = len(examples), int(phoneme_lengths.max())
    phoneme_ids = torch.zeros(batch, width, dtype=torch.long)
    bert = torch.zeros(batch, width, BERT_DIM)
    semantic_ids = torch.full((batch, int(semantic_lengths.max())), EOS, dtype=torch.long)
    for row, example in enumerate(examples):
        start = width - len(example.phoneme_ids)
        phoneme_ids[row, start:] = example.phoneme_ids
        if example.bert_features is not None:
            bert[row, start:] = example.bert_features
        semantic_ids[row, : len(example.semantic_ids)] = example.semantic_ids
    return S1Batch(phoneme_ids, phoneme_lengths, bert, semantic_ids, semantic_lengths)


def collate_s2(examples: Sequence[S2Example]) -> S2Batch:
    """Right-pad every field with 0; spectrogram and waveform lengths follow the token lengths."""
    semantic_lengths = torch.tensor([len(e.semantic_ids) for e in examples])
    phoneme_lengths = torch.tensor([len(e.phoneme_ids) for e in examples])
    spec_lengths = torch.tensor([e.spec.shape[-1] for e in examples])
    wave_lengths = torch.tensor([e.wave.shape[-1] for e in examples])
    if not torch.equal(spec_lengths, 2 * semantic_lengths):
        raise DataError("s2 examples must have two spectrogram frames per semantic token")
    batch, tokens = len(examples), int(semantic_lengths.max())
    semantic_ids = torch.zeros(batch, tokens, dtype=torch.long)
    spec = torch.zeros(batch, examples[0].spec.shape[0], 2 * tokens)
    wave = torch.zeros(batch, 1, int(wave_lengths.max()))
    phoneme_ids = torch.zeros(batch, int(phoneme_lengths.max()), dtype=torch.long)
    for row, example in enumerate(examples):
        semantic_ids[row, : len(example.semantic_ids)] = example.semantic_ids
        spec[row, :, : example.spec.shape[-1]] = example.spec
        wave[row, :, : example.wave.shape[-1]] = example.wave
        phoneme_ids[row, : len(example.phoneme_ids)] = example.phoneme_ids
    embeddings = [e.sv_embedding for e in examples if e.sv_embedding is not None]
    if embeddings and len(embeddings) < len(examples):
        raise DataError("some s2 examples have speaker embeddings and some do not; prepare the cache again with --sv")
    sv = torch.stack(embeddings) if embeddings else None
    return S2Batch(
        semantic_ids,
        semantic_lengths,
        spec,
        spec_lengths,
        wave,
        wave_lengths,
        phoneme_ids,
        phoneme_lengths,
        sv,
    )
