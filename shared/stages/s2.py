"""s2, GPT-SoVITS's SoVITS: semantic tokens and a reference spectrogram to speech (a GAN)."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from fedvox.shared.errors import CheckpointError, ConfigError
from fedvox.shared.models.config import S2Config, s2_config
from fedvox.shared.models.factory import SoVITSPair, require_config
from fedvox.shared.models.s2 import MultiPeriodDiscriminator, SynthesizerTrn
from fedvox.shared.models.s2.checkpoint import (
    export_discriminator,
    export_generator,
    load_discriminator,
    load_generator,
    load_model,
    save_model,
)
from fedvox.shared.models.subsets import SubsetSpec, apply_subset, merged_state_dict
from fedvox.shared.stages import StageRecipe

M = TypeVar("M", SynthesizerTrn, MultiPeriodDiscriminator)


def build(config: S2Config, subset: SubsetSpec, pretrained: str | Path | None) -> nn.Module:
    """Generator (with ``subset``) and discriminator (in full: it has no LoRA targets), trained
    together because both read private audio; with ``subset.adversary`` off the discriminator is
    frozen and the generator trains on its reconstruction losses alone (``client.stages.s2``). A
    pretrained ``s2G`` file (GPT-SoVITS ``.pth`` or fedvox ``.safetensors``) brings its ``s2D``
    sibling when there is one, as GPT-SoVITS names them."""
    if pretrained:
        fedvox_file = Path(pretrained).suffix == ".safetensors"
        generator = _load_fedvox(pretrained, SynthesizerTrn) if fedvox_file else load_generator(pretrained, config)
        if fedvox_file:
            require_config(generator.config.name, config.name, pretrained)
        sibling = Path(pretrained).with_name(Path(pretrained).name.replace("s2G", "s2D"))
        has_sibling = sibling != Path(pretrained) and sibling.is_file()
        if not has_sibling:
            discriminator = MultiPeriodDiscriminator(config)
        else:
            discriminator = (
                _load_fedvox(sibling, MultiPeriodDiscriminator) if fedvox_file else load_discriminator(sibling, config)
            )
    else:
        generator, discriminator = SynthesizerTrn(config), MultiPeriodDiscriminator(config)
    apply_subset(discriminator, SubsetSpec(kind="full"))
    if not subset.adversary:
        discriminator.requires_grad_(False)
    return SoVITSPair(apply_subset(generator, subset), discriminator)


def _load_fedvox(path: str | Path, kind: type[M]) -> M:
    """A fedvox safetensors model file that must hold a ``kind`` (generator or discriminator)."""
    model = load_model(path)
    if not isinstance(model, kind):
        raise CheckpointError(f"{path} holds an s2 {type(model).__name__}, not the {kind.__name__} expected here")
    return model


def voice_model(model: nn.Module) -> nn.Module:
    """The generator of a trained pair (a voice never runs the discriminator)."""
    return model.generator if isinstance(model, SoVITSPair) else model


def load_for_voice(path: Path, meta: dict[str, str] | None) -> list[nn.Module] | None:
    """GPT-SoVITS's ``s2G.pth`` or fedvox's ``s2G.safetensors`` (its ``s2D`` is not needed)."""
    if path.suffix.lower() == ".pth":
        return [load_generator(path)]
    if meta is not None and meta.get("format") == "fedvox-s2G":
        return [load_model(path)]
    if meta is not None and meta.get("format") == "fedvox-s2D":
        return []
    return None


def export_fedvox(model: nn.Module, folder: Path, half: bool) -> list[Path]:
    """``s2G.safetensors`` and ``s2D.safetensors``."""
    pair = _pair(model)
    paths = [folder / "s2G.safetensors", folder / "s2D.safetensors"]
    dtype = torch.float16 if half else None
    save_model(_merged_generator(pair), paths[0], dtype=dtype)
    save_model(pair.discriminator, paths[1], dtype=dtype)
    return paths


def export_gpt_sovits(model: nn.Module, folder: Path, half: bool) -> list[Path]:
    """``s2G.pth`` and ``s2D.pth``, GPT-SoVITS's own generator and discriminator files."""
    pair = _pair(model)
    paths = [folder / "s2G.pth", folder / "s2D.pth"]
    export_generator(_merged_generator(pair), paths[0], half=half)
    export_discriminator(pair.discriminator, paths[1], half=half)
    return paths


def _pair(model: nn.Module) -> SoVITSPair:
    if not isinstance(model, SoVITSPair):
        raise ConfigError(f"cannot export a {type(model).__name__} as s2; expected a SoVITSPair")
    return model


def _merged_generator(pair: SoVITSPair) -> SynthesizerTrn:
    """The generator with its LoRA adapters folded in (the discriminator trains in full)."""
    generator = SynthesizerTrn(pair.generator.config)
    generator.load_state_dict(merged_state_dict(pair.generator), strict=True)
    return generator


RECIPE = StageRecipe(
    name="s2",
    title="SoVITS semantic-to-speech",
    synthesis_role="semantic tokens to speech",
    headline_metric="loss",
    headline_description="mel L1 + KL per utterance",
    headline_vocabulary=None,
    config=s2_config,
    build=build,
    base_file="s2G.safetensors",
    voice_model=voice_model,
    load_for_voice=load_for_voice,
    export_fedvox=export_fedvox,
    export_gpt_sovits=export_gpt_sovits,
)

__all__ = ["RECIPE"]
