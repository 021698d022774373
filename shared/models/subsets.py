"""Which parameters a federated run trains, and the state that travels for them.

A run trains one *subset* of a model (:class:`SubsetSpec`): everything (``full``), low-rank
adapters (``lora``), or named groups of modules (``groups``). :func:`apply_subset` freezes the
rest, so ``requires_grad`` is the single source of truth afterwards: the optimizer, Opacus, the
wire format and checkpoints all read it through :func:`trainable_state_dict`.

Every fedvox model declares three things (the :class:`SubsetModel` protocol):

``module_groups() -> dict[str, tuple[str, ...]]``
    group name -> module-name prefixes (``"h.layers.3.self_attn"``), for ``groups`` runs and
    for training extra groups beside LoRA.
``lora_targets() -> tuple[str, ...]``
    regular expressions, fully matched against module names, selecting the ``nn.Linear`` /
    ``nn.Conv1d`` modules that LoRA wraps.
``frozen_prefixes() -> tuple[str, ...]``
    modules never trained by fedvox in any subset (e.g. s2's VQ quantizer). Freezing only clears
    ``requires_grad``; a model whose frozen modules must also stay in ``eval()`` (VQ codebooks)
    enforces that itself, because ``model.train()`` would undo anything set here.

Applying a subset never changes what the model computes: LoRA's ``B`` starts at zero and no
module's mode is touched.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar, runtime_checkable

import torch
from opacus import GradSampleModule
from torch import nn

from fedvox.shared.errors import CheckpointError, ConfigError
from fedvox.shared.models.lora import LoRALayer, merged_base_state, wrap_with_lora

SubsetKind = Literal["full", "lora", "groups"]
M = TypeVar("M", bound=nn.Module)
SUBSET_KINDS: tuple[str, ...] = ("full", "lora", "groups")


@runtime_checkable
class SubsetModel(Protocol):
    """What a model declares so :func:`apply_subset` can select its trainable parameters."""

    def module_groups(self) -> dict[str, tuple[str, ...]]: ...

    def lora_targets(self) -> tuple[str, ...]: ...

    def frozen_prefixes(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class SubsetSpec:
    """A trainable subset: ``kind`` plus LoRA hyper-parameters and extra module groups.

    ``groups`` names the groups trained by a ``groups`` run; in a ``lora`` run they are trained
    in full beside the adapters (e.g. ``("norms",)``) and must not contain LoRA targets.
    ``lora_groups`` keeps, in a ``lora`` run, only the LoRA targets inside these groups (empty:
    every target): fewer adapters spread DP noise over fewer coordinates.
    ``adversary`` is for a stage trained beside an adversary (s2's discriminator): ``False``
    leaves it frozen, so the stage trains on its reconstruction losses alone (stages without
    one ignore it).
    """

    kind: SubsetKind = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    groups: tuple[str, ...] = field(default_factory=tuple)
    lora_groups: tuple[str, ...] = field(default_factory=tuple)
    adversary: bool = True

    def __post_init__(self) -> None:
        if self.kind not in SUBSET_KINDS:
            raise ConfigError(f"unknown subset kind {self.kind!r}; use one of {', '.join(SUBSET_KINDS)}")
        if self.kind == "groups" and not self.groups:
            raise ConfigError('a groups subset needs at least one group name (groups = "decoder", --groups decoder)')
        if self.kind == "full" and self.groups:
            raise ConfigError("a 'full' subset trains every group already; leave groups empty")
        if self.kind != "lora" and self.lora_groups:
            raise ConfigError(f"lora_groups only narrows a 'lora' subset, not a {self.kind!r} one; leave it empty")


def apply_subset(model: M, spec: SubsetSpec) -> M:
    """Freeze everything outside ``spec`` and inject LoRA adapters for ``lora``; returns ``model``.

    Call it once, on a model that will not be re-wrapped, and build the optimizer afterwards from
    ``[p for p in model.parameters() if p.requires_grad]``.
    """
    if not isinstance(model, SubsetModel):
        raise ConfigError(
            f"{type(model).__name__} does not declare module_groups(), lora_targets() and "
            "frozen_prefixes(); see shared/models/subsets.py"
        )
    if any(isinstance(m, LoRALayer) for m in model.modules()):
        raise ConfigError("LoRA adapters are already in this model; apply a subset to a fresh model")
    frozen = model.frozen_prefixes()
    group_prefixes = _group_prefixes(model, spec.groups)

    model.requires_grad_(False)
    if spec.kind == "full":
        _unfreeze(model, ("",), frozen)
        return model
    _unfreeze(model, group_prefixes, frozen)
    if spec.kind == "lora":
        within = _group_prefixes(model, spec.lora_groups) or ("",)
        targets = [
            name
            for name, _ in model.named_modules()
            if name and _matches_any(name, model.lora_targets()) and _under(name, within) and not _under(name, frozen)
        ]
        if not targets:
            raise ConfigError(
                f"no module of {type(model).__name__} matches its lora_targets()"
                + (f" inside groups {list(spec.lora_groups)}" if spec.lora_groups else "")
            )
        overlap = [name for name in targets if _under(name, group_prefixes)]
        if overlap:
            raise ConfigError(
                f"groups {list(spec.groups)} contain LoRA targets (e.g. {overlap[0]}); "
                "train those modules with LoRA or as a group, not both"
            )
        for name in targets:
            parent, attr = _parent(model, name)
            setattr(parent, attr, wrap_with_lora(getattr(parent, attr), spec.lora_rank, spec.lora_alpha))
    return model


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of every trainable parameter, detached copies: what goes on the wire."""
    return {name: param.detach().clone() for name, param in _unwrap(model).named_parameters() if param.requires_grad}


@torch.no_grad()
def load_trainable_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the trainable parameters; keys and shapes must match exactly."""
    params = {name: p for name, p in _unwrap(model).named_parameters() if p.requires_grad}
    missing = sorted(params.keys() - state.keys())
    unexpected = sorted(state.keys() - params.keys())
    if missing or unexpected:
        raise CheckpointError(
            "trainable state does not match the model's trainable subset: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}); both sides must use the same model config and subset"
        )
    for name, param in params.items():
        value = state[name]
        if tuple(value.shape) != tuple(param.shape):
            raise CheckpointError(
                f"trainable tensor {name}: expected shape {tuple(param.shape)}, got "
                f"{tuple(value.shape)}; both sides must use the same model config and LoRA rank"
            )
        param.copy_(value)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict with every LoRA adapter folded into its base layer.

    Keys are those of the model without adapters (``q_proj.weight``, not
    ``q_proj.base.weight``), so the result loads into a plain model and exports to the official
    formats. The model is not modified.
    """
    model = _unwrap(model)
    adapted = {f"{name}.": module for name, module in model.named_modules() if isinstance(module, LoRALayer)}
    merged: dict[str, torch.Tensor] = {}
    emitted: set[str] = set()
    for key, tensor in model.state_dict().items():
        prefix = next((p for p in adapted if key.startswith(p)), None)
        if prefix is None:
            merged[key] = tensor.detach().clone()
        elif prefix not in emitted:  # first key of this adapter: emit its merged base layer here
            emitted.add(prefix)
            merged.update({prefix + k: v for k, v in merged_base_state(adapted[prefix]).items()})
    return merged


def _group_prefixes(model: SubsetModel, names: tuple[str, ...]) -> tuple[str, ...]:
    groups = model.module_groups()
    unknown = [name for name in names if name not in groups]
    if unknown:
        raise ConfigError(
            f"unknown module group(s) {unknown} for {type(model).__name__}; choose from {', '.join(sorted(groups))}"
        )
    return tuple(prefix for name in names for prefix in groups[name])


def _unfreeze(model: nn.Module, prefixes: tuple[str, ...], frozen: tuple[str, ...]) -> None:
    for name, param in model.named_parameters():
        if _under(name, prefixes) and not _under(name, frozen):
            param.requires_grad_(True)


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``name`` is one of ``prefixes`` or inside one (``""`` covers everything)."""
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def _matches_any(name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.fullmatch(pattern, name) for pattern in patterns)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside an Opacus ``GradSampleModule`` (names without ``_module.``)."""
    return model._module if isinstance(model, GradSampleModule) else model


__all__ = [
    "SUBSET_KINDS",
    "SubsetKind",
    "SubsetModel",
    "SubsetSpec",
    "apply_subset",
    "load_trainable_state_dict",
    "merged_state_dict",
    "trainable_state_dict",
]
