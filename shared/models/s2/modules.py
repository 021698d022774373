"""Building blocks of SoVITS: channel-first LayerNorm, weight-normed convolutions, WaveNet, ResBlock.

Every module that owns parameters takes one tensor input, or is a native Opacus layer, or only
owns children (masks and conditioning are applied *around* parameterised leaves). Weight norm is
``torch.nn.utils.parametrizations.weight_norm``: it deep-copies, works with Opacus, and its
``original0``/``original1`` are GPT-SoVITS's ``weight_g``/``weight_v`` (``checkpoint.py`` renames).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

LRELU_SLOPE = 0.1


def same_padding(kernel_size: int, dilation: int = 1) -> int:
    """Padding that keeps the length of a stride-1 convolution."""
    return (kernel_size * dilation - dilation) // 2


def weight_normed(conv: nn.Module, init_std: float | None = None) -> nn.Module:
    """``conv`` with weight norm over dim 0 (GPT-SoVITS's layout); optional N(0, std) init first."""
    if init_std is not None:
        weight = conv.weight
        assert isinstance(weight, torch.Tensor)
        nn.init.normal_(weight, 0.0, init_std)
    return weight_norm(conv, name="weight", dim=0)


def sequence_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """``[B, 1, max_length]`` float mask, 1 on the first ``lengths[b]`` frames."""
    steps = torch.arange(max_length, device=lengths.device)
    return (steps.unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(1).float()


def gated_tanh(x: torch.Tensor) -> torch.Tensor:
    """WaveNet gate: ``tanh(first half) * sigmoid(second half)`` over channels."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class LayerNorm(nn.Module):
    """LayerNorm over the channel axis of ``[B, C, T]`` (parameters ``gamma``/``beta`` as upstream)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.transpose(1, -1), (x.shape[1],), self.gamma, self.beta, self.eps)
        return y.transpose(1, -1)


class WN(nn.Module):
    """Non-causal WaveNet stack with a global condition (VITS), used by ``enc_q`` and the flow."""

    def __init__(self, hidden: int, kernel_size: int, dilation_rate: int, n_layers: int, gin_channels: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.cond_layer = weight_normed(nn.Conv1d(gin_channels, 2 * hidden * n_layers, 1))
        self.in_layers = nn.ModuleList()
        self.res_skip_layers = nn.ModuleList()
        for i in range(n_layers):
            dilation = dilation_rate**i
            self.in_layers.append(
                weight_normed(
                    nn.Conv1d(
                        hidden,
                        2 * hidden,
                        kernel_size,
                        dilation=dilation,
                        padding=same_padding(kernel_size, dilation),
                    )
                )
            )
            out = 2 * hidden if i < n_layers - 1 else hidden  # the last layer has no residual half
            self.res_skip_layers.append(weight_normed(nn.Conv1d(hidden, out, 1)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        cond = self.cond_layer(g).chunk(len(self.in_layers), dim=1)
        output = torch.zeros_like(x)
        for i, (in_layer, res_skip) in enumerate(zip(self.in_layers, self.res_skip_layers, strict=True)):
            acts = res_skip(gated_tanh(in_layer(x) + cond[i]))
            if i < len(self.in_layers) - 1:
                x = (x + acts[:, : self.hidden]) * mask
                output = output + acts[:, self.hidden :]
            else:
                output = output + acts
        return output * mask


class ResBlock1(nn.Module):
    """HiFi-GAN residual block type 1: dilated conv then plain conv, per dilation."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            weight_normed(
                nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=same_padding(kernel_size, d)),
                init_std=0.01,
            )
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            weight_normed(nn.Conv1d(channels, channels, kernel_size, padding=same_padding(kernel_size)), init_std=0.01)
            for _ in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2, strict=True):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


__all__ = [
    "LRELU_SLOPE",
    "WN",
    "LayerNorm",
    "ResBlock1",
    "gated_tanh",
    "same_padding",
    "sequence_mask",
    "weight_normed",
]
