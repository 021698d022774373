"""Padded training batches: the contract between datasets (``client.data``) and models.

Padding is fixed per field and documented here so every producer and consumer agrees:

* s1 phonemes are **left**-padded (the last real phoneme always sits at index ``X - 1``, right
  before the first semantic token); s1 semantic tokens are right-padded.
* s2 fields are all right-padded, as in GPT-SoVITS.

Every model loss computed from a batch is per sample and depends on that sample alone (no
batch-level normalisation), which DP-SGD's per-sample clipping requires.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Self

import torch


@dataclass
class _Batch:
    def to(self, device: torch.device | str) -> Self:
        moved = {
            f.name: (v.to(device) if isinstance(v, torch.Tensor) else v)
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return type(self)(**moved)

    def __len__(self) -> int:
        first = getattr(self, fields(self)[0].name)
        return int(first.shape[0])

    def select(self, index: torch.Tensor | slice) -> Self:
        """Rows ``index`` of the batch (padding is kept; lengths stay exact)."""
        picked = {
            f.name: (v[index] if isinstance(v, torch.Tensor) else v)
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return type(self)(**picked)


@dataclass
class S1Batch(_Batch):
    """GPT stage: phonemes (+BERT features) -> semantic tokens."""

    phoneme_ids: torch.Tensor  # long [B, X], left-padded with 0
    phoneme_lengths: torch.Tensor  # long [B]
    bert_features: torch.Tensor  # float [B, X, 1024], left-padded; zeros where GPT-SoVITS uses zeros
    semantic_ids: torch.Tensor  # long [B, Y], right-padded with EOS (1024)
    semantic_lengths: torch.Tensor  # long [B]


@dataclass
class S2Batch(_Batch):
    """SoVITS stage: semantic tokens + text + reference spectrogram -> waveform."""

    semantic_ids: torch.Tensor  # long [B, T25], right-padded with 0
    semantic_lengths: torch.Tensor  # long [B]
    spec: torch.Tensor  # float [B, 1025, T50], right-padded with 0; T50 == 2 * T25
    spec_lengths: torch.Tensor  # long [B]
    wave: torch.Tensor  # float [B, 1, T50 * 640], right-padded with 0
    wave_lengths: torch.Tensor  # long [B]
    phoneme_ids: torch.Tensor  # long [B, X], right-padded with 0
    phoneme_lengths: torch.Tensor  # long [B]
    sv_embedding: torch.Tensor | None = None  # float [B, 20480] for v2Pro/v2ProPlus
