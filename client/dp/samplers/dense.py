"""Per-sample gradients of ``nn.Linear`` and ``nn.LayerNorm``, leaner than Opacus's formulas.

Opacus's linear sampler contracts ``"n...i,n...j->nij"`` with ``einsum``, whose parsing and
path search cost a Python call per use; here it is one batched product. Its LayerNorm sampler
recomputes the normalised input with ``F.layer_norm``, which is slow on the CPU for short rows:
:func:`normalized` (a mean, the centred values, their mean square) took 81 us where it took
134 us at s1 tiny's ``[8, 190, 64]`` (one thread, AVX-512 host). These run under keys of their
own (:func:`dense_key`), so Opacus's registrations for the two types stay as they are: stock
Opacus in ``bench/dp_step`` is stock.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn

GradSamples = dict[nn.Parameter, torch.Tensor]


def normalized(x: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over ``dims``, as LayerNorm normalises (biased variance)."""
    centred = x - x.mean(dims, keepdim=True)
    return centred.mul_(torch.rsqrt(centred.square().mean(dims, keepdim=True).add_(eps)))


def linear_grad_sample(layer: nn.Linear, activations: list[torch.Tensor], backprops: torch.Tensor) -> GradSamples:
    """``dW_i = sum_t d_t a_t^T`` as one ``bmm`` over the positions, ``db_i = sum_t d_t``; in the
    output gradient's dtype, as Opacus's formula and autocast's own weight gradients (under bf16
    autocast a layer after a LayerNorm sees float32 inputs: promoting those products to float32
    made them 2x slower and s1 tiny's bf16 DP step 1.23x plain instead of 1.16-1.18x)."""
    batch = backprops.shape[0]
    a = activations[0].to(backprops.dtype).reshape(batch, -1, layer.in_features)
    d = backprops.reshape(batch, -1, layer.out_features)
    grads: GradSamples = {}
    if isinstance(layer.weight, nn.Parameter) and layer.weight.requires_grad:
        grads[layer.weight] = torch.bmm(d.transpose(1, 2), a)
    if isinstance(layer.bias, nn.Parameter) and layer.bias.requires_grad:
        grads[layer.bias] = d.sum(1)
    return grads


def layer_norm_grad_sample(
    layer: nn.LayerNorm, activations: list[torch.Tensor], backprops: torch.Tensor
) -> GradSamples:
    """``dw_i = sum_t dy_t * xhat_t`` and ``db_i = sum_t dy_t``, in float32 or wider."""
    batch, shape = backprops.shape[0], tuple(layer.normalized_shape)
    weight = layer.weight
    dtype = torch.promote_types(backprops.dtype, weight.dtype if weight is not None else torch.float32)
    dy = backprops.to(dtype).reshape(batch, -1, *shape)
    grads: GradSamples = {}
    if isinstance(weight, nn.Parameter) and weight.requires_grad:
        x = activations[0].to(dtype).reshape(batch, -1, *shape)
        dims = tuple(range(-len(shape), 0))
        grads[weight] = normalized(x, dims, layer.eps).mul_(dy).sum(1)
    if isinstance(layer.bias, nn.Parameter) and layer.bias.requires_grad:
        grads[layer.bias] = dy.sum(1)
    return grads


class _Linear:
    """Grad-sampler key of an ``nn.Linear`` (this module's formula, not Opacus's)."""


class _LayerNorm:
    """Grad-sampler key of an ``nn.LayerNorm``."""


register_grad_sampler(_Linear)(linear_grad_sample)
register_grad_sampler(_LayerNorm)(layer_norm_grad_sample)
_KEYS: dict[type[nn.Module], type] = {nn.Linear: _Linear, nn.LayerNorm: _LayerNorm}


def dense_key(module: nn.Module) -> type | None:
    """The key of an exact ``nn.Linear``/``nn.LayerNorm``, else ``None`` (subclasses keep theirs)."""
    return _KEYS.get(type(module))


__all__ = ["dense_key", "layer_norm_grad_sample", "linear_grad_sample", "normalized"]
