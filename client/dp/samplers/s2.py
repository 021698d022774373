"""Exact per-sample gradient formulas for SoVITS layers Opacus has no sampler for.

Without them Opacus falls back to functorch (``vmap`` over a functional copy of the layer), which
is exact but re-runs each layer's forward and backward per sample. Here each gradient is computed
directly from the layer's input and output gradient:

* channel-first :class:`LayerNorm`: ``d gamma = sum_t xhat * dy``, ``d beta = sum_t dy``;
* :class:`RelativeKeys` / :class:`RelativeValues`: the output gradient (resp. the attention
  weights) gathered by relative offset, contracted with the queries (resp. the output gradient);
* convolutions under ``parametrizations.weight_norm`` (Conv1d, Conv2d, ConvTranspose1d): the
  per-sample weight gradient ``dW`` (:func:`fedvox.client.dp.samplers.conv.weight_grad`), then the
  chain rule through ``W = g v / ||v||``: ``dg = <dW, u>``, ``dv = (g / ||v||)(dW - dg u)``
  with ``u = v / ||v||`` (norms per output row, dim 0).

The first three are registered with Opacus on import. Parametrized modules get a fresh class per
instance, so they cannot be registered by type without keeping every model alive in Opacus's
global table; :func:`weight_norm_key` instead maps each weight-normed conv to a fixed key, which
:class:`fedvox.client.dp.grad_sample.DirectGradSampleModule` looks its sampler up by.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm

from fedvox.client.dp.samplers import conv, dense
from fedvox.shared.models.s2.attentions import RelativeKeys, RelativeValues, _window_index
from fedvox.shared.models.s2.modules import LayerNorm

GradSamples = dict[nn.Parameter, torch.Tensor]


def _compute_dtype(backprops: torch.Tensor, param: torch.Tensor) -> torch.dtype:
    return torch.promote_types(backprops.dtype, param.dtype)


@register_grad_sampler(LayerNorm)
def layer_norm_grad_sample(layer: LayerNorm, activations: list[torch.Tensor], backprops: torch.Tensor) -> GradSamples:
    dtype = _compute_dtype(backprops, layer.gamma)
    x, dy = activations[0].to(dtype), backprops.to(dtype)
    xhat = dense.normalized(x, (1,), layer.eps)  # over channels, without F.layer_norm's transposes
    return {layer.gamma: xhat.mul_(dy).flatten(2).sum(-1), layer.beta: dy.flatten(2).sum(-1)}


def _by_offset(x: torch.Tensor, window: int) -> torch.Tensor:
    """``[B, H, T, T]`` (query, key) -> ``[B, H, T, 2*window+1]`` (query, key offset), 0 outside."""
    b, h, t, _ = x.shape
    index = _window_index(t, window, x.device).expand(b, h, t, 2 * window + 1)
    return F.pad(x, (0, 1)).gather(-1, index)


@register_grad_sampler(RelativeKeys)
def relative_keys_grad_sample(
    layer: RelativeKeys, activations: list[torch.Tensor], backprops: torch.Tensor
) -> GradSamples:
    dtype = _compute_dtype(backprops, layer.weight)
    query, dy = activations[0].to(dtype), backprops.to(dtype)
    grad = torch.einsum("bhir,bhid->brd", _by_offset(dy, layer.window), query)
    return {layer.weight: grad.unsqueeze(1)}


@register_grad_sampler(RelativeValues)
def relative_values_grad_sample(
    layer: RelativeValues, activations: list[torch.Tensor], backprops: torch.Tensor
) -> GradSamples:
    dtype = _compute_dtype(backprops, layer.weight)
    attn, dy = activations[0].to(dtype), backprops.to(dtype)
    grad = torch.einsum("bhir,bhid->brd", _by_offset(attn, layer.window), dy)
    return {layer.weight: grad.unsqueeze(1)}


# -- weight-normed convolutions -------------------------------------------------------------------


WeightNormedConv = nn.Conv1d | nn.Conv2d | nn.ConvTranspose1d
"""The convolutions :func:`weight_norm_key` admits under ``parametrizations.weight_norm``."""


def _weight_parametrizations(module: nn.Module) -> parametrize.ParametrizationList:
    """The parametrizations of ``module.weight`` (torch types ``module.parametrizations`` only as
    a submodule)."""
    return cast(parametrize.ParametrizationList, cast(nn.ModuleDict, module.parametrizations)["weight"])


@dataclass
class WeightNormGrads:
    """A weight-normed conv's per-sample gradients before the chain rule into ``v``.

    With ``W = g u``, ``u = v / ||v||`` (per output row): ``dg = <dW, u>`` and
    ``dv = scale (dW - dg u)``, ``scale = g / ||v||``.
    """

    g: nn.Parameter
    v: nn.Parameter
    bias: nn.Parameter | None
    """The trainable bias, if any."""
    rows: torch.Tensor
    """Per-sample ``dW`` by output row, ``[B, rows, rest]``."""
    unit: torch.Tensor
    """``u``, ``[rows, rest]``."""
    scale: torch.Tensor
    """``g / ||v||``, ``[rows]``."""
    d_g: torch.Tensor
    """Per-sample ``dg``, ``[B, rows]``."""
    d_bias: torch.Tensor | None
    """Per-sample bias gradient ``[B, out]``, if the bias is trainable."""


def weight_norm_params(layer: WeightNormedConv) -> tuple[nn.Parameter, nn.Parameter]:
    """``(g, v)``: the magnitude (original0) and direction (original1) of a weight-normed conv."""
    weight = _weight_parametrizations(layer)
    return cast(nn.Parameter, weight.original0), cast(nn.Parameter, weight.original1)


def weight_norm_grads(
    layer: WeightNormedConv, activations: list[torch.Tensor], backprops: torch.Tensor
) -> WeightNormGrads:
    """Per-sample ``dW`` and ``dg`` of a weight-normed conv (and its bias's)."""
    g, v = weight_norm_params(layer)
    dtype = _compute_dtype(backprops, v)
    x, dy = activations[0].to(dtype), backprops.to(dtype)
    rows = conv.weight_grad(layer, x, dy).flatten(2)
    norm = torch.norm_except_dim(v, 2, 0).to(dtype)
    unit = (v.to(dtype) / norm).flatten(1)
    bias = layer.bias if isinstance(layer.bias, nn.Parameter) and layer.bias.requires_grad else None
    return WeightNormGrads(
        g=g,
        v=v,
        bias=bias,
        rows=rows,
        unit=unit,
        scale=(g.to(dtype) / norm).flatten(),
        d_g=torch.linalg.vecdot(rows, unit),
        d_bias=dy.flatten(2).sum(-1) if bias is not None else None,
    )


def weight_norm_conv_grad_sample(
    layer: WeightNormedConv, activations: list[torch.Tensor], backprops: torch.Tensor
) -> GradSamples:
    """Per-sample gradients of ``bias``, ``g`` (original0) and ``v`` (original1) of a weight-normed conv."""
    parts = weight_norm_grads(layer, activations, backprops)
    scale, unit = parts.scale, parts.unit
    # dv = scale * (dW - dg * u), in place on dW (no longer needed) to spare two full-size temporaries
    d_v = parts.rows.mul_(scale[:, None]).addcmul_((parts.d_g * scale)[..., None], unit, value=-1)
    grads: GradSamples = {parts.g: parts.d_g.view(-1, *parts.g.shape), parts.v: d_v.view(-1, *parts.v.shape)}
    if parts.bias is not None and parts.d_bias is not None:
        grads[parts.bias] = parts.d_bias
    return {param: grad for param, grad in grads.items() if param.requires_grad}


class _WeightNormedConv1d:
    """Opacus grad-sampler key of any ``Conv1d`` under ``parametrizations.weight_norm``."""


class _WeightNormedConv2d:
    """Opacus grad-sampler key of any ``Conv2d`` under ``parametrizations.weight_norm``."""


class _WeightNormedConvTranspose1d:
    """Opacus grad-sampler key of any ``ConvTranspose1d`` under ``parametrizations.weight_norm``."""


_WEIGHT_NORM_KEYS: dict[type[nn.Module], type] = {
    nn.Conv1d: _WeightNormedConv1d,
    nn.Conv2d: _WeightNormedConv2d,
    nn.ConvTranspose1d: _WeightNormedConvTranspose1d,
}
register_grad_sampler(list(_WEIGHT_NORM_KEYS.values()))(weight_norm_conv_grad_sample)


def weight_norm_key(module: nn.Module) -> type | None:
    """The fixed key of a weight-normed conv the formulas above cover, else ``None``."""
    if parametrize.is_parametrized(module, "weight"):
        parametrizations = _weight_parametrizations(module)
        base = next((t for t in _WEIGHT_NORM_KEYS if type(module).__bases__ == (t,)), None)
        if (
            base is not None
            and len(parametrizations) == 1
            and isinstance(parametrizations[0], _WeightNorm)
            and parametrizations[0].dim == 0
            and conv.numeric_geometry(module)
        ):
            return _WEIGHT_NORM_KEYS[base]
    return None


__all__ = [
    "WeightNormGrads",
    "layer_norm_grad_sample",
    "relative_keys_grad_sample",
    "relative_values_grad_sample",
    "weight_norm_conv_grad_sample",
    "weight_norm_grads",
    "weight_norm_key",
    "weight_norm_params",
]
