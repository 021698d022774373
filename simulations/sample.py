"""A synthesised sample from the final global model: WAV plus spectrogram PNG.

Speaking needs both stages (s1 turns text into semantic tokens, s2 turns tokens into a
waveform), and a run trains one. The stage that was not trained comes from the shipped base
when the run fine-tunes it (``pretrained = "fedvox-base"`` names both stages); otherwise it is a
fresh model of the run's config built from the same seed, exactly as every client builds its
frozen base, and the report says so: with a fresh (untrained) partner stage the sample shows
that the pipeline works end to end, not what a trained voice sounds like.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fedvox.client.synthesize import Voice, read_reference, synthesize, write_wave
from fedvox.shared.atomic import atomic_path
from fedvox.shared.audio import SAMPLE_RATE, mel_spectrogram
from fedvox.shared.models.config import SHIPPED_BASE
from fedvox.shared.models.factory import build_model
from fedvox.shared.models.subsets import SubsetSpec, load_trainable_state_dict, merged_state_dict
from fedvox.shared.runconfig import RunConfig
from fedvox.shared.semantic import tokenizer_spec
from fedvox.shared.stages import STAGES, recipe

log = logging.getLogger(__name__)

MAX_SECONDS = 8.0


@dataclass(frozen=True)
class Sample:
    wav: Path
    png: Path
    text: str
    language: str
    reference: Path
    seconds: float
    fresh_stage: str  # the stage that was not trained
    partner: str  # where that stage came from, in words (the shipped base, or a fresh seeded model)


def partner_stage(config: RunConfig) -> str:
    """The stage a run does not train (the shipped base's, or a fresh model of the run's seed)."""
    return next(stage for stage in STAGES if stage != config.stage)


def partner_pretrained(config: RunConfig) -> str | None:
    """Where the partner stage comes from: the shipped base covers both stages; a checkpoint
    file given as ``pretrained`` is the trained stage's only, so the partner is then fresh."""
    return SHIPPED_BASE if config.pretrained == SHIPPED_BASE else None


PLAIN = SubsetSpec(kind="full")
"""The subset voices are built with: none wrapped. A LoRA layer runs three matrix products where a
plain one runs one, and s1 generates token by token, where per-call overhead dominates: the
trained stage speaks with its adapters folded in (``merged_state_dict``), the partner without
adapters (its own are zero)."""


def build_voice(config: RunConfig, state: Mapping[str, torch.Tensor]) -> Voice:
    """Both stages: the run's trained stage with trainable subset ``state``, and its partner.

    The models are built once per process and configuration (the speech-quality scoring speaks
    with many states of one model); each call loads ``state`` into the trained stage, which
    replaces every trainable tensor, and folds it into the plain model that speaks, so a voice
    never keeps an earlier call's state."""
    trained, speaking, voice = _voice_models(config)
    load_trainable_state_dict(trained, state)
    speaking.load_state_dict(merged_state_dict(trained))
    return voice


@functools.lru_cache(maxsize=2)
def _voice_models(config: RunConfig) -> tuple[torch.nn.Module, torch.nn.Module, Voice]:
    """The trained stage's model (as built, with its subset), the plain model of that stage that
    speaks, and the voice speaking with it and its plain partner."""
    trained, speaking = (
        build_model(
            config.stage, config.model_config, subset, seed=config.model_seed, pretrained=config.pretrained or None
        )
        for subset in (config.subset_spec, PLAIN)
    )
    other = partner_stage(config)
    partner = build_model(
        other, config.model_config, PLAIN, seed=config.model_seed, pretrained=partner_pretrained(config)
    )
    models = {config.stage: speaking, other: partner}
    return (
        trained,
        speaking,
        Voice(**{stage: recipe(stage).voice_model(model).eval() for stage, model in models.items()}),
    )


def synthesise_sample(
    config: RunConfig,
    state: dict[str, torch.Tensor],
    reference: Path,
    reference_text: str,
    text: str,
    language: str,
    out: Path,
    seed: int = 0,
) -> Sample:
    """Say ``text`` in ``reference``'s voice with the trained stage ``state`` and a fresh partner stage."""
    voice, other = build_voice(config, state), partner_stage(config)
    wave = synthesize(
        voice,
        text,
        language,
        read_reference(reference),
        tokenizer_spec().build(),
        reference_text=reference_text,
        reference_language=language,
        seed=seed,
        max_seconds=MAX_SECONDS,
    )
    wav, png = out / "sample.wav", out / "sample.png"
    write_wave(wave, wav)
    shipped = partner_pretrained(config) is not None
    plot_spectrogram(
        wave, png, f"{text[:60]} ({language}; trained {config.stage}, {'base' if shipped else 'fresh'} {other})"
    )
    partner = f"the shipped base's {other}" if shipped else f"a fresh, untrained {other} model of the same seed"
    return Sample(wav, png, text, language, reference, wave.numel() / SAMPLE_RATE, other, partner)


def plot_spectrogram(wave: torch.Tensor, path: Path, title: str) -> None:
    """Log-mel spectrogram of ``wave`` as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mel = mel_spectrogram(wave.float()).numpy()
    fig, ax = plt.subplots(figsize=(8, 3))
    image = ax.imshow(
        mel,
        origin="lower",
        aspect="auto",
        interpolation="nearest",
        extent=(0, wave.numel() / SAMPLE_RATE, 0, mel.shape[0]),
    )
    ax.set(xlabel="seconds", ylabel="mel bin", title=title)
    fig.colorbar(image, ax=ax, label="log mel")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


__all__ = [
    "MAX_SECONDS",
    "Sample",
    "build_voice",
    "partner_pretrained",
    "partner_stage",
    "plot_spectrogram",
    "synthesise_sample",
]
