"""Base models a long-lived ClientApp process keeps between messages.

In deployment every message runs in a fresh process and nothing is kept. Where the process
lives on (Flower's simulation engine runs every virtual node's messages in a few Ray actors;
a SuperNode with ``--isolation process`` may reuse its ClientApp process), building the stage's
model from the base checkpoint for every message is the larger part of a message's set-up. The
frozen part of the model is the same for every message of a plan (it is the plan's base); what
differs is the trainable subset, which every handler that trains or evaluates replaces with the
received global one (strictly: every trainable tensor). So a kept model is handed out again
only with the state it had when it was built: its buffers restored and no gradient or
per-sample attribute left from the last message. Only one message uses a process's models at a
time (a ClientApp handles its messages one by one).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedvox.shared.models.factory import build_model
from fedvox.shared.models.subsets import SubsetSpec, load_trainable_state_dict, trainable_state_dict

KEPT_MODELS = 2
"""Models kept per process (one per stage, model config, subset, seed and base in use)."""

_PER_SAMPLE_ATTRIBUTES = ("grad_sample", "summed_grad", "_current_grad_sample", "_forward_counter")


@dataclass(frozen=True)
class _Built:
    """What a model was when it was built: trainable subset, buffers and train/eval modes."""

    trainable: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    modes: dict[str, bool]

    @classmethod
    def of(cls, model: nn.Module) -> _Built:
        return cls(
            {k: v.detach().clone() for k, v in trainable_state_dict(model).items()},
            {k: v.detach().clone() for k, v in model.named_buffers()},
            {name: module.training for name, module in model.named_modules()},
        )

    def restore(self, model: nn.Module) -> None:
        load_trainable_state_dict(model, self.trainable)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(self.buffers[name])
        for name, module in model.named_modules():
            module.training = self.modes[name]
        for param in model.parameters():
            param.grad = None
            for attribute in _PER_SAMPLE_ATTRIBUTES:
                if hasattr(param, attribute):
                    delattr(param, attribute)


_kept: OrderedDict[tuple, tuple[nn.Module, _Built]] = OrderedDict()
_lock = threading.Lock()


def base_model(
    stage: str, model_config: str, subset: SubsetSpec, *, seed: int, pretrained: str | Path | None
) -> nn.Module:
    """``build_model(...)`` as built, reusing one this process built before for the same arguments."""
    key = (stage, model_config, repr(subset), seed, str(pretrained or ""))
    with _lock:
        if key in _kept:
            _kept.move_to_end(key)
            model, built = _kept[key]
            built.restore(model)
            return model
    model = build_model(stage, model_config, subset, seed=seed, pretrained=pretrained)
    with _lock:
        _kept[key] = (model, _Built.of(model))
        while len(_kept) > KEPT_MODELS:
            _kept.popitem(last=False)
    return model


def forget() -> None:
    """Drop every kept model (tests; a process that needs the memory back)."""
    with _lock:
        _kept.clear()


__all__ = ["KEPT_MODELS", "base_model", "forget"]
