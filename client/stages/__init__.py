"""The stages on the client: each stage's examples, dataset and DP training task.

The shared half of each stage (presets, model, headline metric, exports) is its recipe in
:mod:`fedvox.shared.stages`; the client half is the ``CLIENT_STAGE`` of the module of the same
name here (:mod:`.s1`, :mod:`.s2`), looked up through the shared registry and loaded on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedvox.client.data.cache import FeatureCache
from fedvox.client.data.datasets import S1Dataset, S1Example, S2Dataset, S2Example
from fedvox.client.data.split import holdout_split
from fedvox.client.dp.task import Examples, Task
from fedvox.client.profiles import ResourceProfile
from fedvox.shared.stages import recipe

if TYPE_CHECKING:
    from fedvox.client.stages.s1 import S1Task
    from fedvox.client.stages.s2 import S2Task

CacheDataset = S1Dataset | S2Dataset


@dataclass(frozen=True)
class ClientStage:
    """A stage's training example, its dataset over a prepared feature cache and its training task."""

    example: type[S1Example] | type[S2Example]
    dataset: type[S1Dataset] | type[S2Dataset]
    task: type[S1Task] | type[S2Task]


def client_stage(stage: str) -> ClientStage:
    """The client half of ``stage`` (validated against the shared registry)."""
    return importlib.import_module(f"{__name__}.{recipe(stage).name}").CLIENT_STAGE


def build_task(stage: str, model: torch.nn.Module, dataset: Examples, profile: ResourceProfile) -> Task:
    """The stage's task on the profile's device and precision."""
    return client_stage(stage).task.for_profile(model, dataset, profile)


def datasets(stage: str, data_dir: Path, validation_fraction: float) -> tuple[CacheDataset, CacheDataset]:
    """``(train, validation)`` datasets of the prepared cache, split deterministically."""
    cache = FeatureCache(data_dir)
    train_items, val_items = holdout_split(cache.read_index().items, validation_fraction)
    kind = client_stage(stage).dataset
    return kind(cache, train_items), kind(cache, val_items)


__all__ = ["CacheDataset", "ClientStage", "build_task", "client_stage", "datasets"]
