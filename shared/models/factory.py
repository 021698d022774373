"""Build the model a stage trains, identically on every machine.

Only the trainable subset ever travels; the frozen base is rebuilt from (stage, model config,
subset, LoRA shape, seed) — or loaded from a released GPT-SoVITS checkpoint — so a server and
its clients agree on it without shipping it. s2 trains the SoVITS generator (with the chosen
subset) together with its multi-period discriminator (in full: it has no LoRA targets), because
both read private audio.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from shared.errors import ConfigError
from shared.models.config import s1_config, s2_config
from shared.models.s1 import Text2SemanticDecoder
from shared.models.s1_checkpoint import load_official_s1
from shared.models.s2 import MultiPeriodDiscriminator, SynthesizerTrn
from shared.models.s2.checkpoint import load_discriminator, load_generator
from shared.models.subsets import SubsetSpec, apply_subset

STAGES = ("s1", "s2")


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
    with ``pretrained``, loaded from a GPT-SoVITS checkpoint (s1 ``.ckpt``; s2 generator ``.pth``,
    whose ``s2D`` sibling is loaded too when it exists, as GPT-SoVITS names them).
    """
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; use s1 or s2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if stage == "s1":
            config = s1_config(model_config)
            model = load_official_s1(pretrained, config) if pretrained else Text2SemanticDecoder(config)
            return apply_subset(model, subset)
        config = s2_config(model_config)
        if pretrained:
            generator = load_generator(pretrained, config)
            sibling = Path(pretrained).with_name(Path(pretrained).name.replace("s2G", "s2D"))
            has_sibling = sibling != Path(pretrained) and sibling.is_file()
            discriminator = load_discriminator(sibling, config) if has_sibling else MultiPeriodDiscriminator(config)
        else:
            generator, discriminator = SynthesizerTrn(config), MultiPeriodDiscriminator(config)
        return SoVITSPair(apply_subset(generator, subset), apply_subset(discriminator, SubsetSpec(kind="full")))
