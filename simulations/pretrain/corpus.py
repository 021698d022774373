"""The public synthetic corpus the shipped base is pretrained on.

Every voice is one that espeak-ng or flite ships: espeak-ng's stock voice variants (the files of
its ``voices/!v`` folder) read with several English accents and with Mandarin pinyin, and flite's
CMU voices. The simulated private speakers of :mod:`simulations.speakers` are *never* among them
by construction: each of those is a voice-variant file drawn at random for that speaker, not a
stock one. Text comes from the same HSK sentence set, but only from the sentences a simulation
(with its default seed) trains on: the simulation's held-out sentences stay unseen by the base.
A further share of the corpus sentences is kept for the base's own validation.

Layout of ``out``::

    manifest.json         voices, counts, seconds, engines' versions, text source (written last)
    train.list, valid.list  path|speaker|language|text, paths relative to ``out``
    <voice>/<voice>_<n>.wav  32 kHz 16-bit mono, peak 0.9

Re-running completes an interrupted corpus: finished WAVs (written atomically) are kept.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from fedvox.shared.atomic import atomic_path, atomic_write_text
from fedvox.shared.cli import progress
from fedvox.shared.errors import ConfigError, DataError
from fedvox.simulations.pseudo_speech import SAMPLE_RATE
from fedvox.simulations.speakers import (
    ENGLISH_ACCENTS,
    MANDARIN_VOICE,
    TEXT_SOURCE,
    pinyin_for_espeak,
    sentence_pools,
    sentence_stream,
    utterance_text,
)

log = logging.getLogger(__name__)

GENERATOR = "fedvox-sim pretrain corpus"
MANIFEST = "manifest.json"
ESPEAK_VARIANTS = (
    "m1",
    "m2",
    "m3",
    "m4",
    "m5",
    "m6",
    "m7",
    "m8",
    "f1",
    "f2",
    "f3",
    "f4",
    "f5",
    "adam",
    "Alicia",
    "Andy",
    "benjamin",
    "caleb",
    "david",
    "edward",
    "linda",
    "max",
    "Michael",
    "paul",
    "robert",
    "steph",
    "travis",
    "victor",
)
"""Stock espeak-ng variants that sound like a human talker (robots, whisper and effects left out)."""
FLITE_VOICES = ("awb", "rms", "slt", "kal16")
SIMULATION_SEED = 0
"""The simulations' default seed: its held-out sentences are left out of the corpus."""
VALID_TEXT_SHARE = 0.05


@dataclass(frozen=True)
class CorpusVoice:
    """One public voice: the engine, its voice argument, a language and a speaking rate."""

    name: str  # file-system safe, unique
    engine: str  # espeak-ng | flite
    voice: str  # espeak-ng ``-v`` argument or flite ``-voice`` name
    language: str  # en | zh
    speed_wpm: int


@dataclass(frozen=True)
class CorpusConfig:
    """What to generate; ``utterances`` per voice (``valid`` of them held out for validation)."""

    utterances: int = 60
    valid: int = 2
    seed: int = 0
    languages: tuple[str, ...] = ("en", "zh")
    workers: int = 2

    def validate(self) -> None:
        if not 1 <= self.valid < self.utterances <= 5000:
            raise ConfigError(f"--utterances must exceed --valid-utterances >= 1 (got {self.utterances}, {self.valid})")
        if not set(self.languages) <= {"en", "zh"} or not self.languages:
            raise ConfigError(f"--corpus-lang must be en, zh or both, got {','.join(self.languages)}")


def corpus_voices(config: CorpusConfig) -> list[CorpusVoice]:
    """The corpus's voices: stock espeak-ng variants per language, then flite's voices (English)."""
    rng = np.random.default_rng([config.seed, 11])
    voices: list[CorpusVoice] = []
    for language in config.languages:
        for k, variant in enumerate(ESPEAK_VARIANTS):
            accent = ENGLISH_ACCENTS[k % len(ENGLISH_ACCENTS)] if language == "en" else MANDARIN_VOICE
            voices.append(
                CorpusVoice(
                    f"espeak-{accent}-{variant}".lower(),
                    "espeak-ng",
                    f"{accent}+{variant}",
                    language,
                    int(rng.integers(150, 191)),
                )
            )
    if "en" in config.languages:
        voices += [CorpusVoice(f"flite-{v}", "flite", v, "en", int(rng.integers(150, 191))) for v in FLITE_VOICES]
    return voices


