"""Per-sample SoVITS losses: each returns ``[B]``, row ``b`` a function of sample ``b`` alone.

Upstream averages each term over the whole batch. Here every term is averaged over the sample's
own elements, so summing the rows (Opacus ``loss_reduction="sum"``) and dividing by the batch size
gives upstream's value wherever the sample shapes are equal (the fixed-length decoder slice:
adversarial, feature-matching, mel). The KL is the exception: upstream divides the batch's summed
KL by the batch's total frame count, which couples utterances; here each utterance's KL is divided
by its own frame count, which weights utterances equally instead of by length.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable

import torch

from fedvox.shared.audio import mel_from_linear, mel_spectrogram
from fedvox.shared.models.s2.discriminator import FeatureMaps, Scores


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """Losses are computed in at least fp32 (as upstream under autocast); float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return _fp32(x).flatten(1).mean(dim=1)


def total(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """The sum of loss terms, added in order (Python's ``sum`` starts from the int 0)."""
    return functools.reduce(operator.add, terms)


def discriminator_loss(real: Scores, fake: Scores) -> torch.Tensor:
    """LSGAN for D: ``sum_d mean((1 - D(y))^2) + mean(D(y_hat)^2)``."""
    return total(_per_sample_mean((1 - r) ** 2) + _per_sample_mean(f**2) for r, f in zip(real, fake, strict=True))


def generator_adversarial_loss(fake: Scores) -> torch.Tensor:
    """LSGAN for G: ``sum_d mean((1 - D(y_hat))^2)``."""
    return total(_per_sample_mean((1 - f) ** 2) for f in fake)


def feature_matching_loss(real: FeatureMaps, fake: FeatureMaps) -> torch.Tensor:
    """``sum`` over discriminators and layers of the L1 distance of feature maps (real detached).

    Upstream's ``feature_loss`` multiplies by 2 internally; here that factor is ``c_fm``.
    """
    return total(
        _per_sample_mean((r.detach() - f).abs())
        for maps_r, maps_f in zip(real, fake, strict=True)
        for r, f in zip(maps_r, maps_f, strict=True)
    )


def mel_loss(spec_slice: torch.Tensor, wave_hat: torch.Tensor) -> torch.Tensor:
    """L1 between log-mels of the real slice (from its linear spectrogram) and the generated one.

    As upstream: the target mel comes from the utterance's spectrogram slice (``spec_to_mel``),
    the prediction's from the generated waveform (``mel_spectrogram``).
    """
    target = mel_from_linear(_fp32(spec_slice))
    predicted = mel_spectrogram(_fp32(wave_hat.squeeze(1)))
    return _per_sample_mean((target - predicted).abs())


def kl_loss(
    z_p: torch.Tensor,
    logs_q: torch.Tensor,
    m_p: torch.Tensor,
    logs_p: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """KL(q || p) of the flowed posterior sample, summed over channels and each sample's frames,
    divided by that sample's frame count (upstream divides by the batch's frame count)."""
    z_p, logs_q, m_p, logs_p, mask = (_fp32(t) for t in (z_p, logs_q, m_p, logs_p, mask))
    kl = logs_p - logs_q - 0.5 + 0.5 * (z_p - m_p) ** 2 * torch.exp(-2.0 * logs_p)
    return (kl * mask).sum(dim=(1, 2)) / mask.sum(dim=(1, 2))


__all__ = [
    "discriminator_loss",
    "feature_matching_loss",
    "generator_adversarial_loss",
    "kl_loss",
    "mel_loss",
]
