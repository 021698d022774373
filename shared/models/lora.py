"""LoRA adapters that Opacus samples natively.

A LoRA layer keeps the frozen base layer as a child and adds ``scaling * B(A(x))`` with ``A`` and
``B`` plain ``nn.Linear`` (or ``nn.Conv1d``) children, so Opacus's own Linear/Conv1d grad samplers
compute exact per-sample gradients for the adapters and the wrapper itself owns no parameter.
``B`` starts at zero, so wrapping never changes the model's output.

The adapters are created on the base layer's own device and dtype and are ordinary child modules
that ``model.to()`` moves with everything else. That rules out the PEFT + Opacus hazard
(opacus#820) where lazily placed adapters sit on another device than the model and silently never
update; the tests assert that adapters change after one DP step.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from fedvox.shared.errors import ConfigError


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * lora_B(lora_A(x))`` around a frozen ``nn.Linear``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        _check_rank(rank, alpha)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The adapter as a dense weight update, same shape as ``base.weight``."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling


class LoRAConv1d(nn.Module):
    """``base(x) + (alpha / rank) * lora_B(lora_A(x))`` around a frozen ``nn.Conv1d``.

    ``lora_A`` copies the base convolution's geometry (kernel, stride, padding, dilation, padding
    mode) so its output is aligned with the base output; ``lora_B`` is a 1x1 convolution. The pair
    is therefore one convolution with weight ``B @ A``, which is what :meth:`delta_weight` merges.
    """

    def __init__(self, base: nn.Conv1d, rank: int, alpha: float) -> None:
        super().__init__()
        _check_rank(rank, alpha)
        if base.groups != 1:
            raise ConfigError(
                f"LoRA on a grouped Conv1d (groups={base.groups}) is not supported; "
                "leave it out of the model's lora_targets()"
            )
        weight = base.weight
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Conv1d(
            base.in_channels,
            rank,
            base.kernel_size[0],
            stride=base.stride[0],
            padding=base.padding if isinstance(base.padding, str) else base.padding[0],
            dilation=base.dilation[0],
            padding_mode=base.padding_mode,
            bias=False,
            device=weight.device,
            dtype=weight.dtype,
        )
        self.lora_B = nn.Conv1d(rank, base.out_channels, 1, bias=False, device=weight.device, dtype=weight.dtype)
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The adapter as a dense ``[out, in, kernel]`` weight update."""
        return torch.einsum("or,rik->oik", self.lora_B.weight[:, :, 0], self.lora_A.weight) * self.scaling


LoRALayer = LoRALinear | LoRAConv1d
"""Either LoRA wrapper (usable with ``isinstance``)."""


def wrap_with_lora(base: nn.Module, rank: int, alpha: float) -> LoRALayer:
    """The LoRA wrapper for ``base`` (an ``nn.Linear`` or ``nn.Conv1d``, weight-normed or not)."""
    if isinstance(base, nn.Linear):
        return LoRALinear(base, rank, alpha)
    if isinstance(base, nn.Conv1d):
        return LoRAConv1d(base, rank, alpha)
    raise ConfigError(
        f"LoRA supports nn.Linear and nn.Conv1d, not {type(base).__name__}; "
        "remove this module from the model's lora_targets()"
    )


@torch.no_grad()
def merged_base_state(layer: LoRALayer) -> dict[str, torch.Tensor]:
    """The base layer's state dict with the adapter folded in (the layer itself is unchanged).

    For a base weight-normed with ``torch.nn.utils.parametrizations.weight_norm`` the merged weight
    ``W + delta`` is re-expressed as ``g * v / ||v||`` with ``v = W + delta`` and ``g = ||v||``
    (norm over every dim except the parametrization's ``dim``), so the merged state loads into the
    same weight-normed module and reproduces ``W + delta`` exactly up to rounding.
    """
    base = layer.base
    state = {name: tensor.detach().clone() for name, tensor in base.state_dict().items()}
    merged = base.weight.detach() + layer.delta_weight().to(base.weight.dtype)
    if parametrize.is_parametrized(base, "weight"):
        (norm,) = cast(Any, base).parametrizations.weight  # weight_norm registers exactly one parametrization
        state["parametrizations.weight.original0"] = torch.norm_except_dim(merged, 2, norm.dim)
        state["parametrizations.weight.original1"] = merged
    else:
        state["weight"] = merged
    return state


def _check_rank(rank: int, alpha: float) -> None:
    if rank < 1:
        raise ConfigError(f"LoRA rank must be a positive integer, got {rank}")
    if alpha <= 0:
        raise ConfigError(f"LoRA alpha must be positive, got {alpha}")


__all__ = [
    "LoRAConv1d",
    "LoRALayer",
    "LoRALinear",
    "merged_base_state",
    "wrap_with_lora",
]
