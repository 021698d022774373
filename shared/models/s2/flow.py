"""Posterior encoder ``enc_q`` and normalising flow ``flow`` of the VITS latent."""

from __future__ import annotations

import torch
from torch import nn

from fedvox.shared.models.s2.modules import WN


class PosteriorEncoder(nn.Module):
    """Linear spectrogram -> posterior ``N(m_q, exp(logs_q))`` and a sample ``z`` of it."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: int,
        kernel_size: int,
        n_layers: int,
        gin_channels: int,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.pre = nn.Conv1d(in_channels, hidden, 1)
        self.enc = WN(hidden, kernel_size, 1, n_layers, gin_channels)
        self.proj = nn.Conv1d(hidden, 2 * out_channels, 1)

    def forward(
        self, spec: torch.Tensor, mask: torch.Tensor, g: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(z, m_q, logs_q)``; ``noise`` is the standard-normal draw, shaped like ``m_q``.

        ``g`` is detached as upstream: the posterior does not train the reference encoder.
        """
        x = self.enc(self.pre(spec) * mask, mask, g.detach())
        m, logs = (self.proj(x) * mask).split(self.out_channels, dim=1)
        return (m + noise * torch.exp(logs)) * mask, m, logs


class Flip(nn.Module):
    """Swap the two channel halves' order (reverse the channel axis), as upstream."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flip(x, [1])


class ResidualCouplingLayer(nn.Module):
    """Mean-only affine coupling: ``x1 += m(x0)``, with ``m`` a conditioned WaveNet."""

    def __init__(self, channels: int, hidden: int, kernel_size: int, n_layers: int, gin_channels: int) -> None:
        super().__init__()
        self.half_channels = channels // 2
        self.pre = nn.Conv1d(self.half_channels, hidden, 1)
        self.enc = WN(hidden, kernel_size, 1, n_layers, gin_channels)
        self.post = nn.Conv1d(hidden, self.half_channels, 1)
        nn.init.zeros_(self.post.weight)
        assert self.post.bias is not None
        nn.init.zeros_(self.post.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, g: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        x0, x1 = x.split(self.half_channels, dim=1)
        m = self.post(self.enc(self.pre(x0) * mask, mask, g)) * mask
        x1 = (x1 - m) * mask if reverse else m + x1 * mask
        return torch.cat([x0, x1], dim=1)


class ResidualCouplingBlock(nn.Module):
    """``n_flows`` x (coupling layer, flip); volume-preserving, so no log-determinant is needed."""

    def __init__(
        self,
        channels: int,
        hidden: int,
        kernel_size: int,
        n_layers: int,
        n_flows: int,
        gin_channels: int,
    ) -> None:
        super().__init__()
        self.flows = nn.ModuleList()
        for _ in range(n_flows):
            self.flows.append(ResidualCouplingLayer(channels, hidden, kernel_size, n_layers, gin_channels))
            self.flows.append(Flip())

    def forward(self, x: torch.Tensor, mask: torch.Tensor, g: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        for flow in reversed(self.flows) if reverse else self.flows:
            x = flow(x) if isinstance(flow, Flip) else flow(x, mask, g, reverse)
        return x


__all__ = ["Flip", "PosteriorEncoder", "ResidualCouplingBlock", "ResidualCouplingLayer"]
