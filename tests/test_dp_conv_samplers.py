"""fedvox's per-sample convolution gradients (client/dp/samplers/conv.py) equal per-example autograd.

Every path is covered: 1x1 as a matrix product, short kernels as strided windows of the input
(contiguous or not), long kernels and transposed convolutions as a grouped convolution, with
stride, dilation, padding and groups.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedvox.client.dp.samplers.conv import GROUPED_CONV_MIN_KERNEL, conv_grad_sample, weight_grad

LAYERS = {
    "1x1": lambda: nn.Conv1d(6, 4, 1),
    "windows": lambda: nn.Conv1d(6, 4, 3, stride=2, dilation=2, padding=2, groups=2),
    "windows-unpadded": lambda: nn.Conv1d(6, 4, 5, stride=3),
    "grouped-conv": lambda: nn.Conv1d(4, 8, 9, stride=3, dilation=2, padding=4, groups=2),
    "conv2d-windows": lambda: nn.Conv2d(3, 4, (5, 1), stride=(3, 1), padding=(2, 0)),
    "conv2d-windows-dilated": lambda: nn.Conv2d(4, 6, (3, 2), stride=(1, 2), dilation=(2, 1), padding=(2, 1), groups=2),
    "conv2d-grouped-conv": lambda: nn.Conv2d(2, 4, (7, 3), stride=(2, 1), dilation=(1, 2), padding=(3, 2), groups=2),
    "transposed": lambda: nn.ConvTranspose1d(4, 3, 8, stride=4, padding=2),
}


@pytest.mark.parametrize("name", LAYERS)
def test_per_sample_weight_gradients_equal_per_example_autograd(name: str) -> None:
    torch.manual_seed(0)
    layer = LAYERS[name]().double()
    x = torch.randn(3, layer.in_channels, *((23,) if isinstance(layer, nn.Conv1d | nn.ConvTranspose1d) else (17, 5)))
    x = x.double()
    if name.endswith("unpadded"):  # a view with the channels innermost: windows read its strides
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
        assert not x.is_contiguous()
    target = torch.randn_like(layer(x))

    def loss(i: slice) -> torch.Tensor:  # a non-linear loss, so each sample's dy differs
        return (layer(x[i]) * target[i]).pow(2).sum()

    out = layer(x)
    (dy,) = torch.autograd.grad((out * target).pow(2).sum(), out)
    params = [layer.weight] if isinstance(layer, nn.ConvTranspose1d) else [layer.weight, layer.bias]
    per_example = [torch.autograd.grad(loss(slice(i, i + 1)), params) for i in range(len(x))]
    expected = [torch.stack(rows) for rows in zip(*per_example, strict=True)]
    actual = [weight_grad(layer, x, dy)]
    if not isinstance(layer, nn.ConvTranspose1d):
        actual = list(conv_grad_sample(layer, [x], dy).values())
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_the_layers_above_cover_both_kernel_regimes() -> None:
    names = ("windows", "windows-unpadded", "grouped-conv", "conv2d-windows", "conv2d-windows-dilated")
    taps = [LAYERS[n]().weight[0, 0].numel() for n in (*names, "conv2d-grouped-conv")]
    assert [t >= GROUPED_CONV_MIN_KERNEL for t in taps] == [False, False, True, False, False, True]
