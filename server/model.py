"""The global model of a run, and its export for GPT-SoVITS.

Only the trainable subset travels and is checkpointed; the frozen base is rebuilt from the run
configuration by :func:`shared.models.factory.build_model`, exactly as every client rebuilds it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.models.factory import build_model
from shared.models.s1 import Text2SemanticDecoder
from shared.models.s1_checkpoint import save_official_s1
from shared.models.s2 import SynthesizerTrn
from shared.models.s2.checkpoint import export_discriminator, export_generator
from shared.models.subsets import SubsetSpec, load_trainable_state_dict, merged_state_dict, trainable_state_dict
from shared.runconfig import RunConfig

log = logging.getLogger(__name__)


def build_global_model(config: RunConfig) -> nn.Module:
    """The run's model with its trainable subset applied (s2: the generator/discriminator pair)."""
    spec = SubsetSpec(kind=config.subset, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha)
    pretrained = config.pretrained or None
    return build_model(config.stage, config.model_config, spec, seed=config.model_seed, pretrained=pretrained)


def initial_subset(config: RunConfig) -> dict[str, torch.Tensor]:
    """The trainable subset a fresh run starts from (what the first round sends)."""
    return trainable_state_dict(build_global_model(config))


def base_identity(config: RunConfig) -> dict[str, Any]:
    """What identifies the frozen base a checkpoint's subset belongs to."""
    return {
        "stage": config.stage,
        "model-config": config.model_config,
        "model-seed": config.model_seed,
        "subset": config.subset,
        "lora-rank": config.lora_rank,
        "lora-alpha": config.lora_alpha,
        "pretrained": config.pretrained,
    }


def export_gpt_sovits(config: RunConfig, subset: Mapping[str, torch.Tensor], folder: str | Path) -> list[Path]:
    """Write the global model (LoRA merged) in GPT-SoVITS's own formats; returns the files.

    s1: ``s1.ckpt``; s2: ``s2G.pth`` and ``s2D.pth``.
    """
    folder = Path(folder)
    model = build_global_model(config)
    load_trainable_state_dict(model, subset)
    if isinstance(model, Text2SemanticDecoder):
        paths = [folder / "s1.ckpt"]
        save_official_s1(model, paths[0], info="fedvox federated")
    else:
        paths = [folder / "s2G.pth", folder / "s2D.pth"]
        export_generator(_merged(model.generator, SynthesizerTrn(model.generator.config)), paths[0])
        export_discriminator(model.discriminator, paths[1])
    log.info("exported %s", ", ".join(str(p) for p in paths))
    return paths


def _merged(adapted: nn.Module, plain: nn.Module) -> nn.Module:
    """``plain`` loaded with ``adapted``'s weights, every LoRA adapter folded in."""
    plain.load_state_dict(merged_state_dict(adapted), strict=True)
    return plain


__all__ = ["base_identity", "build_global_model", "export_gpt_sovits", "initial_subset"]
