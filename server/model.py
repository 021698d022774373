"""The global model of a run, and its export for GPT-SoVITS.

Only the trainable subset travels and is checkpointed; the frozen base is rebuilt from the run
configuration by :meth:`shared.runconfig.RunConfig.build_model`, exactly as every client rebuilds it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedvox.shared.models.factory import export_all, pretrained_file
from fedvox.shared.models.subsets import load_trainable_state_dict, trainable_state_dict
from fedvox.shared.runconfig import RunConfig
from fedvox.shared.semantic import file_digest

log = logging.getLogger(__name__)


def initial_subset(config: RunConfig) -> dict[str, torch.Tensor]:
    """The trainable subset a fresh run starts from (what the first round sends)."""
    return trainable_state_dict(config.build_model())


def base_identity(config: RunConfig) -> dict[str, Any]:
    """What identifies the frozen base a checkpoint's subset belongs to (with the SHA-256 of the
    pretrained file, so a checkpoint says which export of the shipped base it fine-tuned)."""
    path = pretrained_file(config.stage, config.model_config, config.pretrained)
    return {
        "stage": config.stage,
        "model-config": config.model_config,
        "model-seed": config.model_seed,
        "subset": config.subset,
        **({"groups": config.groups} if config.groups else {}),
        "lora-rank": config.lora_rank,
        "lora-alpha": config.lora_alpha,
        "pretrained": config.pretrained,
        "pretrained-sha256": file_digest(path, 64) if path is not None and path.is_file() else None,
    }


def export_model(config: RunConfig, subset: Mapping[str, torch.Tensor], folder: str | Path) -> list[Path]:
    """The global model, LoRA merged: fedvox safetensors in ``folder/fedvox`` (any config), and
    GPT-SoVITS's own files in ``folder/gpt-sovits`` (fp16, as its fine-tuning exports) when the
    architecture is an official one; returns the files written."""
    model = config.build_model()
    load_trainable_state_dict(model, subset)
    paths = export_all(config.stage, model, folder)
    log.info("exported %s", ", ".join(str(p) for p in paths))
    return paths


__all__ = ["base_identity", "export_model", "initial_subset"]
