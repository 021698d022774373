"""Random, correctly padded s1 batches for model tests (the S1Batch padding contract)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedvox.shared.models.batches import S1Batch
from fedvox.shared.models.config import EOS, S1Config


def random_s1_batch(
    config: S1Config,
    phoneme_lengths: Sequence[int],
    semantic_lengths: Sequence[int],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    extra_padding: int = 0,
) -> S1Batch:
    """Phonemes left-padded with 0 (BERT rows zero), semantic tokens right-padded with EOS."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(phoneme_lengths)
    width = max(phoneme_lengths) + extra_padding
    steps = max(semantic_lengths) + extra_padding
    phoneme_ids = torch.zeros(batch, width, dtype=torch.long)
    bert = torch.zeros(batch, width, config.bert_dim, dtype=dtype)
    semantic_ids = torch.full((batch, steps), EOS, dtype=torch.long)
    for i, (x_len, y_len) in enumerate(zip(phoneme_lengths, semantic_lengths, strict=True)):
        phoneme_ids[i, width - x_len :] = torch.randint(1, config.phoneme_vocab_size, (x_len,), generator=generator)
        bert[i, width - x_len :] = torch.randn(x_len, config.bert_dim, generator=generator, dtype=dtype)
        semantic_ids[i, :y_len] = torch.randint(0, EOS, (y_len,), generator=generator)
    return S1Batch(
        phoneme_ids=phoneme_ids,
        phoneme_lengths=torch.tensor(phoneme_lengths),
        bert_features=bert,
        semantic_ids=semantic_ids,
        semantic_lengths=torch.tensor(semantic_lengths),
    )


def unpadded(batch: S1Batch, index: int) -> S1Batch:
    """Sample ``index`` alone, with no padding at all."""
    x_len = int(batch.phoneme_lengths[index])
    y_len = int(batch.semantic_lengths[index])
    width = batch.phoneme_ids.shape[1]
    return S1Batch(
        phoneme_ids=batch.phoneme_ids[index : index + 1, width - x_len :],
        phoneme_lengths=batch.phoneme_lengths[index : index + 1],
        bert_features=batch.bert_features[index : index + 1, width - x_len :],
        semantic_ids=batch.semantic_ids[index : index + 1, :y_len],
        semantic_lengths=batch.semantic_lengths[index : index + 1],
    )