def corpus_sentences(language: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Training and validation sentences: the simulation's training pool, split 95/5 (seeded)."""
    pool = sentence_pools(language, SIMULATION_SEED)[0]
    order = np.random.default_rng([SIMULATION_SEED, 12, ("en", "zh").index(language)]).permutation(len(pool))
    cut = max(1, int(len(pool) * VALID_TEXT_SHARE))
    return tuple(pool[i] for i in order[cut:]), tuple(pool[i] for i in order[:cut])


@dataclass(frozen=True)
class _Line:
    voice: CorpusVoice
    split: str
    wav: str  # relative to the corpus folder
    text: str


def plan_corpus(config: CorpusConfig) -> list[_Line]:
    """Every utterance's voice, split, path and text, in a fixed order (no audio made)."""
    lines: list[_Line] = []
    for v, voice in enumerate(corpus_voices(config)):
        rng = np.random.default_rng([config.seed, 13, v])
        train, valid = corpus_sentences(voice.language)
        for split, count, pool in (("train", config.utterances - config.valid, train), ("valid", config.valid, valid)):
            sentences = sentence_stream(pool, rng)
            for n in range(count):
                text = utterance_text(sentences, voice.language, voice.speed_wpm, rng)
                lines.append(_Line(voice, split, f"{voice.name}/{voice.name}_{split}_{n:04d}.wav", text))
    return lines


def generate_corpus(out: str | Path, config: CorpusConfig) -> dict:
    """Synthesise (or complete) the corpus under ``out``; returns its manifest."""
    config.validate()
    for tool in ("espeak-ng", "flite") if "en" in config.languages else ("espeak-ng",):
        if shutil.which(tool) is None:
            raise ConfigError(f"{tool} is not on PATH; the pretraining corpus needs it (apt-get install {tool})")
    out = Path(out).absolute()
    previous = _read_manifest(out)
    if previous is not None and previous.get("config") == _config_entry(config) and previous.get("complete"):
        log.info("corpus in %s is complete; reusing it", out)
        return previous
    lines = plan_corpus(config)
    todo = [line for line in lines if not (out / line.wav).is_file()]
    log.info(
        "corpus: %d utterances of %d voices, %d to synthesise",
        len(lines),
        len({line.voice.name for line in lines}),
        len(todo),
    )
    with ThreadPoolExecutor(config.workers) as pool, progress() as bar:
        task = bar.add_task("synthesising corpus", total=len(todo))
        for _ in pool.map(lambda line: _render(line, out), todo):
            bar.advance(task)
    seconds = {line.wav: sf.info(str(out / line.wav)).duration for line in lines}
    for split in ("train", "valid"):
        rows = [
            f"{line.wav}|{line.voice.name}|{line.voice.language}|{line.text}\n" for line in lines if line.split == split
        ]
        atomic_write_text(out / f"{split}.list", "".join(rows))
    manifest = {
        "generator": GENERATOR,
        "complete": True,
        "config": _config_entry(config),
        "engines": {"espeak-ng": _version(["espeak-ng", "--version"]), "flite": _version(["flite", "--version"])},
        "sample_rate": SAMPLE_RATE,
        "text_source": TEXT_SOURCE,
        "held_out": "no simulated speaker's voice (each is a random voice-variant file, none stock); "
        f"none of the simulation's held-out sentences (seed {SIMULATION_SEED})",
        "voices": [asdict(v) for v in corpus_voices(config)],
        "totals": {
            split: {
                "utterances": sum(1 for line in lines if line.split == split),
                "seconds": round(sum(seconds[line.wav] for line in lines if line.split == split), 1),
            }
            for split in ("train", "valid")
        },
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def _config_entry(config: CorpusConfig) -> dict:
    entry = asdict(config)
    entry.pop("workers")  # changes nothing in the output
    entry["languages"] = list(config.languages)
    return entry


def _read_manifest(out: Path) -> dict | None:
    if not out.exists():
        return None
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if manifest is None and any(p for p in out.iterdir() if p.suffix != ".list" and not (p / "").is_dir()):
        raise ConfigError(f"{out} holds files but no corpus manifest of ours; choose a new or empty folder")
    if manifest is not None and manifest.get("generator") != GENERATOR:
        raise ConfigError(f"{out} holds another tool's output; choose a new or empty folder")
    return manifest


def _version(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr).strip() else "unknown"


def _render(line: _Line, out: Path) -> None:
    """Synthesise one utterance, resample it to 32 kHz and write it atomically."""
    voice = line.voice
    if voice.engine == "espeak-ng":
        spoken = pinyin_for_espeak(line.text) if voice.language == "zh" else line.text
        done = subprocess.run(
            ["espeak-ng", "--stdout", "--stdin", "-v", voice.voice, "-s", str(voice.speed_wpm)],
            input=spoken.encode("utf-8"),
            capture_output=True,
            check=False,
        )
        data = done.stdout
    else:
        with tempfile.TemporaryDirectory() as tmp:
            wav = Path(tmp) / "out.wav"
            stretch = f"{175.0 / voice.speed_wpm:.3f}"
            done = subprocess.run(
                [
                    "flite",
                    "-voice",
                    voice.voice,
                    "--setf",
                    f"duration_stretch={stretch}",
                    "-t",
                    line.text,
                    "-o",
                    str(wav),
                ],
                capture_output=True,
                check=False,
            )
            data = wav.read_bytes() if wav.is_file() else b""
    try:
        wave, rate = sf.read(BytesIO(data), dtype="float64")
    except (sf.LibsndfileError, RuntimeError):
        wave, rate = np.zeros(0), 0
    if done.returncode != 0 or len(wave) == 0:
        problem = (done.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise DataError(f"{voice.engine} made no audio for voice {voice.voice} (exit {done.returncode}): {problem}")
    g = np.gcd(SAMPLE_RATE, rate)
    wave = resample_poly(wave, SAMPLE_RATE // g, rate // g)
    wave = (0.9 * wave / max(float(np.abs(wave).max()), 1e-6)).astype(np.float32)
    path = out / line.wav
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        sf.write(tmp, wave, SAMPLE_RATE, subtype="PCM_16", format="WAV")
