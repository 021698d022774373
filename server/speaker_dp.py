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

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from fedvox.shared.wire import update_norm


@dataclass(frozen=True)
class Release:
    """One noised aggregate and how it was made (for metrics and the ledger)."""

    mean_update: dict[str, torch.Tensor]
    participants: int
    clipped: int
    expected_clients: float
    noise_std: float


def clip_update(delta: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """``delta`` scaled to L2 norm at most ``clip_norm``; returns ``(clipped, original norm)``."""
    zeros = {name: torch.zeros_like(t) for name, t in delta.items()}
    norm = update_norm(zeros, delta)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {name: t * scale for name, t in delta.items()}, norm


def noised_mean(
    deltas: Iterable[Mapping[str, torch.Tensor]],
    like: Mapping[str, torch.Tensor],
    *,
    clip_norm: float,
    noise_multiplier: float,
    expected_clients: float,
    generator: torch.Generator,
) -> Release:
    """The DP-FedAvg release: ``(sum_i clip(delta_i) + N(0, (z*S)^2 I)) / D``.

    ``like`` gives names, shapes and dtypes (float32) of the result; with no participants the
    release is pure noise, so whether anyone took part is itself protected. ``deltas`` is read
    once, one update at a time (it may be a generator decoding each in turn).
    """
    denominator = max(expected_clients, 1.0)
    total = {name: torch.zeros_like(t, dtype=torch.float32) for name, t in like.items()}
    participants = clipped = 0
    for delta in deltas:
        participants += 1
        bounded, norm = clip_update(delta, clip_norm)
        clipped += norm > clip_norm
        for name in total:
            total[name] += bounded[name].float()
    std = noise_multiplier * clip_norm / denominator
    mean = {  # noise drawn in name order, so a given generator state gives the same release
        name: total[name] / denominator + std * torch.randn(total[name].shape, generator=generator)
        for name in sorted(total)
    }
    return Release(mean, participants, clipped, denominator, std)


__all__ = ["Release", "clip_update", "noised_mean"]
