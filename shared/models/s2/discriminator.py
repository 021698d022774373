"""Multi-period discriminator (HiFi-GAN): one scale discriminator and one per period.

Call it on real and on generated waveforms *separately*: each call's outputs for sample ``b``
depend on row ``b`` alone, which is what per-sample gradients need (a concatenated 2B batch would
give each utterance two rows). All convolutions are weight-normed, as upstream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedvox.shared.models.config import S2Config
from fedvox.shared.models.s2.modules import LRELU_SLOPE, same_padding, weight_normed

Scores = list[torch.Tensor]
FeatureMaps = list[list[torch.Tensor]]


class DiscriminatorP(nn.Module):
    """Period discriminator: fold the waveform into ``[T / period, period]`` and run 2-D convs."""

    def __init__(self, period: int, channels: tuple[int, ...], kernel_size: int = 5, stride: int = 3) -> None:
        super().__init__()
        self.period = period
        pad = (same_padding(kernel_size), 0)
        c_in = (1, *channels[:-1])
        strides = [stride] * (len(channels) - 1) + [1]
        self.convs = nn.ModuleList(
            weight_normed(nn.Conv2d(i, o, (kernel_size, 1), (s, 1), padding=pad))
            for i, o, s in zip(c_in, channels, strides, strict=True)
        )
        self.conv_post = weight_normed(nn.Conv2d(channels[-1], 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b, c, t = wave.shape
        if t % self.period:
            wave = F.pad(wave, (0, self.period - t % self.period), mode="reflect")
        return _conv_stack(wave.view(b, c, -1, self.period), self.convs, self.conv_post)


def _conv_stack(x: torch.Tensor, convs: nn.ModuleList, conv_post: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Score and feature maps of one sub-discriminator (every map feeds the feature-matching loss)."""
    fmap = []
    for conv in convs:
        x = F.leaky_relu(conv(x), LRELU_SLOPE)
        fmap.append(x)
    x = conv_post(x)
    fmap.append(x)
    return x.flatten(1), fmap


class DiscriminatorS(nn.Module):
    """Scale discriminator on the raw waveform: grouped strided 1-D convs."""

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        c_in = (1, *channels[:-1])
        # (kernel, stride, groups) per layer; groups = in_channels / 4 for the strided layers.
        shapes = [(15, 1, 1)] + [(41, 4, i // 4) for i in c_in[1:-1]] + [(5, 1, 1)]
        self.convs = nn.ModuleList(
            weight_normed(nn.Conv1d(i, o, k, s, groups=g, padding=same_padding(k)))
            for i, o, (k, s, g) in zip(c_in, channels, shapes, strict=True)
        )
        self.conv_post = weight_normed(nn.Conv1d(channels[-1], 1, 3, 1, padding=1))

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return _conv_stack(wave, self.convs, self.conv_post)


class MultiPeriodDiscriminator(nn.Module):
    """``[DiscriminatorS, DiscriminatorP(p) for p in periods]`` on one batch of waveforms."""

    def __init__(self, config: S2Config) -> None:
        super().__init__()
        self.config = config
        self.discriminators = nn.ModuleList(
            [DiscriminatorS(config.disc_s_channels)]
            + [DiscriminatorP(p, config.disc_channels) for p in config.disc_periods]
        )

    def module_groups(self) -> dict[str, tuple[str, ...]]:
        return {
            "scale": ("discriminators.0",),
            "periods": tuple(f"discriminators.{i}" for i in range(1, len(self.discriminators))),
        }

    def lora_targets(self) -> tuple[str, ...]:
        """None: the discriminator is small next to G and trains in full (its 2-D convs have no LoRA)."""
        return ()

    def frozen_prefixes(self) -> tuple[str, ...]:
        return ()

    def forward(self, wave: torch.Tensor) -> tuple[Scores, FeatureMaps]:
        """``wave [B, 1, samples]`` -> (per-discriminator scores ``[B, n]``, feature maps)."""
        scores, fmaps = [], []
        for disc in self.discriminators:
            score, fmap = disc(wave)
            scores.append(score)
            fmaps.append(fmap)
        return scores, fmaps


__all__ = ["DiscriminatorP", "DiscriminatorS", "FeatureMaps", "MultiPeriodDiscriminator", "Scores"]
