"""Reference encoder ``ref_enc`` (MelStyleEncoder): a spectrogram -> one global style vector ``ge``.

Upstream runs it on the first 704 linear-spectrogram bins (v1: all 1025) of the *same* utterance,
so each sample's ``ge`` depends on that sample alone. One deviation: padded frames are zeroed
before each temporal convolution. Upstream lets the spectral MLP's bias leak from padded frames
into the last two real frames, which makes ``ge`` depend on how long the *other* utterances in the
batch are; DP-SGD needs each per-sample loss to be a function of that sample alone. For an
unpadded utterance the two are identical.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fedvox.shared.models.dropout import Dropout


class Conv1dGLU(nn.Module):
    """Residual gated conv: ``x + dropout(a * sigmoid(b))`` with ``[a, b] = conv1(x)``."""

    def __init__(self, channels: int, kernel_size: int, dropout: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(channels, 2 * channels, kernel_size, padding=kernel_size // 2)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv1(x).chunk(2, dim=1)
        return x + self.dropout(a * torch.sigmoid(b))


class StyleAttention(nn.Module):
    """Multi-head self-attention over ``[B, T, C]`` with a residual (temperature sqrt(C) as upstream)."""

    def __init__(self, channels: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.w_qs = nn.Linear(channels, channels)
        self.w_ks = nn.Linear(channels, channels)
        self.w_vs = nn.Linear(channels, channels)
        self.fc = nn.Linear(channels, channels)
        self.temperature = math.sqrt(channels)
        self.attn_dropout = Dropout(dropout)
        self.dropout = Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        return x.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor) -> torch.Tensor:
        """``key_padding [B, T]`` is True on padded frames (they are never attended to)."""
        q, k, v = self._heads(self.w_qs(x)), self._heads(self.w_ks(x)), self._heads(self.w_vs(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) / self.temperature
        scores = scores.masked_fill(key_padding[:, None, None, :], float("-inf"))
        out = torch.matmul(self.attn_dropout(F.softmax(scores, dim=-1)), v)
        b, _, t, _ = out.shape
        return x + self.dropout(self.fc(out.transpose(1, 2).reshape(b, t, -1)))


class MelStyleEncoder(nn.Module):
    """Spectral MLP -> 2 gated convs -> self-attention -> projection -> masked mean over time."""

    def __init__(
        self,
        in_bins: int,
        out_channels: int,
        hidden: int = 128,
        kernel_size: int = 5,
        n_heads: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.in_bins = in_bins
        self.spectral = nn.Sequential(
            nn.Linear(in_bins, hidden),
            nn.Mish(),
            Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.Mish(),
            Dropout(dropout),
        )
        self.temporal = nn.ModuleList(Conv1dGLU(hidden, kernel_size, dropout) for _ in range(2))
        self.slf_attn = StyleAttention(hidden, n_heads, dropout)
        self.fc = nn.Linear(hidden, out_channels)

    def forward(self, spec: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``spec [B, bins, T]`` (at least ``in_bins`` bins), ``mask [B, 1, T]`` -> ``ge [B, out, 1]``."""
        x = self.spectral((spec[:, : self.in_bins] * mask).transpose(1, 2)).transpose(1, 2)
        for glu in self.temporal:
            x = glu(x * mask)
        padding = mask[:, 0] == 0
        x = self.slf_attn((x * mask).transpose(1, 2), padding)
        x = self.fc(x) * mask.transpose(1, 2)
        pooled = x.float().sum(dim=1) / mask.float().sum(dim=(1, 2)).unsqueeze(1)
        return pooled.to(x.dtype).unsqueeze(-1)


__all__ = ["MelStyleEncoder"]
