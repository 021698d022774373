"""The two GPT-SoVITS stages as explicit recipes, looked up by name through one registry.

A :class:`StageRecipe` declares what the server and every tool need to know about a stage: its
config presets, how its model is built, its headline metric, how it exports and its role in
synthesis. The client-side parts (dataset, training task) are registered per stage beside the
client (:mod:`fedvox.client.stages`). Nothing outside the recipes asks which stage it is.

``STAGES`` is importable without torch (the run configuration validates against it); a recipe's
module, which builds models, loads on first :func:`recipe` call.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedvox.shared.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from fedvox.shared.models.subsets import SubsetSpec

STAGES = ("s1", "s2")
"""The stages in pipeline order: s1 turns text into semantic tokens, s2 semantic tokens into speech."""


@dataclass(frozen=True)
class StageRecipe:
    """Everything stage-specific outside the client's training code."""

    name: str
    title: str
    synthesis_role: str
    """What the stage does in a voice (``fedvox-client synthesize`` needs one model per role)."""
    headline_metric: str
    """The validation metric a run reports as its loss (the ClientApp's ``val-loss``)."""
    headline_description: str
    headline_vocabulary: Callable[[Any], int] | None
    """The vocabulary size (from the stage config) when the headline metric is a cross-entropy per
    predicted token, the semantic codes with EOS last (s1), so that chance levels (uniform,
    unigram) exist to compare it with; ``None`` when it is not (s2)."""
    config: Callable[[str], Any]
    """The named config presets (``tiny``, ``v2``, ...) as the stage's config dataclass."""
    build: Callable[[Any, SubsetSpec, str | Path | None], nn.Module]
    """``build(config, subset, pretrained)``: the trained model (seeded by the caller), subset applied."""
    base_file: str
    """The stage's file in fedvox's shipped base (``shared/models/base``; s2's ``s2D`` lies beside)."""
    voice_model: Callable[[nn.Module], nn.Module]
    """The module a voice runs from a trained model (s2: the generator of the pair)."""
    load_for_voice: Callable[[Path, dict[str, str] | None], list[nn.Module] | None]
    """The models a voice uses in a file (given its safetensors metadata, if any): ``None`` if the
    file is not this stage's, ``[]`` if it is but holds nothing a voice needs."""
    export_fedvox: Callable[[nn.Module, Path, bool], list[Path]]
    """``export_fedvox(model, folder, half)``: the trained model, LoRA merged, as self-describing
    fedvox safetensors in ``folder`` (any config: each file carries its config; fp16 with
    ``half``, as the shipped base); returns the files."""
    export_gpt_sovits: Callable[[nn.Module, Path, bool], list[Path]]
    """``export_gpt_sovits(model, folder, half)``: the trained model, LoRA merged, in GPT-SoVITS's
    own files in ``folder`` (fp16 with ``half``); returns the files. Raises
    :class:`~fedvox.shared.errors.CheckpointError` for an architecture GPT-SoVITS does not have."""


def recipe(stage: str) -> StageRecipe:
    """The recipe of ``stage``; raises :class:`ConfigError` naming the stages there are."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; use one of {', '.join(STAGES)}")
    return importlib.import_module(f"{__name__}.{stage}").RECIPE


__all__ = ["STAGES", "StageRecipe", "recipe"]
