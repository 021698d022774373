"""Build the model a stage trains, identically on every machine.

Only the trainable subset ever travels; the frozen base is rebuilt from (stage, model config,
subset, LoRA shape, seed) — or loaded from fedvox's shipped base (``pretrained = "fedvox-base"``),
a released GPT-SoVITS checkpoint or a fedvox export — so a server and its clients agree on it
without shipping it. What each stage builds, and how it exports, is its recipe's
(:mod:`fedvox.shared.stages`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from fedvox.shared.errors import CheckpointError, ConfigError
from fedvox.shared.models.config import SHIPPED_BASE, shipped_base_mismatch
from fedvox.shared.models.s2 import MultiPeriodDiscriminator, SynthesizerTrn
from fedvox.shared.models.subsets import SubsetSpec
from fedvox.shared.stages import recipe

log = logging.getLogger(__name__)

BASE_DIR = Path(__file__).resolve().parent / "base"
"""fedvox's shipped pretrained base (package data): ``s1.safetensors``, ``s2G.safetensors``,
``s2D.safetensors`` and the ``provenance.json`` that says how they were made."""


class SoVITSPair(nn.Module):
    """The s2 generator and discriminator, trained together on the same Poisson batches."""

    def __init__(self, generator: SynthesizerTrn, discriminator: MultiPeriodDiscriminator) -> None:
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator


def build_model(
    stage: str,
    model_config: str,
    subset: SubsetSpec,
    *,
    seed: int = 0,
    pretrained: str | Path | None = None,
) -> nn.Module:
    """The stage's model with ``subset`` applied.

    The base is initialised from ``seed`` (deterministic on CPU for a given torch version) or,
    with ``pretrained``, loaded from a GPT-SoVITS checkpoint or a fedvox safetensors export (such
    as the base ``fedvox-sim pretrain-export`` writes), as the stage's recipe says
    (:mod:`fedvox.shared.stages`); ``"fedvox-base"`` is the shipped base (:func:`shipped_base`).
    """
    stage_recipe = recipe(stage)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return stage_recipe.build(
            stage_recipe.config(model_config), subset, pretrained_file(stage, model_config, pretrained)
        )


def pretrained_file(stage: str, model_config: str, pretrained: str | Path | None) -> Path | None:
    """The file a run's ``pretrained`` value names for ``stage``: ``"fedvox-base"`` is the shipped
    base's (:func:`shipped_base`), ``""``/``None`` none (a seeded model), anything else itself."""
    if not pretrained:
        return None
    return shipped_base(stage, model_config) if pretrained == SHIPPED_BASE else Path(pretrained)


def shipped_base(stage: str, model_config: str) -> Path:
    """The file of ``stage`` in fedvox's shipped base; refuses another model config and a checkout
    without the files, saying how to make them."""
    mismatch = shipped_base_mismatch(model_config, SHIPPED_BASE)
    if mismatch:
        raise ConfigError(mismatch)
    path = BASE_DIR / recipe(stage).base_file
    if not path.is_file():
        raise CheckpointError(
            f"fedvox's pretrained base is missing ({path.name} in {BASE_DIR}); make it with `fedvox-sim pretrain "
            f"--out out/pretrain` then `fedvox-sim pretrain-export --from out/pretrain --to {BASE_DIR}`, "
            'or set pretrained to a GPT-SoVITS checkpoint or "" (a seeded model)'
        )
    return path


def require_config(found: str, wanted: str, path: str | Path) -> None:
    """Refuse a pretrained file whose model config is not the run's."""
    if found != wanted:
        raise ConfigError(
            f"{path} holds a {found!r} model but model-config is {wanted!r}; set model-config = {found!r}"
        )


def export_gpt_sovits(stage: str, model: nn.Module, folder: str | Path, *, half: bool = False) -> list[Path]:
    """Write ``model`` (LoRA merged) in GPT-SoVITS's own formats, as the stage's recipe says;
    returns the files written.

    s1: ``s1.ckpt``; s2: ``s2G.pth`` and ``s2D.pth``. ``half`` writes fp16, as GPT-SoVITS's own
    fine-tuning exports are.
    """
    return recipe(stage).export_gpt_sovits(model, Path(folder), half)


def export_fedvox(stage: str, model: nn.Module, folder: str | Path, *, half: bool = False) -> list[Path]:
    """Write ``model`` (LoRA merged) as self-describing fedvox safetensors, any config (tiny too),
    as the stage's recipe says; returns the files written.

    s1: ``s1.safetensors``; s2: ``s2G.safetensors`` and ``s2D.safetensors``. Each file carries
    its config, so it loads without knowing how it was trained. ``half`` writes fp16, as the
    shipped base is.
    """
    return recipe(stage).export_fedvox(model, Path(folder), half)


def export_all(stage: str, model: nn.Module, folder: str | Path) -> list[Path]:
    """Both exports, LoRA merged: fedvox safetensors in ``folder/fedvox`` (any config) and
    GPT-SoVITS's own files in ``folder/gpt-sovits`` (fp16, as its fine-tuning exports) when the
    architecture is an official one; returns the files written."""
    folder = Path(folder)
    paths = export_fedvox(stage, model, folder / "fedvox")
    try:
        paths += export_gpt_sovits(stage, model, folder / "gpt-sovits", half=True)
    except CheckpointError as exc:
        log.info("no GPT-SoVITS export (the fedvox one holds the model): %s", exc)
    return paths
