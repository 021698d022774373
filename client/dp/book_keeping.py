"""Book-keeping clipping (Bu et al., ICML 2023): per-sample norms first, clipped sums later.

DP-SGD needs each sample's gradient norm over all trainable tensors, then ``sum_i c_i g_i`` with
``c_i = min(1, C / ||g_i||)``. Hooks-mode DP-SGD materialises every ``g_i`` and reads it twice
more (norm, weighted sum). For some layers the norm is cheaper from what the backward pass
already had, the layer's input ``a`` and output gradient ``d``, and the clipped sum is one product
over the flattened batch once the clip factors are known: ``sum_i c_i a_i^T d_i = a^T (c * d)``,
the cost of the ordinary weight gradient, with no second backward. A :class:`Record` keeps what
a layer needs for that (its "book") and the layer's per-sample squared norms; the DP optimizer
combines every record's norms with the explicit per-sample gradients', then asks each record
for its clipped sums. Per layer:

* ``nn.Linear`` over a sequence of ``T`` positions (:func:`linear_record`): the ghost norm
  ``||sum_t d_t a_t^T||^2 = sum_{t,s} (a_t . a_s)(d_t . d_s)`` costs ``B T^2 (d_in + d_out)``
  against ``B T d_in d_out`` for the explicit gradient plus its memory passes;
  :func:`ghost_norm_is_cheaper` chooses by the layer's shape, and the explicit sampler runs
  otherwise.
* weight-normed convolutions with more than :data:`SMALL_TENSOR_NUMEL` weights
  (:func:`weight_norm_record`): the per-sample ``dW`` is needed for
  the norm (a ghost norm over ``T^2`` loses for audio-length ``T``), but not the per-sample
  ``dv``: with ``dv = s (dW - dg u)`` and ``u`` a unit row, ``||dv||^2 = s^2 (||dW||^2 - dg^2)``
  per row, and ``sum_i c_i dv_i = s (sum_i c_i dW_i - (sum_i c_i dg_i) u)``: the chain rule
  runs once on the clipped sum instead of once per sample. A layer used several times in one
  pass (the discriminator sees real and generated audio) keeps the sum of its uses' ``dW``.
  A smaller one takes the explicit path: its per-sample gradients join the optimizer's flat
  buffer of small tensors, clipped with one norm and one product for all of them, where its
  record would cost about fifteen small calls of its own (s2 has 52 such layers of 59).

Records are exact (tests/test_dp_book_keeping.py checks norms and clipped sums against
per-example autograd); they hold one physical batch, so the optimizer must step after each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from fedvox.client.dp.samplers import s2

SMALL_TENSOR_NUMEL = 8192
"""Per-sample gradients of tensors up to this size (per sample) are clipped as one flat ``[B, P]``
buffer per dtype (:class:`~fedvox.client.dp.optimizer.FedvoxDPOptimizer`): one norm and one
weighted sum for all of them instead of a few small calls per tensor (s2 has hundreds of biases,
LayerNorm and small conv weights). The copy this costs is bounded by ``B`` times the small
tensors' total size, a fraction of the larger ones'."""

GHOST_NORM_FACTOR = 32.0
"""Ghost norm where ``T^2 (d_in + d_out) < GHOST_NORM_FACTOR * d_in * d_out``: on the 2-core AVX-512
CPU the two paths cost the same at a ratio of about 36 (s1 v2 shapes, one thread)."""


@dataclass
class Record:
    """One layer's book: what its per-sample norms and clipped sums are computed from."""

    params: tuple[nn.Parameter, ...]
    samples: tuple[torch.Tensor, ...]
    """Batch-first tensors both read (rows of non-finite samples get zeroed before the sums)."""
    norms: Callable[[tuple[torch.Tensor, ...]], torch.Tensor]
    """``norms(samples)``: ``[B]`` squared per-sample gradient norm over ``params``."""
    combine: Callable[[torch.Tensor, tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]
    """``combine(c, samples)``: ``sum_i c_i g_i`` for each of ``params``, shaped like it."""
    additive: bool
    """Whether a layer used several times in one pass has the sum of its uses' ``samples`` as book
    (true where ``samples`` are per-sample gradients; a ghost norm's inputs are not)."""

    def norms_sq(self) -> torch.Tensor:
        return self.norms(self.samples)

    def clipped_sums(self, clip_factor: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """``sum_i c_i g_i`` per parameter; samples outside ``keep`` contribute exactly zero."""
        samples = self.samples
        if keep is not None:  # 0 * inf is NaN: zero the rows, not just their factor
            samples = tuple(torch.where(keep.view(-1, *[1] * (t.dim() - 1)), t, torch.zeros_like(t)) for t in samples)
        return self.combine(clip_factor, samples)

    def plus(self, other: Record) -> Record:
        """The book of two uses of the layer in one pass."""
        return replace(self, samples=tuple(a + b for a, b in zip(self.samples, other.samples, strict=True)))


def ghost_norm_is_cheaper(positions: int, d_in: int, d_out: int) -> bool:
    """Whether a linear layer's ghost norm beats its explicit per-sample gradient."""
    return positions * positions * (d_in + d_out) < GHOST_NORM_FACTOR * d_in * d_out


def linear_record(layer: nn.Linear, activations: list[torch.Tensor], backprops: torch.Tensor) -> Record | None:
    """The ghost-norm record of a linear layer, or ``None`` where the explicit gradient is cheaper."""
    weight, bias = layer.weight, layer.bias
    if not isinstance(weight, nn.Parameter) or not weight.requires_grad:
        return None
    batch = backprops.shape[0]
    if not ghost_norm_is_cheaper(
        backprops.numel() // max(batch * layer.out_features, 1), layer.in_features, layer.out_features
    ):
        return None
    dtype = torch.promote_types(backprops.dtype, weight.dtype)
    a = activations[0].to(dtype).reshape(batch, -1, layer.in_features)
    d = backprops.to(dtype).reshape(batch, -1, layer.out_features)
    if isinstance(bias, nn.Parameter) and bias.requires_grad:
        return Record((weight, bias), (a, d, d.sum(1)), _linear_norms, _linear_sums, additive=False)
    return Record((weight,), (a, d), _linear_norms, _linear_sums, additive=False)


def _linear_norms(samples: tuple[torch.Tensor, ...]) -> torch.Tensor:
    a, d = samples[0], samples[1]
    norms_sq = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(d, d.transpose(1, 2))).sum((1, 2))
    return norms_sq if len(samples) == 2 else norms_sq + samples[2].pow(2).sum(1)


def _linear_sums(c: torch.Tensor, samples: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    a, d = samples[0], samples[1]
    c = c.to(d.dtype)
    sums = ((d * c[:, None, None]).flatten(0, 1).t() @ a.flatten(0, 1),)
    return sums if len(samples) == 2 else (*sums, c @ samples[2])


def weight_norm_record(
    layer: s2.WeightNormedConv, activations: list[torch.Tensor], backprops: torch.Tensor
) -> Record | None:
    """The record of a weight-normed conv whose parameters all train."""
    g, v = s2.weight_norm_params(layer)
    bias = layer.bias
    if not (g.requires_grad and v.requires_grad and (bias is None or bias.requires_grad)):
        return None
    parts = s2.weight_norm_grads(layer, activations, backprops)
    unit, scale = parts.unit, parts.scale
    scale_sq = scale * scale

    def norms(samples: tuple[torch.Tensor, ...]) -> torch.Tensor:
        rows, d_g = samples[0], samples[1]
        # ||dv||^2 = s^2 (||dW||^2 - dg^2) per row; clamped: rounding may cross zero when dW ~ dg u
        d_g_sq = d_g * d_g
        row_sq = (torch.linalg.vecdot(rows, rows) - d_g_sq).clamp_(min=0)
        norms_sq = row_sq.mul_(scale_sq).add_(d_g_sq).sum(1)
        return norms_sq if len(samples) == 2 else norms_sq + torch.linalg.vecdot(samples[2], samples[2])

    def sums(c: torch.Tensor, samples: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        c = c.to(samples[0].dtype)
        summed_rows = (c @ samples[0].flatten(1)).view_as(unit)
        summed_g = c @ samples[1]
        summed_v = summed_rows.addcmul_(summed_g[:, None], unit, value=-1).mul_(scale[:, None])
        out = (summed_g.view_as(parts.g), summed_v.view_as(parts.v))
        return out if len(samples) == 2 else (*out, c @ samples[2])

    if parts.bias is None or parts.d_bias is None:
        return Record((parts.g, parts.v), (parts.rows, parts.d_g), norms, sums, additive=True)
    samples = (parts.rows, parts.d_g, parts.d_bias)
    return Record((parts.g, parts.v, parts.bias), samples, norms, sums, additive=True)


Keeper = Callable[[nn.Module, list[torch.Tensor], torch.Tensor], Record | None]
"""``keeper(layer, inputs, output gradient)``: the layer's :class:`Record`, or ``None`` for the
explicit per-sample gradient."""


def keeper_for(module: nn.Module) -> tuple[Keeper, bool] | None:
    """The book-keeping path of ``module`` and whether its records add over uses, if any (a
    weight-normed conv only above :data:`SMALL_TENSOR_NUMEL` weights: the flat buffer clips a
    smaller one's explicit gradients for less)."""
    if type(module) is nn.Linear:
        return linear_record, False  # type: ignore[return-value]
    if (
        isinstance(module, nn.Conv1d | nn.Conv2d | nn.ConvTranspose1d)
        and s2.weight_norm_key(module) is not None
        and s2.weight_norm_params(module)[1].numel() > SMALL_TENSOR_NUMEL
    ):
        return weight_norm_record, True  # type: ignore[return-value]
    return None


__all__ = [
    "GHOST_NORM_FACTOR",
    "SMALL_TENSOR_NUMEL",
    "Keeper",
    "Record",
    "ghost_norm_is_cheaper",
    "keeper_for",
    "linear_record",
]
