"""One accepted utterance -> its training features, as GPT-SoVITS's preparation scripts make them.

``2-get-hubert-wav32k.py`` loudness-normalises every clip to a 50/50 mix of the clip peak-scaled
to 0.95 and the clip as recorded, stores that mix as 16-bit PCM at 32 kHz, and computes HuBERT
features from the same mix. The tokenizer then gives 25 Hz semantic codes; we trim the waveform
to exactly two 50 Hz spectrogram frames per code (``spec_frames == 2 * semantic_tokens``), so
datasets never have to reconcile lengths. Spectrograms are not stored: the dataset computes them
from the waveform (a few ms per utterance), which keeps the cache small and exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedvox.shared.audio import HOP_LENGTH, SAMPLE_RATE, resample
from fedvox.shared.semantic import SemanticTokenizer

PEAK = 0.95
MIX = 0.5
PCM_SCALE = 32768.0
SAMPLES_PER_TOKEN = 2 * HOP_LENGTH


@dataclass(frozen=True)
class Features:
    """What the cache stores for one utterance."""

    wave: torch.Tensor  # int16 [2 * T25 * 640], 32 kHz PCM
    semantic_ids: torch.Tensor  # int16 [T25], codes 0..1023
    phoneme_ids: torch.Tensor  # int16 [X]
    bert: torch.Tensor | None = None  # [X, 1024] zh BERT features (fp16 if made on a GPU); None: zeros
    sv: torch.Tensor | None = None  # [20480] ERes2NetV2 speaker embedding (v2Pro/v2ProPlus)


def loudness_mix(wave: torch.Tensor) -> torch.Tensor:
    """GPT-SoVITS's loudness normalisation: ``0.5 * 0.95 * wave / peak + 0.5 * wave``."""
    peak = wave.abs().max().clamp_min(1e-8)
    return MIX * PEAK * wave / peak + (1 - MIX) * wave


def to_pcm16(wave: torch.Tensor) -> torch.Tensor:
    """Float ``[-1, 1)`` -> int16 by truncation, as GPT-SoVITS's ``astype("int16")`` (but saturating)."""
    return (wave * PCM_SCALE).clamp(-PCM_SCALE, PCM_SCALE - 1).to(torch.int16)


def from_pcm16(pcm: torch.Tensor) -> torch.Tensor:
    """int16 PCM -> float32 waveform, as GPT-SoVITS's loader reads ``5-wav32k``."""
    return pcm.float() / PCM_SCALE


def featurize(wave: torch.Tensor, sample_rate: int, phoneme_ids: list[int], tokenizer: SemanticTokenizer) -> Features:
    """Resample a checked mono recording to 32 kHz, normalise, tokenize and trim."""
    mixed = loudness_mix(resample(wave.float(), sample_rate, SAMPLE_RATE))
    codes = tokenizer.encode(mixed)
    tokens = min(codes.numel(), mixed.numel() // SAMPLES_PER_TOKEN)
    return Features(
        wave=to_pcm16(mixed[: tokens * SAMPLES_PER_TOKEN]),
        semantic_ids=codes[:tokens].to(torch.int16),
        phoneme_ids=torch.tensor(phoneme_ids, dtype=torch.int16),
    )
