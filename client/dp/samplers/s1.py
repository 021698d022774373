"""Per-sample gradient of s1's one layer Opacus has no sampler for: the scaled sine embedding."""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn

from fedvox.shared.models.s1 import SinePositionalEmbedding


@register_grad_sampler(SinePositionalEmbedding)
def sine_embedding_grad_sample(
    layer: SinePositionalEmbedding, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample ``d loss / d alpha = sum(table * grad_output)``, the table being the layer's
    input (broadcast over the batch where every sample has the same positions). Opacus would
    otherwise fall back to functorch, which is slower and warns on every fp32 step."""
    dtype = torch.promote_types(backprops.dtype, layer.alpha.dtype)
    table = activations[0].to(dtype).expand_as(backprops).flatten(1)
    return {layer.alpha: torch.linalg.vecdot(table, backprops.to(dtype).flatten(1)).unsqueeze(1)}


__all__ = ["sine_embedding_grad_sample"]
