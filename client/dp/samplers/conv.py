"""Per-sample weight gradients of convolutions, computed as convolutions.

For one sample, a convolution's weight gradient is the correlation of its (padded) input with
its output gradient: ``dW[o, i, j] = sum_t dy[o, t] * x[i, t * stride + j * dilation]``. For a
whole batch that is one grouped convolution, with the samples as groups, the output gradients
as kernels, and stride and dilation swapped. Opacus instead unfolds the input (``k`` copies of
it, large for audio-length inputs) and multiplies per sample. On s2's layers (one CPU thread)
the grouped convolution was 1.6-3.3x faster for kernels of 7-41 taps and for the transposed
upsampling convolutions, so those correlate; shorter kernels (3-5 taps) multiply strided windows
of the input, copied once (half the time of ``F.unfold`` building the same matrix on s2's 1-d
layers, the same on its 2-d ones; see :data:`GROUPED_CONV_MIN_KERNEL`). A transposed
convolution's weight gradient is the same correlation with input and output gradient's roles
exchanged; a 1x1 convolution's is a batched matrix product.

:func:`conv_grad_sample` is the sampler of plain ``Conv1d``/``Conv2d``, found under the key
:func:`conv_key` returns (Opacus's own registration for those types stays untouched);
``samplers.s2`` uses :func:`weight_grad` for weight-normed convolutions.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from torch import nn

Conv = nn.Conv1d | nn.Conv2d | nn.ConvTranspose1d


def numeric_geometry(module: nn.Module) -> bool:
    """What the formulas here assume: zero padding given as numbers, no output padding, and for a
    transposed convolution no groups or dilation."""
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return False
    if isinstance(module, nn.ConvTranspose1d):
        return module.groups == 1 and module.dilation == (1,) and module.output_padding == (0,)
    return True


def _padding(layer: Conv) -> tuple[int, ...]:
    if isinstance(layer.padding, str):
        raise TypeError(f"{type(layer).__name__} padding {layer.padding!r}: the per-sample formula needs numbers")
    return layer.padding


GROUPED_CONV_MIN_KERNEL = 7
"""Kernels with this many taps or more correlate as a grouped convolution (no ``taps`` copies of
the input); fewer multiply the input's windows (:func:`_windows`)."""


def _conv_weight_grad(layer: nn.Conv1d | nn.Conv2d, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    taps = math.prod(layer.kernel_size)
    if taps >= GROUPED_CONV_MIN_KERNEL:
        return _correlate(layer, x, dy)
    batch, groups = x.shape[0], layer.groups
    if taps == 1 and all(s == 1 for s in layer.stride) and not any(_padding(layer)):
        patches = x.flatten(2)  # a 1x1 convolution: a batched matrix product, nothing to copy
    else:
        patches = _windows(layer, x, dy.shape[2:])
    positions = patches.shape[-1]  # patches [B, in * taps, L]
    grad = torch.matmul(
        dy.reshape(batch, groups, -1, positions), patches.reshape(batch, groups, -1, positions).transpose(2, 3)
    )  # [B, groups, out / groups, in / groups * taps]
    # the shape from the layer's geometry: under weight_norm, reading ``layer.weight`` recomputes it
    return grad.reshape(batch, layer.out_channels, layer.in_channels // groups, *layer.kernel_size)


def _windows(layer: nn.Conv1d | nn.Conv2d, x: torch.Tensor, positions: torch.Size) -> torch.Tensor:
    """``[B, in * taps, L]``: the padded input's value under each tap at each of the ``positions``.

    One strided view of the (padded) input, tap ``j`` at position ``t`` reading
    ``t * stride + j * dilation``, copied once by the reshape: the matrix ``F.unfold`` builds.
    """
    padding = _padding(layer)
    padded = F.pad(x, [p for p in reversed(padding) for _ in range(2)]) if any(padding) else x
    strides = padded.stride()[2:]
    windows = padded.as_strided(
        (*padded.shape[:2], *layer.kernel_size, *positions),
        (
            *padded.stride()[:2],
            *(d * s for d, s in zip(layer.dilation, strides, strict=True)),
            *(step * s for step, s in zip(layer.stride, strides, strict=True)),
        ),
        padded.storage_offset(),
    )
    return windows.reshape(x.shape[0], -1, math.prod(positions))


def _correlate(layer: nn.Conv1d | nn.Conv2d, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Per-sample ``dW`` as one grouped convolution of the inputs with the output gradients."""
    batch, groups, kernel = x.shape[0], layer.groups, layer.kernel_size
    padding = _padding(layer)
    padded = F.pad(x, [p for p in reversed(padding) for _ in range(2)])
    inputs = padded.reshape(batch * groups, -1, *padded.shape[2:]).transpose(0, 1)  # [in/groups, B*groups, ...]
    kernels = dy.reshape(batch * layer.out_channels, 1, *dy.shape[2:])
    correlate = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
    grad = correlate(inputs, kernels, groups=batch * groups, stride=layer.dilation, dilation=layer.stride)
    for dim, size in enumerate(kernel):  # [in/groups, B*out, *kernel]
        grad = grad.narrow(2 + dim, 0, size)
    return grad.reshape(grad.shape[0], batch, layer.out_channels, *kernel).movedim(0, 2)


def _conv_transpose_weight_grad(layer: nn.ConvTranspose1d, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    # dW[i, o, j] = sum_t x[i, t] * dy[o, t * stride + j - padding]: dy correlated with x
    batch, pad = x.shape[0], _padding(layer)[0]
    inputs = F.pad(dy, (pad, pad)).transpose(0, 1)  # [out, B, (T_in - 1) * stride + k]
    kernels = x.reshape(batch * layer.in_channels, 1, x.shape[-1])
    grad = F.conv1d(inputs, kernels, groups=batch, dilation=layer.stride)  # [out, B*in, k]
    return grad.reshape(layer.out_channels, batch, layer.in_channels, -1).permute(1, 2, 0, 3)


def weight_grad(layer: Conv, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Per-sample ``dW [B, *layer.weight.shape]`` from the layer's input ``x`` and output gradient ``dy``."""
    if isinstance(layer, nn.ConvTranspose1d):
        return _conv_transpose_weight_grad(layer, x, dy)
    return _conv_weight_grad(layer, x, dy)


def conv_grad_sample(
    layer: nn.Conv1d | nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a plain convolution's ``weight`` and ``bias``."""
    dtype = torch.promote_types(backprops.dtype, layer.weight.dtype)
    x, dy = activations[0].to(dtype), backprops.to(dtype)
    grads: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        grads[cast(nn.Parameter, layer.weight)] = weight_grad(layer, x, dy)
    if isinstance(layer.bias, nn.Parameter) and layer.bias.requires_grad:
        grads[layer.bias] = dy.flatten(2).sum(-1)
    return grads


class _Conv1d:
    """Grad-sampler key of a plain ``Conv1d`` (fedvox's formula, not Opacus's unfold)."""


class _Conv2d:
    """Grad-sampler key of a plain ``Conv2d``."""


_KEYS: dict[type[nn.Module], type] = {nn.Conv1d: _Conv1d, nn.Conv2d: _Conv2d}
register_grad_sampler(list(_KEYS.values()))(conv_grad_sample)


def conv_key(module: nn.Module) -> type | None:
    """The key of a plain ``Conv1d``/``Conv2d`` the formula covers, else ``None``."""
    key = _KEYS.get(type(module))
    return key if key is not None and numeric_geometry(module) else None


__all__ = ["conv_grad_sample", "conv_key", "numeric_geometry", "weight_grad"]
