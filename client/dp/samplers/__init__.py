"""Every per-sample gradient sampler fedvox adds to Opacus, registered on import.

Opacus looks a module's sampler up by its type. Two stages' layers need formulas of their own
(s1's scaled sine embedding, s2's channel-first LayerNorm, relative attention and weight-normed
convolutions); without them Opacus falls back to functorch, which is exact but slower. Plain
convolutions get fedvox's grouped-convolution formula (:mod:`.conv`) instead of Opacus's unfold,
and linear and LayerNorm layers leaner formulas than Opacus's (:mod:`.dense`).
:func:`sampler_key` is the key :class:`~fedvox.client.dp.grad_sample.DirectGradSampleModule`
looks up: the module's type, or a fixed key for a (weight-normed) convolution.
"""

from __future__ import annotations

from torch import nn

from fedvox.client.dp.samplers import conv, dense, s1, s2


def sampler_key(module: nn.Module) -> type:
    """The key Opacus finds ``module``'s grad sampler under."""
    return s2.weight_norm_key(module) or conv.conv_key(module) or dense.dense_key(module) or type(module)


__all__ = ["conv", "dense", "s1", "s2", "sampler_key"]
