"""What one DP-SGD step computes: the interface the :class:`~fedvox.client.dp.Trainer` drives.

A task (one per stage, :mod:`fedvox.client.stages`) names the modules that get their own DP
optimizer (s1: the GPT; s2: generator and discriminator, privatised on the same Poisson batch),
builds their optimizers, and runs forward and backward for a chunk of examples. It returns *sums*
over the chunk, so the caller can split a logical batch into any physical batches and still
report exact means.

Per-sample randomness (s2's decoder slice and posterior noise) is drawn from a generator keyed by
(step seed, example index), so an example sees the same randomness whichever chunk it lands in:
that is what makes the update independent of the physical batch size.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import nn

from fedvox.client.dp.grad_sample import PrivateGradSampleModule


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for ``bf16``/``fp16``; nothing for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


FUSED_DEVICES = frozenset({"cpu", "cuda"})
"""Where torch has a fused AdamW kernel: one pass over each tensor instead of a dozen small ops
per tensor (CPU, tiny s1's 39 tensors: 0.33 against 1.37 ms a step; base s1 LoRA's 72: 0.38
against 1.95 ms)."""


def adamw(groups: list[dict[str, Any]], learning_rate: float, **options: Any) -> torch.optim.AdamW:
    """AdamW over parameter ``groups``, fused where all of them live on a device that has the kernel."""
    devices = {p.device.type for group in groups for p in group["params"]}
    fused = devices <= FUSED_DEVICES and len(devices) == 1
    return torch.optim.AdamW(groups, lr=learning_rate, fused=fused or None, **options)


class Examples(Protocol):
    """A map-style dataset of known length: the trainer samples indices into it."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


class Task(ABC):
    """One stage's training and evaluation step, independent of how batches are split."""

    stage: str
    model: nn.Module
    """Everything the task trains (s1: the GPT; s2: the generator/discriminator pair)."""
    dataset: Examples
    """The training examples the trainer's Poisson batches index."""

    def __init__(self, device: torch.device, precision: str, loss_scale: float) -> None:
        self.device = device
        self.precision = precision
        self.loss_scale = loss_scale if precision == "fp16" else 1.0

    @abstractmethod
    def parts(self) -> dict[str, nn.Module]:
        """The modules that each get a DP optimizer (and their own noise)."""

    @abstractmethod
    def optimizer(self, name: str, module: nn.Module, learning_rate: float) -> torch.optim.Optimizer:
        """The (non-private) optimizer that DP-SGD wraps for part ``name``."""

    @abstractmethod
    def accumulate(self, wrapped: Mapping[str, nn.Module], indices: torch.Tensor, step_seed: int) -> dict[str, float]:
        """Forward + backward over examples ``indices`` through the Opacus-wrapped ``parts``."""

    @abstractmethod
    def evaluate(self, dataset: Examples, indices: torch.Tensor) -> dict[str, float]:
        """Validation sums over ``indices`` of ``dataset`` (keys ending in ``_sum`` or counts)."""

    def accumulate_without_adversary(self, indices: torch.Tensor, step_seed: int) -> tuple[dict[str, float], list[str]]:
        """Non-private forward + backward of the losses that need no adversary, for pretraining's
        first steps before a discriminator joins; returns the sums and the parts it trained. A
        stage without an adversary (s1) trains all of itself, as :meth:`accumulate` does."""
        parts = self.parts()
        return self.accumulate(parts, indices, step_seed), list(parts)

    def means(self, sums: dict[str, float]) -> dict[str, float]:
        """Per-example means of summed step or evaluation metrics (keys ending in ``_sum``); a
        task adds its own (s1: per token)."""
        examples = max(sums.get("examples", 0.0), 1.0)
        return {k[: -len("_sum")]: v / examples for k, v in sums.items() if k.endswith("_sum")}

    def _backward(self, per_sample: torch.Tensor, module: nn.Module) -> None:
        """Back-propagate the summed (and loss-scaled) per-sample losses into ``module`` (the DP
        engine's backward skips the summed gradients DP-SGD discards)."""
        loss = per_sample.sum() * self.loss_scale
        if isinstance(module, PrivateGradSampleModule):
            module.backward(loss)
        else:
            loss.backward()


__all__ = ["Examples", "Task", "autocast"]
