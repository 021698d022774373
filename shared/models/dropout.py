"""Inverted dropout with a cheaper mask on the CPU.

torch's CPU dropout draws one Mersenne-twister number per element (``bernoulli_``, about 6 ns
each on the 2-core host): 15 % of the base s1's training step and 24 % of the tiny s1's. One
64-bit draw yields four 16-bit uniforms instead, so a mask costs about a quarter as much (1.6 ms
against 7.1 ms for 8 x 4 x 190 x 190 attention weights, one thread). The drop probability is
rounded to a multiple of 2^-16 (0.1 becomes 0.100006) and kept values are scaled by the exact
inverse of the keep probability, so every output's expectation is its input. Masks come from
torch's default generator, as ``nn.Dropout``'s do, so seeding and activation checkpointing
(which restores the generator before recomputing) behave as before. Other devices keep torch's
dropout, which is fused there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 1 << 16


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A boolean mask keeping each element with probability ``1 - p`` (``p`` on a 2^-16 grid),
    and the scale that makes kept values unbiased."""
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    dropped = round(p * _LEVELS)
    keep = words.view(torch.int16)[:numel].view(shape) >= dropped - _LEVELS // 2
    return keep, _LEVELS / (_LEVELS - dropped)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)``, with :func:`keep_mask`'s cheaper mask on the CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not 0.0 < p < 1.0:
        return F.dropout(x, p, training)
    keep, scale = keep_mask(x.shape, p, x.device)
    return torch.where(keep, x * scale, 0.0)


class Dropout(nn.Dropout):
    """``nn.Dropout`` through :func:`dropout` (no parameters: checkpoint keys are unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


__all__ = ["Dropout", "dropout", "keep_mask"]
