"""MRTE (multi-reference timbre encoder): SSL content attends to the text, plus the global embedding."""

from __future__ import annotations

import torch
from torch import nn

from fedvox.shared.models.s2.attentions import MultiHeadAttention


class MRTE(nn.Module):
    """``c_post(cross_attention(c_pre(content), text_pre(text)) + c_pre(content) + ge)``, masked."""

    def __init__(self, content_channels: int, hidden: int, n_heads: int) -> None:
        super().__init__()
        self.cross_attention = MultiHeadAttention(hidden, hidden, n_heads)
        self.c_pre = nn.Conv1d(content_channels, hidden, 1)
        self.text_pre = nn.Conv1d(content_channels, hidden, 1)
        self.c_post = nn.Conv1d(hidden, content_channels, 1)

    def forward(
        self,
        content: torch.Tensor,
        content_mask: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        ge: torch.Tensor,
    ) -> torch.Tensor:
        """``content [B, C, T]``, ``text [B, C, X]``, ``ge [B, hidden, 1]`` -> ``[B, C, T]``."""
        attn_mask = text_mask.unsqueeze(2) * content_mask.unsqueeze(-1)
        content = self.c_pre(content * content_mask)
        text = self.text_pre(text * text_mask)
        x = self.cross_attention(content * content_mask, text * text_mask, attn_mask) + content + ge
        return self.c_post(x * content_mask)


__all__ = ["MRTE"]
