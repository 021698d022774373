"""A validation loss that may leave the device: the Gaussian mechanism on clipped per-utterance losses.

The exact mean loss of a few held-out utterances is a data-dependent number (with one held-out
utterance it *is* that utterance's loss), so it leaves only as a DP release charged to the ledger
like a training round. The device computes each held-out utterance's loss ``l_i``, clips it to
``[0, C]`` and releases the pair

    s = sum_i min(l_i, C) / C + N(0, sigma^2),    n = |held-out| + N(0, sigma^2),

sending only ``C * s / max(n, 1)``. Adding or removing one utterance moves ``(s, n)`` by at most
``(1, 1)``, L2 norm ``sqrt(2)``: one Gaussian mechanism of noise multiplier ``sigma / sqrt(2)``,
sample rate 1, one step (:func:`loss_mechanism`). Neither the count nor the clip range leaves
un-noised.
"""

from __future__ import annotations

import math

import torch

from fedvox.client.dp.task import Task
from fedvox.shared.errors import ConfigError
from fedvox.shared.privacy.accounting import Mechanism
from fedvox.shared.privacy.noise import SecureGaussian
from fedvox.shared.stages import recipe


def loss_mechanism(noise_multiplier: float) -> Mechanism:
    """What one loss release costs, as the accountant composes it."""
    if not noise_multiplier > 0:
        raise ConfigError(f"a released loss needs dp.loss-noise-multiplier > 0, got {noise_multiplier}")
    return Mechanism(noise_multiplier / math.sqrt(2.0), 1.0, 1)


def utterance_losses(task: Task, dataset) -> torch.Tensor:
    """Each utterance's headline loss (s1: cross-entropy per token, s2: generator loss)."""
    losses = []
    for index in range(len(dataset)):
        means = task.means(task.evaluate(dataset, torch.tensor([index])))
        losses.append(means[recipe(task.stage).headline_metric])
    return torch.tensor(losses, dtype=torch.float64)


def noisy_mean_loss(losses: torch.Tensor, *, clip: float, noise_multiplier: float, noise: SecureGaussian) -> float:
    """``C * (sum clip(l)/C + noise) / max(n + noise, 1)`` of the per-utterance ``losses``."""
    if not clip > 0:
        raise ConfigError(f"dp.loss-clip must be > 0, got {clip}")
    clipped = losses.detach().double().clamp(0.0, clip).div(clip)
    total, count = noise.privatise(torch.stack((clipped.sum(), torch.tensor(float(len(clipped))))), noise_multiplier)
    return clip * float(total) / max(float(count), 1.0)


__all__ = ["loss_mechanism", "noisy_mean_loss", "utterance_losses"]
