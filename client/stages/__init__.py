"""The stages on the client: each stage's dataset and DP training task, registered by name.

The shared half of each stage (presets, model, headline metric, exports) is its recipe in
:mod:`fedvox.shared.stages`; this registry adds what only a device needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fedvox.client.data.cache import FeatureCache
from fedvox.client.data.datasets import S1Dataset, S2Dataset
from fedvox.client.data.split import holdout_split
from fedvox.client.dp.task import Examples, Task
from fedvox.client.profiles import ResourceProfile
from fedvox.client.stages.s1 import S1Task
from fedvox.client.stages.s2 import S2Task
from fedvox.shared.stages import recipe

CacheDataset = S1Dataset | S2Dataset


@dataclass(frozen=True)
class ClientStage:
    """A stage's dataset over a prepared feature cache and its training task."""

    dataset: type[S1Dataset] | type[S2Dataset]
    task: type[S1Task] | type[S2Task]


CLIENT_STAGES = {"s1": ClientStage(S1Dataset, S1Task), "s2": ClientStage(S2Dataset, S2Task)}


def client_stage(stage: str) -> ClientStage:
    """The client half of ``stage`` (validated against the shared registry)."""
    return CLIENT_STAGES[recipe(stage).name]


def build_task(stage: str, model: torch.nn.Module, dataset: Examples, profile: ResourceProfile) -> Task:
    """The stage's task on the profile's device and precision."""
    return client_stage(stage).task.for_profile(model, dataset, profile)


def datasets(stage: str, data_dir: Path, validation_fraction: float) -> tuple[CacheDataset, CacheDataset]:
    """``(train, validation)`` datasets of the prepared cache, split deterministically."""
    cache = FeatureCache(data_dir)
    train_items, val_items = holdout_split(cache.read_index().items, validation_fraction)
    kind = client_stage(stage).dataset
    return kind(cache, train_items), kind(cache, val_items)


__all__ = ["CLIENT_STAGES", "ClientStage", "S1Task", "S2Task", "build_task", "client_stage", "datasets"]
