"""Inverted dropout with a cheaper mask on the CPU.

torch's CPU dropout draws one Mersenne-twister number per element (``bernoulli_``, about 6 ns
each on the 2-core host) and applies it in unvectorised passes: 15 % of the base s1's training
step and 24 % of the tiny s1's. Here one 64-bit draw yields four 16-bit words, a comparison
writes the mask straight into the input's dtype, and applying it is one vectorised product
forward and one backward. Backward keeps the words (2 bytes per element; torch kept a float
mask). The drop probability is rounded to a multiple of 2^-16 (0.1 becomes 0.100006) and kept
values are scaled by the exact inverse of the keep probability, so every output's expectation
is its input. Masks come from torch's default generator, as ``nn.Dropout``'s do, so seeding and
activation checkpointing (which restores the generator before recomputing) behave as before.
Other devices keep torch's dropout, which is fused there.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 1 << 16


def _scaled_mask(words: torch.Tensor, threshold: int, scale: float, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.ge(words, threshold, out=torch.empty(words.shape, dtype=dtype, device=words.device))
    return mask.mul_(scale)


class _Dropout(torch.autograd.Function):
    """``x * mask * scale``, the mask rebuilt from the saved words in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, words: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
        ctx.save_for_backward(words)
        ctx.threshold, ctx.scale = threshold, scale
        return x * _scaled_mask(words, threshold, scale, x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (words,) = ctx.saved_tensors
        return grad * _scaled_mask(words, ctx.threshold, ctx.scale, grad.dtype), None, None, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)``, with the cheaper mask on the CPU."""
    if not training or p == 0.0:
        return x
    dropped = round(p * _LEVELS)
    if x.device.type != "cpu" or p < 0.0 or dropped >= _LEVELS:  # p within 2^-17 of 1: no keep level
        return F.dropout(x, p, training)
    numel = x.numel()
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
    words16 = words.view(torch.int16)[:numel].view(x.shape)
    return _Dropout.apply(x, words16, dropped - _LEVELS // 2, _LEVELS / (_LEVELS - dropped))


class Dropout(nn.Dropout):
    """``nn.Dropout`` through :func:`dropout` (no parameters: checkpoint keys are unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


__all__ = ["Dropout", "dropout"]
