"""s1, GPT-SoVITS's GPT: text (phonemes) and a prompt to semantic tokens."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedvox.shared.errors import ConfigError
from fedvox.shared.models.config import S1Config, s1_config
from fedvox.shared.models.factory import require_config
from fedvox.shared.models.s1 import Text2SemanticDecoder
from fedvox.shared.models.s1_checkpoint import (
    load_official_s1,
    load_s1_safetensors,
    save_official_s1,
    save_s1_safetensors,
)
from fedvox.shared.models.subsets import SubsetSpec, apply_subset, merged_state_dict
from fedvox.shared.stages import StageRecipe


def build(config: S1Config, subset: SubsetSpec, pretrained: str | Path | None) -> nn.Module:
    """The GPT, fresh or from a GPT-SoVITS ``.ckpt`` or a fedvox ``s1.safetensors`` of the same
    config, with ``subset`` applied."""
    if not pretrained:
        model = Text2SemanticDecoder(config)
    else:
        fedvox_file = Path(pretrained).suffix == ".safetensors"
        model = load_s1_safetensors(pretrained) if fedvox_file else load_official_s1(pretrained, config)
        require_config(model.config.name, config.name, pretrained)
    return apply_subset(model, subset)


def load_for_voice(path: Path, meta: dict[str, str] | None) -> list[nn.Module] | None:
    """GPT-SoVITS's ``.ckpt`` or fedvox's ``s1.safetensors``."""
    if path.suffix.lower() == ".ckpt":
        return [load_official_s1(path)]
    if meta is not None and meta.get("stage") == "s1":
        return [load_s1_safetensors(path)]
    return None


def export_fedvox(model: nn.Module, folder: Path, half: bool) -> list[Path]:
    """``s1.safetensors``."""
    path = folder / "s1.safetensors"
    save_s1_safetensors(_decoder(model), path, dtype=torch.float16 if half else None)
    return [path]


def export_gpt_sovits(model: nn.Module, folder: Path, half: bool) -> list[Path]:
    """``s1.ckpt``, GPT-SoVITS's own checkpoint."""
    plain = Text2SemanticDecoder(_decoder(model).config)
    plain.load_state_dict(merged_state_dict(model), strict=True)
    path = folder / "s1.ckpt"
    save_official_s1(plain, path, info="fedvox", dtype=torch.float16 if half else torch.float32)
    return [path]


def _decoder(model: nn.Module) -> Text2SemanticDecoder:
    if not isinstance(model, Text2SemanticDecoder):
        raise ConfigError(f"cannot export a {type(model).__name__} as s1; expected a Text2SemanticDecoder")
    return model


RECIPE = StageRecipe(
    name="s1",
    title="GPT text-to-semantic",
    synthesis_role="text to semantic tokens",
    headline_metric="loss_per_token",
    headline_description="cross-entropy per semantic token",
    headline_vocabulary=lambda config: config.semantic_vocab,
    config=s1_config,
    build=build,
    base_file="s1.safetensors",
    voice_model=lambda model: model,
    load_for_voice=load_for_voice,
    export_fedvox=export_fedvox,
    export_gpt_sovits=export_gpt_sovits,
)

__all__ = ["RECIPE"]
