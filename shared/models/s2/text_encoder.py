"""Prior encoder ``enc_p``: semantic content + phonemes + global embedding -> prior (m_p, logs_p)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from fedvox.shared.models.config import S2Config
from fedvox.shared.models.s2.attentions import Encoder
from fedvox.shared.models.s2.mrte import MRTE


class TextEncoder(nn.Module):
    """SSL-content encoder, phoneme encoder, MRTE fusion with ``ge``, second encoder, projection."""

    def __init__(self, config: S2Config) -> None:
        super().__init__()
        c = config
        hidden = c.hidden_channels
        encoder = functools.partial(
            Encoder,
            hidden,
            filter_channels=c.filter_channels,
            n_heads=c.n_heads,
            kernel_size=c.kernel_size,
            p_dropout=c.p_dropout,
            window=c.window_size,
        )
        self.inter_channels = c.inter_channels
        self.ssl_proj = nn.Conv1d(c.ssl_dim, hidden, 1)
        self.encoder_ssl = encoder(n_layers=c.n_layers // 2)
        self.encoder_text = encoder(n_layers=c.n_layers)
        self.text_embedding = nn.Embedding(c.phoneme_vocab, hidden)
        self.mrte = MRTE(hidden, c.mrte_hidden, c.mrte_heads)
        self.encoder2 = encoder(n_layers=c.n_layers // 2)
        self.proj = nn.Conv1d(hidden, 2 * c.inter_channels, 1)

    def forward(
        self,
        content: torch.Tensor,
        mask: torch.Tensor,
        phoneme_ids: torch.Tensor,
        phoneme_mask: torch.Tensor,
        ge: torch.Tensor,
        speed: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``content [B, 768, T]`` (50 Hz), ``phoneme_ids [B, X]``, ``ge [B, mrte_hidden, 1]``.

        Returns ``(m_p, logs_p, mask)``; ``speed != 1`` stretches time (inference only).
        """
        y = self.ssl_proj(content * mask) * mask
        y = self.encoder_ssl(y, mask)
        text = self.text_embedding(phoneme_ids).transpose(1, 2)
        text = self.encoder_text(text * phoneme_mask, phoneme_mask)
        y = self.encoder2(self.mrte(y, mask, text, phoneme_mask, ge) * mask, mask)
        if speed != 1.0:
            y = F.interpolate(y, size=int(y.shape[-1] / speed) + 1, mode="linear")
            mask = F.interpolate(mask, size=y.shape[-1], mode="nearest")
        m, logs = (self.proj(y) * mask).split(self.inter_channels, dim=1)
        return m, logs, mask


__all__ = ["TextEncoder"]
