"""The frozen semantic codebook (GPT-SoVITS ``ResidualVectorQuantizer``, n_q=1, 1024 x 768).

Upstream keeps the codebook as buffers and updates them by EMA and k-means in ``train()`` mode,
from the very features being trained on: private data would leak through buffers DP-SGD never
sees. Here the codebook is read-only: the module stays in ``eval()`` whatever its parent does,
``inited`` is 1, and nothing writes the buffers. All four (``inited``, ``cluster_size``, ``embed``,
``embed_avg``; upstream ``quantizer.vq.layers.0._codebook.*``) are kept so official checkpoints
load and export strictly; only ``embed`` is ever read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FrozenQuantizer(nn.Module):
    """Nearest-code quantiser over ``[B, dim, T]`` features with a fixed codebook."""

    embed: torch.Tensor

    def __init__(self, size: int = 1024, dim: int = 768) -> None:
        super().__init__()
        embed = torch.randn(size, dim)
        self.register_buffer("inited", torch.ones(1))
        self.register_buffer("cluster_size", torch.ones(size))
        self.register_buffer("embed", embed)
        self.register_buffer("embed_avg", embed.clone())
        self.eval()

    def train(self, mode: bool = True) -> FrozenQuantizer:
        """Always eval: the codebook must never adapt to (private) training data."""
        return super().train(False)

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, dim, T]`` -> codes ``[B, T]`` (nearest codebook vector, squared Euclidean)."""
        x = features.transpose(1, 2).float()
        embed = self.embed.float()
        dist = x.pow(2).sum(-1, keepdim=True) - 2 * x @ embed.t() + embed.pow(2).sum(-1)
        return dist.argmin(dim=-1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, T]`` -> codebook vectors ``[B, dim, T]``."""
        return F.embedding(codes, self.embed).transpose(1, 2)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Straight-through quantisation of ``features [B, dim, T]`` with ``mask [B, 1, T]``.

        Returns ``(quantized, codes, commitment)``: ``quantized`` carries the gradient to
        ``features`` unchanged (straight-through estimator), ``commitment [B]`` is each sample's
        mean squared distance to its codes over its own frames (upstream: one MSE over the batch).
        """
        codes = self.encode(features)
        quantized = self.decode(codes).to(features.dtype)
        sq = (quantized.detach() - features).pow(2) * mask
        commitment = sq.sum(dim=(1, 2)) / (mask.sum(dim=(1, 2)) * features.shape[1])
        return features + (quantized - features).detach(), codes, commitment


__all__ = ["FrozenQuantizer"]
