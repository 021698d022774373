"""The stages on the client: each stage's dataset and DP training task."""

from __future__ import annotations

from pathlib import Path

import torch

from fedvox.client.data.cache import FeatureCache
from fedvox.client.data.datasets import S1Dataset, S2Dataset
from fedvox.client.data.split import holdout_split
from fedvox.client.dp.task import Task
from fedvox.client.profiles import ResourceProfile
from fedvox.client.stages.s1 import S1Task
from fedvox.client.stages.s2 import S2Task


def build_task(stage: str, model: torch.nn.Module, dataset, profile: ResourceProfile) -> Task:
    """The stage's task on the profile's device and precision."""
    device = torch.device(profile.device)
    if stage == "s1":
        return S1Task(model, dataset, device, profile.precision, profile.loss_scale, profile.checkpointing)
    return S2Task(model, dataset, device, profile.precision, profile.loss_scale)


def datasets(stage: str, data_dir: Path, validation_fraction: float):
    """``(train, validation)`` datasets of the prepared cache, split deterministically."""
    cache = FeatureCache(data_dir)
    train_items, val_items = holdout_split(cache.read_index().items, validation_fraction)
    kind = S1Dataset if stage == "s1" else S2Dataset
    return kind(cache, train_items), kind(cache, val_items)


__all__ = ["S1Task", "S2Task", "build_task", "datasets"]
