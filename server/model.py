"""The global model of a run: built as every client builds it, and exported for GPT-SoVITS.

Only the trainable subset travels and is checkpointed; the frozen base is rebuilt from the run
configuration (stage, model config, subset, LoRA shape) and ``model-seed``, so server and clients
agree on it without shipping it. s1 is the GPT ``Text2SemanticDecoder``; s2 is the SoVITS
generator (with the run's subset) and its multi-period discriminator (trained in full: it has no
LoRA targets), under the prefixes ``generator.`` and ``discriminator.``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.models.config import s1_config, s2_config
from shared.models.s1 import Text2SemanticDecoder
from shared.models.s1_checkpoint import save_official_s1
from shared.models.s2 import MultiPeriodDiscriminator, SynthesizerTrn
from shared.models.s2.checkpoint import export_discriminator, export_generator
from shared.models.subsets import (
    SubsetSpec,
    apply_subset,
    load_trainable_state_dict,
    merged_state_dict,
    trainable_state_dict,
)
from shared.runconfig import RunConfig

log = logging.getLogger(__name__)


class SoVITSPair(nn.Module):
    """The s2 generator and discriminator trained together (both read private audio)."""

    def __init__(self, generator: SynthesizerTrn, discriminator: MultiPeriodDiscriminator) -> None:
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator


def build_global_model(config: RunConfig) -> nn.Module:
    """The run's model with its trainable subset applied, seeded by ``model-seed``."""
    torch.manual_seed(config.model_seed)
    spec = SubsetSpec(kind=config.subset, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha)
    if config.stage == "s1":
        return apply_subset(Text2SemanticDecoder(s1_config(config.model_config)), spec)
    s2 = s2_config(config.model_config)
    generator = apply_subset(SynthesizerTrn(s2), spec)
    discriminator = apply_subset(MultiPeriodDiscriminator(s2), SubsetSpec(kind="full"))
    return SoVITSPair(generator, discriminator)


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


__all__ = ["SoVITSPair", "base_identity", "build_global_model", "export_gpt_sovits", "initial_subset"]
