"""Speaker-level DP-FedAvg (McMahan et al., ICLR 2018): clip each update, noise the mean.

Each participant's update ``delta_i`` (its model minus the global model it was sent) is clipped
to L2 norm ``clip_norm``; the clipped updates are summed and divided by the *expected* number of
participants ``D = q * eligible`` (a fixed, data-independent denominator), and Gaussian noise
with standard deviation ``noise_multiplier * clip_norm / D`` is added to every coordinate. Adding
or removing one speaker changes the sum by at most ``clip_norm``, so each round is a Gaussian
mechanism with noise multiplier ``sigma = noise_multiplier`` on a Poisson sample of rate ``q``:
the subsampled-Gaussian accountant composes it over rounds.

Why not Flower's ``DifferentialPrivacyServerSideFixedClipping``: it averages with the inner
strategy's weights (``num-examples``, which raise a speaker's sensitivity above ``S/D``), divides
by the number of replies that arrived (data-dependent), adds the noise after a server optimizer
such as FedAdam has already rescaled the mean, and its accountant only supports no-amplification
sampling. See ``docs/privacy.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SpeakerRelease:
    """One noised aggregate and how it was made (for metrics and the ledger)."""

    mean_update: dict[str, torch.Tensor]
    participants: int
    clipped: int
    expected_clients: float
    noise_std: float


def clip_factors(norms: Sequence[float], clip_norm: float) -> list[float]:
    """Per update, the factor that scales it to L2 norm at most ``clip_norm``."""
    return [min(1.0, clip_norm / norm) if norm > 0 else 1.0 for norm in norms]


def noised_mean(
    clipped_sum: Mapping[str, torch.Tensor],
    *,
    participants: int,
    clipped: int,
    clip_norm: float,
    noise_multiplier: float,
    expected_clients: float,
    generator: torch.Generator,
) -> SpeakerRelease:
    """The DP-FedAvg release: ``(sum_i clip(delta_i) + N(0, (z*S)^2 I)) / D``.

    ``clipped_sum`` is the sum of the clipped updates (fp32; zeros when nobody took part, so the
    release is then pure noise and whether anyone took part is itself protected).
    """
    denominator = max(expected_clients, 1.0)
    std = noise_multiplier * clip_norm / denominator
    mean = {  # noise drawn in name order, so a given generator state gives the same release
        name: clipped_sum[name] / denominator + std * torch.randn(clipped_sum[name].shape, generator=generator)
        for name in sorted(clipped_sum)
    }
    return SpeakerRelease(mean, participants, clipped, denominator, std)


__all__ = ["SpeakerRelease", "clip_factors", "noised_mean"]
