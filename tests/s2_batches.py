"""Random, correctly padded s2 batches for model tests (the S2Batch padding contract).

Waveforms are short chirps plus noise and their spectrograms come from ``shared.audio``, so
``spec`` and ``wave`` describe the same sound, as in a real feature cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import pytest
import torch

from fedvox.shared.audio import HOP_LENGTH, SAMPLE_RATE, linear_spectrogram
from fedvox.shared.models.batches import S2Batch
from fedvox.shared.models.config import S2Config
from fedvox.shared.models.s2 import MultiPeriodDiscriminator, SynthesizerTrn
from fedvox.shared.models.s2.generator import S2Forward, draw_randomness
from fedvox.shared.models.subsets import SubsetSpec, apply_subset


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run a test module on one CPU thread (import this fixture into it).

    Tiny models gain nothing from a second thread, and on a busy 2-core machine OpenMP spinning
    made them up to 20x slower (measured: the GAN training test took 58 s with 2 threads, 3.4 s
    with 1).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def random_s2_batch(
    config: S2Config,
    semantic_lengths: Sequence[int],
    phoneme_lengths: Sequence[int],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    extra_padding: int = 0,
) -> S2Batch:
    """Right-padded batch; ``extra_padding`` more 25 Hz steps of padding than needed."""
    generator = torch.Generator().manual_seed(seed)
    b = len(semantic_lengths)
    t25 = max(semantic_lengths) + extra_padding
    x = max(phoneme_lengths) + extra_padding
    semantic_ids = torch.zeros(b, t25, dtype=torch.long)
    phoneme_ids = torch.zeros(b, x, dtype=torch.long)
    wave = torch.zeros(b, 1, 2 * t25 * HOP_LENGTH)
    spec = torch.zeros(b, config.spec_channels, 2 * t25)
    for i, (t_len, x_len) in enumerate(zip(semantic_lengths, phoneme_lengths, strict=True)):
        samples = 2 * t_len * HOP_LENGTH
        time = torch.arange(samples) / SAMPLE_RATE
        f0 = 150 + 100 * torch.rand((), generator=generator)
        tone = 0.3 * torch.sin(2 * math.pi * f0 * time * (1 + time))
        wave[i, 0, :samples] = tone + 0.01 * torch.randn(samples, generator=generator)
        spec[i, :, : 2 * t_len] = linear_spectrogram(wave[i, 0, :samples])
        semantic_ids[i, :t_len] = torch.randint(0, config.codebook_size, (t_len,), generator=generator)
        phoneme_ids[i, :x_len] = torch.randint(1, config.phoneme_vocab, (x_len,), generator=generator)
    sv = torch.randn(b, config.sv_dim, generator=generator, dtype=dtype) if config.is_pro else None
    return S2Batch(
        semantic_ids=semantic_ids,
        semantic_lengths=torch.tensor(semantic_lengths),
        spec=spec.to(dtype),
        spec_lengths=2 * torch.tensor(semantic_lengths),
        wave=wave.to(dtype),
        wave_lengths=2 * HOP_LENGTH * torch.tensor(semantic_lengths),
        phoneme_ids=phoneme_ids,
        phoneme_lengths=torch.tensor(phoneme_lengths),
        sv_embedding=sv,
    )


def unpadded(batch: S2Batch, index: int) -> S2Batch:
    """Sample ``index`` alone, with no padding at all."""
    t25 = int(batch.semantic_lengths[index])
    x = int(batch.phoneme_lengths[index])
    row = slice(index, index + 1)
    return S2Batch(
        semantic_ids=batch.semantic_ids[row, :t25],
        semantic_lengths=batch.semantic_lengths[row],
        spec=batch.spec[row, :, : 2 * t25],
        spec_lengths=batch.spec_lengths[row],
        wave=batch.wave[row, :, : 2 * t25 * HOP_LENGTH],
        wave_lengths=batch.wave_lengths[row],
        phoneme_ids=batch.phoneme_ids[row, :x],
        phoneme_lengths=batch.phoneme_lengths[row],
        sv_embedding=None if batch.sv_embedding is None else batch.sv_embedding[row],
    )


@dataclass
class GeneratorStep:
    """A batch with its per-sample randomness fixed, so any subset of rows recomputes exactly."""

    batch: S2Batch
    slice_starts: torch.Tensor
    posterior_noise: torch.Tensor

    def __len__(self) -> int:
        return len(self.batch)

    def select(self, index: torch.Tensor) -> GeneratorStep:
        return GeneratorStep(self.batch.select(index), self.slice_starts[index], self.posterior_noise[index])


@dataclass
class DiscriminatorStep:
    """A batch with the generator's output for it (what the D step consumes)."""

    batch: S2Batch
    out: S2Forward

    def __len__(self) -> int:
        return len(self.batch)

    def select(self, index: torch.Tensor) -> DiscriminatorStep:
        rows = {f.name: getattr(self.out, f.name)[index] for f in fields(S2Forward)}
        return DiscriminatorStep(self.batch.select(index), S2Forward(**rows))


def fixed_randomness(
    batch: S2Batch, config: S2Config, seed: int = 0, dtype: torch.dtype = torch.float32
) -> GeneratorStep:
    """``batch`` with slice starts and posterior noise drawn once from ``seed``."""
    starts, noise = draw_randomness(batch.spec_lengths, config, torch.Generator().manual_seed(seed))
    return GeneratorStep(batch, starts, noise.to(dtype))


def double_gan(config: S2Config) -> tuple[SynthesizerTrn, MultiPeriodDiscriminator, GeneratorStep]:
    """A fully trainable float64 generator, its discriminator and a fixed 3-utterance step: the
    setting exactness tests compare per-sample results in."""
    torch.manual_seed(0)
    generator = SynthesizerTrn(config).double()
    apply_subset(generator, SubsetSpec("full"))
    discriminator = MultiPeriodDiscriminator(config).double()
    batch = random_s2_batch(config, [6, 5, 3], [7, 4, 2], seed=1, dtype=torch.float64)
    return generator, discriminator, fixed_randomness(batch, config, seed=2, dtype=torch.float64)
