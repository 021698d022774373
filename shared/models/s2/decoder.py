"""HiFi-GAN decoder ``dec``: latent frames ``[B, 192, T]`` -> waveform ``[B, 1, T * 640]``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedvox.shared.models.config import S2Config
from fedvox.shared.models.s2.modules import LRELU_SLOPE, ResBlock1, weight_normed


class Decoder(nn.Module):
    """conv_pre + cond(ge) -> [leaky ReLU, weight-normed transposed conv, mean of ResBlocks] x 5 -> tanh."""

    def __init__(self, config: S2Config) -> None:
        super().__init__()
        c = config
        channels = c.upsample_initial_channel
        self.num_kernels = len(c.resblock_kernel_sizes)
        self.conv_pre = nn.Conv1d(c.inter_channels, channels, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for i, (rate, kernel) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes, strict=True)):
            c_in, c_out = channels // 2**i, channels // 2 ** (i + 1)
            self.ups.append(
                weight_normed(
                    nn.ConvTranspose1d(c_in, c_out, kernel, rate, padding=(kernel - rate) // 2), init_std=0.01
                )
            )
            self.resblocks.extend(
                ResBlock1(c_out, k, d) for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes, strict=True)
            )
        self.conv_post = nn.Conv1d(c_out, 1, 7, padding=3, bias=False)
        self.cond = nn.Conv1d(c.gin_channels, channels, 1)

    def forward(self, z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        x = self.conv_pre(z) + self.cond(g)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            x = sum(block(x) for block in blocks) / self.num_kernels
        return torch.tanh(self.conv_post(F.leaky_relu(x)))


__all__ = ["Decoder"]
