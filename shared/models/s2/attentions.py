"""Transformer encoder of ``enc_p``: multi-head attention with relative positions (window 4), FFN.

GPT-SoVITS keeps the relative-position tables ``emb_rel_k``/``emb_rel_v`` as direct parameters of
a three-input attention module, which Opacus cannot sample per example. Here each table lives in
its own single-input leaf (:class:`RelativeKeys`, :class:`RelativeValues`) that maps a batched
tensor to a batched tensor, so Opacus's hooks (or its functorch fallback) see an ordinary layer.
The maths is upstream's: a key at offset ``j - i`` within the window adds ``q_i . e_k[j - i]`` to
the score and ``p_ij * e_v[j - i]`` to the output; offsets beyond the window add nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fedvox.shared.errors import ConfigError
from fedvox.shared.models.dropout import Dropout
from fedvox.shared.models.s2.modules import LayerNorm

MASKED_SCORE = -1e4


def _offset_index(length: int, window: int, device: torch.device) -> torch.Tensor:
    """``[T, T]`` index of offset ``j - i + window`` into a window table; ``2*window+1`` outside."""
    steps = torch.arange(length, device=device)
    offset = steps.unsqueeze(0) - steps.unsqueeze(1)
    return torch.where(offset.abs() <= window, offset + window, 2 * window + 1)


def _window_index(length: int, window: int, device: torch.device) -> torch.Tensor:
    """``[T, 2*window+1]`` index of key ``i + r - window`` for query ``i``; ``T`` when out of range."""
    steps = torch.arange(length, device=device).unsqueeze(1)
    key = steps + torch.arange(-window, window + 1, device=device).unsqueeze(0)
    return torch.where((key >= 0) & (key < length), key, length)


class RelativeKeys(nn.Module):
    """Relative-position key table ``[heads_rel, 2*window+1, d_k]``: scaled queries -> score bias."""

    def __init__(self, window: int, k_channels: int) -> None:
        super().__init__()
        self.window = window
        self.weight = nn.Parameter(torch.randn(1, 2 * window + 1, k_channels) * k_channels**-0.5)

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        """``query [B, H, T, d_k]`` (already divided by sqrt(d_k)) -> bias ``[B, H, T, T]``."""
        b, h, t, _ = query.shape
        logits = F.pad(torch.matmul(query, self.weight.transpose(-2, -1)), (0, 1))  # zero column
        index = _offset_index(t, self.window, query.device).expand(b, h, t, t)
        return logits.gather(-1, index)


class RelativeValues(nn.Module):
    """Relative-position value table: attention weights ``[B, H, T, T]`` -> output ``[B, H, T, d_k]``."""

    def __init__(self, window: int, k_channels: int) -> None:
        super().__init__()
        self.window = window
        self.weight = nn.Parameter(torch.randn(1, 2 * window + 1, k_channels) * k_channels**-0.5)

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        b, h, t, _ = attn.shape
        index = _window_index(t, self.window, attn.device).expand(b, h, t, 2 * self.window + 1)
        relative = F.pad(attn, (0, 1)).gather(-1, index)  # [B, H, T, 2w+1], zero outside
        return torch.matmul(relative, self.weight)


class MultiHeadAttention(nn.Module):
    """1x1-conv multi-head attention over ``[B, C, T]``; relative positions when ``window`` is set."""

    def __init__(
        self,
        channels: int,
        out_channels: int,
        n_heads: int,
        p_dropout: float = 0.0,
        window: int | None = None,
    ) -> None:
        super().__init__()
        if channels % n_heads:
            raise ConfigError(f"attention width {channels} is not divisible by {n_heads} heads")
        self.n_heads = n_heads
        self.k_channels = channels // n_heads
        self.conv_q = nn.Conv1d(channels, channels, 1)
        self.conv_k = nn.Conv1d(channels, channels, 1)
        self.conv_v = nn.Conv1d(channels, channels, 1)
        self.conv_o = nn.Conv1d(channels, out_channels, 1)
        self.drop = Dropout(p_dropout)
        for conv in (self.conv_q, self.conv_k, self.conv_v):
            nn.init.xavier_uniform_(conv.weight)
        self.emb_rel_k = RelativeKeys(window, self.k_channels) if window else None
        self.emb_rel_v = RelativeValues(window, self.k_channels) if window else None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, _, t = x.shape
        return x.view(b, self.n_heads, self.k_channels, t).transpose(2, 3)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x [B, C, Tq]`` attends to ``context [B, C, Tk]``; ``mask [B, 1, Tq, Tk]`` (0 = blocked)."""
        query = self._heads(self.conv_q(x)) / math.sqrt(self.k_channels)
        key, value = self._heads(self.conv_k(context)), self._heads(self.conv_v(context))
        scores = torch.matmul(query, key.transpose(-2, -1))
        if self.emb_rel_k is not None:
            scores = scores + self.emb_rel_k(query)
        attn = self.drop(F.softmax(scores.masked_fill(mask == 0, MASKED_SCORE), dim=-1))
        out = torch.matmul(attn, value)
        if self.emb_rel_v is not None:
            out = out + self.emb_rel_v(attn)
        b, _, t, _ = out.shape
        return self.conv_o(out.transpose(2, 3).reshape(b, -1, t))


class FFN(nn.Module):
    """Position-wise conv feed-forward (kernel 3, 'same' padding), masked before each conv."""

    def __init__(self, channels: int, filter_channels: int, kernel_size: int, p_dropout: float) -> None:
        super().__init__()
        self.pad = ((kernel_size - 1) // 2, kernel_size // 2)
        self.conv_1 = nn.Conv1d(channels, filter_channels, kernel_size)
        self.conv_2 = nn.Conv1d(filter_channels, channels, kernel_size)
        self.drop = Dropout(p_dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.drop(torch.relu(self.conv_1(F.pad(x * mask, self.pad))))
        return self.conv_2(F.pad(x * mask, self.pad)) * mask


class Encoder(nn.Module):
    """Post-norm transformer encoder (VITS ``attentions.Encoder``) on masked ``[B, C, T]``."""

    def __init__(
        self,
        hidden: int,
        filter_channels: int,
        n_heads: int,
        n_layers: int,
        kernel_size: int,
        p_dropout: float,
        window: int = 4,
    ) -> None:
        super().__init__()
        self.drop = Dropout(p_dropout)
        self.attn_layers = nn.ModuleList(
            MultiHeadAttention(hidden, hidden, n_heads, p_dropout, window) for _ in range(n_layers)
        )
        self.norm_layers_1 = nn.ModuleList(LayerNorm(hidden) for _ in range(n_layers))
        self.ffn_layers = nn.ModuleList(FFN(hidden, filter_channels, kernel_size, p_dropout) for _ in range(n_layers))
        self.norm_layers_2 = nn.ModuleList(LayerNorm(hidden) for _ in range(n_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attn_mask = mask.unsqueeze(2) * mask.unsqueeze(-1)
        x = x * mask
        for attn, norm1, ffn, norm2 in zip(
            self.attn_layers, self.norm_layers_1, self.ffn_layers, self.norm_layers_2, strict=True
        ):
            x = norm1(x + self.drop(attn(x, x, attn_mask)))
            x = norm2(x + self.drop(ffn(x, mask)))
        return x * mask


__all__ = ["FFN", "Encoder", "MultiHeadAttention", "RelativeKeys", "RelativeValues"]
