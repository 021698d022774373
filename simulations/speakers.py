"""Synthetic speakers for a federated simulation (``fedvox-sim speakers``).

No package ships multi-speaker human speech with transcripts, so every simulated client gets a
procedurally generated voice. With espeak-ng each speaker is a private voice-variant file
(pitch, formant scaling = vocal-tract length, roughness, breath, flutter, spectral tone) in a
private, pruned copy of espeak-ng's data, plus an accent and a speaking rate; Mandarin is read
from pypinyin syllables through ``cmn-latn-pinyin`` (espeak-ng 1.51 misreads Chinese characters).
Without espeak-ng the seeded formant synthesiser of :mod:`simulations.pseudo_speech` stands in,
loudly. Sentences come from the ``hsk-sentences-audio`` dataset (Mandarin sentences and their
English translations, CC-BY-SA-4.0), joined two or three at a time where needed so that most
utterances last 2-8 s.

Layout of ``out`` (GPT-SoVITS lists ``path|speaker|language|text``, each path relative to the
folder of its list file)::

    manifest.json                  speakers, voices, counts, durations, seed, engine, check
    train.list                     every client's training utterances (centralised baseline)
    heldout_seen.list              the clients' held-out utterances (seen-speaker validation)
    heldout_unseen.list            the unseen speakers' utterances (unseen-speaker validation)
    clients/spk000/train.list      one federated client's private training data ...
    clients/spk000/heldout.list    ... and its own held-out utterances
    clients/spk000/spk000_train_0000.wav ...
    unseen/unseen000/heldout.list  a speaker no client has (held-out utterances only)

Every random value comes from a generator keyed by (seed, role, speaker index, purpose), so a
speaker's voice and sentences do not depend on how many speakers are generated, and one seed
gives byte-identical files on one espeak-ng version whatever the number of worker processes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import lru_cache
from io import BytesIO
from pathlib import Path
from typing import Annotated, Self

import numpy as np
import soundfile as sf
from pydantic import Field, StrictFloat, StrictInt, model_validator
from scipy.signal import resample_poly

from fedvox.shared.atomic import atomic_path, atomic_write_text
from fedvox.shared.cli import progress
from fedvox.shared.errors import ConfigError, DataError
from fedvox.shared.settings import choice, settings
from fedvox.simulations.pseudo_speech import SAMPLE_RATE, PseudoVoice, synthesize
from fedvox.simulations.speaker_id import FEATURE_SIZE, mfcc_statistics, similar_speaker_pairs, speaker_id_accuracy

log = logging.getLogger(__name__)

GENERATOR = "fedvox-sim speakers"
LAYOUT_VERSION = 1
MANIFEST = "manifest.json"
LANGUAGES = ("en", "zh", "mix")
ENGINES = ("auto", "espeak-ng", "pseudo-speech")
MIN_UTTERANCES = 3  # a Zipf draw never leaves a client with fewer training utterances
MAX_SPEAKERS = 1000
MAX_UTTERANCES = 2000
MAX_SENTENCES = 3  # sentences joined into one utterance
TARGET_SECONDS = (2.5, 7.0)  # each utterance aims at a reading time drawn from this range
HELDOUT_TEXT_SHARE = 0.1  # sentences reserved for held-out utterances, never trained on
# English accents that honour voice variants (plain "en-gb" silently ignores them).
ENGLISH_ACCENTS = (
    "en-us",
    "en",
    "en-gb-scotland",
    "en-029",
    "en-us-nyc",
    "en-gb-x-rp",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
)
MANDARIN_VOICE = "cmn-latn-pinyin"
TEXT_SOURCE = {
    "name": "hsk-sentences-audio",
    "version": "1.0.0",
    "licence": "CC-BY-SA-4.0",
    "url": "https://github.com/no7z/hsk-sentences-audio",
    "fields": "chinese (zh), translation.en (en)",
}

# What the accents above need of espeak-ng's data (2.5 of 13 MB).
_ESPEAK_FILES = ("phontab", "phonindex", "phondata", "intonations", "en_dict", "cmn_dict")
_ESPEAK_LANGUAGE_FILES = ("lang/gmw/en*", "lang/sit/cmn*")
_SECONDS_PER_UNIT = {"en": 0.36, "zh": 0.30}  # espeak-ng at 175 wpm, per word / per character
_ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_TOP_LISTS = ("train.list", "heldout_seen.list", "heldout_unseen.list")
_OUTPUTS = (MANIFEST, *_TOP_LISTS, "clients", "unseen", ".espeak")  # what a re-run replaces


@settings("speakers")
class SpeakersConfig:
    """What to generate; each field is the command-line option (and scenario key) of the same
    name, ``n`` and ``lang`` for ``n_speakers`` and ``language``."""

    n_speakers: Annotated[
        StrictInt, Field(ge=1, le=MAX_SPEAKERS, alias="n", description="the clients; --speakers of fedvox-sim run")
    ] = 8
    utterances: Annotated[StrictInt, Field(ge=1, le=MAX_UTTERANCES)] = 20  # per client (the mean when zipf > 0)
    language: Annotated[str, choice(LANGUAGES), Field(alias="lang")] = "mix"  # mix: half the speakers each
    seed: Annotated[StrictInt, Field(ge=0)] = 0
    zipf: Annotated[
        StrictFloat, Field(ge=0, le=5, description="0: equal counts; > 0: the client of rank r gets ~ r**-zipf")
    ] = 0.0
    heldout_utterances: Annotated[StrictInt, Field(ge=0, le=100)] = 2  # per client and per unseen speaker
    unseen_speakers: Annotated[StrictInt, Field(ge=0, le=MAX_SPEAKERS)] = 2
    engine: Annotated[str, choice(ENGINES)] = "auto"  # auto: espeak-ng, else pseudo-speech
    workers: Annotated[StrictInt, Field(ge=1)] | None = None  # processes; default: the CPUs this process may use

    @model_validator(mode="after")
    def _across_keys(self) -> Self:
        if self.zipf and self.utterances < MIN_UTTERANCES:
            raise ValueError(
                f"utterances must be >= {MIN_UTTERANCES} with zipf (every client keeps at least "
                f"{MIN_UTTERANCES}), got {self.utterances}"
            )
        if self.unseen_speakers and not self.heldout_utterances:
            raise ValueError("unseen-speakers needs heldout-utterances >= 1 (unseen speakers have held-out data only)")
        return self


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker, as each engine renders it."""

    name: str  # spk000 (a client) or unseen000
    role: str  # client | unseen
    index: int  # within its role
    sex: str
    language: str  # en | zh
    accent: str  # espeak-ng language voice
    speed_wpm: int
    variant: str  # espeak-ng voice-variant file
    pseudo_voice: PseudoVoice

    @property
    def folder(self) -> str:
        return f"{'clients' if self.role == 'client' else 'unseen'}/{self.name}"


@dataclass(frozen=True)
class _Utterance:
    """One utterance to synthesise (picklable: it crosses into the worker processes)."""

    speaker: Speaker
    split: str  # train | heldout
    wav: str  # file name in the speaker's folder
    text: str  # as written in the list file
    seed: tuple[int, ...]


def generate_speakers(out: str | os.PathLike[str], config: SpeakersConfig) -> dict:
    """Write the speakers' WAVs, list files and manifest under ``out``; return the manifest.

    Refuses a non-empty ``out`` that is not an earlier output of this command; an earlier
    output is replaced (only the entries this command writes are removed).
    """
    engine = _choose_engine(config.engine)
    out = Path(out).absolute()
    _claim_output_folder(out)
    speakers = [_make_speaker(config, "client", i) for i in range(config.n_speakers)]
    speakers += [_make_speaker(config, "unseen", j) for j in range(config.unseen_speakers)]
    counts = utterance_counts(
        config.n_speakers, config.utterances, config.zipf, np.random.default_rng([config.seed, 2])
    )
    utterances = _plan(config, speakers, counts)
    # Marks the folder as ours at once, so an interrupted run can simply be re-run.
    atomic_write_text(out / MANIFEST, _dump({"generator": GENERATOR, "complete": False}))

    espeak_root = out / ".espeak"
    workers = min(config.workers or _available_cpus(), len(utterances))
    log.info(
        "synthesising %d utterances of %d speakers with %s on %d process(es)",
        len(utterances),
        len(speakers),
        engine["name"],
        workers,
    )
    seconds = np.zeros(len(utterances))
    features = np.zeros((len(utterances), FEATURE_SIZE))
    tasks = [
        (k, u, str(out / u.speaker.folder / u.wav), engine["name"], str(espeak_root)) for k, u in enumerate(utterances)
    ]
    try:
        if engine["name"] == "espeak-ng":
            _prepare_espeak_data(espeak_root, speakers)
        with progress() as bar:
            task = bar.add_task("speakers", total=len(tasks))
            for k, duration, stats in _run(tasks, workers):
                seconds[k], features[k] = duration, stats
                bar.advance(task)
    finally:
        shutil.rmtree(espeak_root, ignore_errors=True)  # the variant files are kept in the manifest

    manifest = _write_outputs(out, config, engine, speakers, utterances, seconds, features)
    log.info(
        "wrote %d speakers, %.1f min of audio (%.1f MB) to %s",
        len(speakers),
        manifest["totals"]["seconds"] / 60,
        manifest["totals"]["bytes"] / 1e6,
        out,
    )
    return manifest


def utterance_counts(n: int, mean: int, zipf: float, rng: np.random.Generator) -> list[int]:
    """Training utterances per client: ``mean`` each, or a Zipf split of ``n * mean`` in all.

    With ``zipf > 0`` the client at (random) rank r gets a share proportional to r**-zipf of
    what is left once every client has :data:`MIN_UTTERANCES`, apportioned by largest
    remainders: the total stays ``n * mean`` and no client falls below the minimum.
    """
    if zipf == 0.0:
        return [mean] * n
    weights = np.arange(1, n + 1, dtype=np.float64) ** -zipf
    weights = weights[rng.permutation(n)] / weights.sum()
    spare = n * (mean - MIN_UTTERANCES)
    exact = weights * spare
    counts = np.floor(exact).astype(int)
    counts[np.argsort(counts - exact, kind="stable")[: spare - counts.sum()]] += 1
    return [int(c) + MIN_UTTERANCES for c in counts]


# ------------------------------------------------------------------ speakers and texts


def _make_speaker(config: SpeakersConfig, role: str, index: int) -> Speaker:
    """Draw speaker ``index`` of ``role`` from its own generator (independent of the others).

    Sex alternates (male, female, ...) and, for ``mix``, language runs en, zh, zh, en, ...:
    every four speakers cover both sexes in both languages, and any two cover both languages.
    Voice ranges are adult male / female vocal-tract scales and F0 (speech-data reference,
    recipe A1).
    """
    role_code = 0 if role == "client" else 1
    rng = np.random.default_rng([config.seed, role_code, index, 0])
    name = f"spk{index:03d}" if role == "client" else f"unseen{index:03d}"
    sex = "female" if index % 2 else "male"
    language = config.language if config.language != "mix" else ("zh" if index % 4 in (1, 2) else "en")
    female = sex == "female"
    tract = rng.uniform(1.08, 1.24) if female else rng.uniform(0.86, 1.02)
    f0 = rng.uniform(165, 235) if female else rng.uniform(78, 135)
    # No "language variant" line: espeak-ng then leaves the file out of its voice list (capped
    # at 349 entries, which is how ~100 speakers broke it) but still loads it as "<accent>+<name>".
    lines = [f"name {name}", f"pitch {int(f0)} {int(f0 * rng.uniform(1.3, 1.9))}", "formant 0 100 100 100"]
    for k in range(1, 6):
        lines.append(
            f"formant {k} {int(100 * tract * rng.uniform(0.97, 1.03))} "
            f"{int(rng.uniform(85, 115))} {int(rng.uniform(85, 120))}"
        )
    lines += [
        f"flutter {rng.integers(0, 26)}",
        f"roughness {rng.integers(0, 4)}",
        f"tone 600 {rng.integers(140, 201)} 1200 {rng.integers(110, 161)} 2000 {rng.integers(80, 131)}",
    ]
    breath = int(rng.choice([0, 0, 0, 1, 2, 4]))
    if breath:
        lines.append("breath " + " ".join([str(breath)] * 6))
    accent = str(rng.choice(ENGLISH_ACCENTS)) if language == "en" else MANDARIN_VOICE
    speed = int(rng.integers(140, 196))
    pseudo = PseudoVoice.from_seed([config.seed, role_code, index, 3], sex=sex)
    return Speaker(name, role, index, sex, language, accent, speed, "\n".join(lines) + "\n", pseudo)


def _plan(config: SpeakersConfig, speakers: list[Speaker], counts: list[int]) -> list[_Utterance]:
    """Every utterance's text, file name and seed, in a fixed order."""
    utterances: list[_Utterance] = []
    for speaker in speakers:
        role_code = 0 if speaker.role == "client" else 1
        rng = np.random.default_rng([config.seed, role_code, speaker.index, 1])
        train_pool, heldout_pool = sentence_pools(speaker.language, config.seed)
        splits = [("heldout", config.heldout_utterances, heldout_pool)]
        if speaker.role == "client":
            splits.insert(0, ("train", counts[speaker.index], train_pool))
        for split, count, pool in splits:
            sentences = sentence_stream(pool, rng)
            for number in range(count):
                text = utterance_text(sentences, speaker.language, speaker.speed_wpm, rng)
                seed = (config.seed, role_code, speaker.index, 2, int(split == "heldout"), number)
                wav = f"{speaker.name}_{split}_{number:04d}.wav"
                utterances.append(_Utterance(speaker, split, wav, text, seed))
    return utterances


def sentence_stream(pool: tuple[str, ...], rng: np.random.Generator) -> Iterator[str]:
    """Sentences in a fresh random order, pass after pass (no repeat within a pass)."""
    while True:
        for i in rng.permutation(len(pool)):
            yield pool[i]


def utterance_text(sentences: Iterator[str], language: str, speed_wpm: int, rng: np.random.Generator) -> str:
    """Join 1-3 sentences until the estimated reading time at ``speed_wpm`` reaches a drawn target."""
    target = rng.uniform(*TARGET_SECONDS)
    per_unit = _SECONDS_PER_UNIT[language] * 175.0 / speed_wpm
    chosen: list[str] = []
    while len(chosen) < MAX_SENTENCES:
        chosen.append(next(sentences))
        units = sum(len(re.findall(r"[\u4e00-\u9fff]", s)) if language == "zh" else len(s.split()) for s in chosen)
        if units * per_unit >= target:
            break
    return ("" if language == "zh" else " ").join(chosen)


@lru_cache(maxsize=4)
def _sentences(language: str) -> tuple[str, ...]:
    """Clean, distinct sentences of one language from the HSK dataset, in dataset order.

    English keeps plain ASCII sentences without digits (a dash becomes a comma) so the audio
    says exactly what the transcript says; Mandarin keeps Han characters and 。，？！、 only.
    """
    from hsk_sentences_audio import load_sentences

    keep: dict[str, None] = {}
    for row in load_sentences():
        if language == "zh":
            text = row["chinese"].strip()
            ok = re.fullmatch(r"[\u4e00-\u9fff][\u4e00-\u9fff，、]*[。？！]", text) is not None
        else:
            text = re.sub(r"\s*—\s*", ", ", row["translation"]["en"].strip())
            ok = re.fullmatch(r"[A-Za-z][A-Za-z ,;'\-]*[.?!]", text) is not None
        if ok:
            keep.setdefault(text)
    return tuple(keep)


@lru_cache(maxsize=8)
def sentence_pools(language: str, seed: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Training and held-out sentence pools (seeded; the same split for every speaker)."""
    sentences = _sentences(language)
    order = np.random.default_rng([seed, 3, LANGUAGES.index(language)]).permutation(len(sentences))
    cut = int(len(sentences) * HELDOUT_TEXT_SHARE)
    return tuple(sentences[i] for i in order[cut:]), tuple(sentences[i] for i in order[:cut])


# ----------------------------------------------------------------------------- engines


def _choose_engine(requested: str) -> dict:
    """The engine's manifest entry; without espeak-ng, ``auto`` falls back (and says so, loudly)."""
    if requested == "pseudo-speech":
        return {"name": "pseudo-speech", "fallback": False}
    if shutil.which("espeak-ng") is not None:
        return {"name": "espeak-ng", "version": _espeak_version()[0], "fallback": False}
    if requested == "espeak-ng":
        raise ConfigError(
            "--engine espeak-ng: espeak-ng is not on PATH; install it (apt-get install "
            "espeak-ng) or use --engine auto to fall back to pseudo-speech"
        )
    reason = "espeak-ng not found on PATH"
    log.warning(
        "%s: FALLING BACK TO PSEUDO-SPEECH (a formant caricature that follows the text, not "
        "intelligible speech). Install espeak-ng (apt-get install espeak-ng) for synthetic speech.",
        reason,
    )
    return {"name": "pseudo-speech", "fallback": True, "reason": reason}


def _espeak_version() -> tuple[str, Path]:
    """espeak-ng's version and data folder, from ``espeak-ng --version``."""
    done = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=False)
    match = re.search(r"text-to-speech:\s*(\S+)\s+Data at:\s*(.+)", done.stdout)
    if done.returncode != 0 or match is None:
        raise DataError(
            f"cannot read espeak-ng's version and data folder from `espeak-ng --version` "
            f"(exit {done.returncode}): {done.stdout.strip() or done.stderr.strip()}"
        )
    return match.group(1), Path(match.group(2).strip())


def _prepare_espeak_data(root: Path, speakers: list[Speaker]) -> None:
    """A private, pruned copy of espeak-ng's data holding one voice-variant file per speaker."""
    source = _espeak_version()[1]
    target = root / "espeak-ng-data"
    shutil.rmtree(root, ignore_errors=True)
    try:
        target.mkdir(parents=True)
        for name in _ESPEAK_FILES:
            shutil.copyfile(source / name, target / name)
        for pattern in _ESPEAK_LANGUAGE_FILES:
            for path in sorted(source.glob(pattern)):
                (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target / path.relative_to(source))
    except OSError as exc:
        raise DataError(f"cannot copy espeak-ng's data from {source}: {exc}; reinstall espeak-ng-data") from exc
    variants = target / "voices" / "!v"
    variants.mkdir(parents=True)
    for speaker in speakers:
        (variants / speaker.name).write_text(speaker.variant, encoding="utf-8")


def _espeak(utterance: _Utterance, espeak_root: str) -> np.ndarray:
    """espeak-ng's 22,050 Hz output for one utterance, resampled to 32 kHz."""
    speaker = utterance.speaker
    spoken = pinyin_for_espeak(utterance.text) if speaker.language == "zh" else utterance.text
    voice = f"{speaker.accent}+{speaker.name}"
    command = ["espeak-ng", f"--path={espeak_root}", "--stdout", "--stdin", "-v", voice, "-s", str(speaker.speed_wpm)]
    done = subprocess.run(command, input=spoken.encode("utf-8"), capture_output=True, check=False)
    problem = (done.stderr.decode(errors="replace").strip().splitlines() or [""])[-1]  # not the warnings
    try:
        wave, rate = sf.read(BytesIO(done.stdout), dtype="float64")
    except (sf.LibsndfileError, RuntimeError) as exc:
        wave, rate, problem = np.zeros(0), 0, problem or str(exc)
    if done.returncode != 0 or len(wave) == 0:
        raise DataError(
            f"espeak-ng made no audio for {speaker.name} (voice {voice}, exit "
            f"{done.returncode}): {problem or 'no output'}; check that "
            f"`espeak-ng -v {speaker.accent} hello` works"
        )
    g = np.gcd(SAMPLE_RATE, rate)
    return resample_poly(wave, SAMPLE_RATE // g, rate // g)


def pinyin_for_espeak(text: str) -> str:
    """Numbered pinyin with ASCII punctuation (espeak-ng 1.51 misreads Chinese characters)."""
    from pypinyin import Style, lazy_pinyin

    punctuation = {"，": ",", "、": ",", "。": ".", "？": "?", "！": "!"}
    spoken = ""
    for token in lazy_pinyin(text, style=Style.TONE3, neutral_tone_with_five=True):
        marks = "".join(punctuation.get(ch, "") for ch in token)
        spoken += marks if marks or not token.strip() else f" {token}"
    return spoken.strip()


# --------------------------------------------------------------------------- processes


def _synthesise(task: tuple[int, _Utterance, str, str, str]) -> tuple[int, float, np.ndarray]:
    """Worker: render one utterance, write it atomically (32 kHz 16-bit WAV), measure it."""
    k, utterance, path, engine, espeak_root = task
    if engine == "espeak-ng":
        wave = _espeak(utterance, espeak_root)
    else:
        speaker = utterance.speaker
        wave = synthesize(utterance.text, speaker.language, speaker.pseudo_voice, utterance.seed)
    wave = (0.9 * wave / max(float(np.abs(wave).max()), 1e-6)).astype(np.float32)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        sf.write(tmp, wave, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return k, len(wave) / SAMPLE_RATE, mfcc_statistics(wave, SAMPLE_RATE)


def _run(tasks: list, workers: int) -> Iterator[tuple[int, float, np.ndarray]]:
    """Results as they finish: in this process for one worker, else in spawned processes."""
    if workers == 1:
        yield from map(_synthesise, tasks)
        return
    # spawn: a fresh interpreter per worker, safe whatever threads the parent runs (torch, Ray);
    # workers import only numpy/scipy/soundfile. One BLAS/OpenMP thread each: the workers and
    # their espeak-ng children already fill the cores (threads would only contend).
    with _environment(_ONE_THREAD):
        pool = multiprocessing.get_context("spawn").Pool(workers)
    with pool:
        yield from pool.imap_unordered(_synthesise, tasks, chunksize=2)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables while worker processes start (they copy it), then restore."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ------------------------------------------------------------------------------ output


def _claim_output_folder(out: Path) -> None:
    """Make ``out`` ours: new, empty, or an earlier speakers output (whose entries are removed)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder (new or empty)")
    if not out.exists() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        return
    try:
        previous = json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("generator")
    except (OSError, ValueError, AttributeError):
        previous = None
    if previous != GENERATOR:
        raise ConfigError(
            f"--out {out} is not empty and holds no earlier `{GENERATOR}` output "
            f"(no {MANIFEST} of ours); choose a new or empty folder"
        )
    log.info("replacing the earlier speakers output in %s", out)
    for name in _OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _write_outputs(
    out: Path,
    config: SpeakersConfig,
    engine: dict,
    speakers: list[Speaker],
    utterances: list[_Utterance],
    seconds: np.ndarray,
    features: np.ndarray,
) -> dict:
    """Per-speaker lists, the three top-level lists and the manifest (written last)."""
    top: dict[str, list[str]] = {name: [] for name in _TOP_LISTS}
    entries = []
    for speaker in speakers:
        entry = {
            "name": speaker.name,
            "role": speaker.role,
            "sex": speaker.sex,
            "language": speaker.language,
            "folder": speaker.folder,
            "voice": _voice_entry(speaker, engine),
        }
        for split in ("train", "heldout") if speaker.role == "client" else ("heldout",):
            mine = [k for k, u in enumerate(utterances) if u.speaker is speaker and u.split == split]
            lines = [f"{utterances[k].wav}|{speaker.name}|{speaker.language}|{utterances[k].text}\n" for k in mine]
            atomic_write_text(out / speaker.folder / f"{split}.list", "".join(lines))
            top_list = (
                "train.list"
                if split == "train"
                else ("heldout_seen.list" if speaker.role == "client" else "heldout_unseen.list")
            )
            top[top_list] += [f"{speaker.folder}/{line}" for line in lines]
            entry[split] = {
                "list": f"{speaker.folder}/{split}.list",
                "utterances": len(mine),
                "seconds": round(float(seconds[mine].sum()), 3),
            }
        entries.append(entry)
    for name, lines in top.items():
        atomic_write_text(out / name, "".join(lines))

    short = int((seconds < 0.6).sum())
    if short:
        log.warning("%d utterances are shorter than 0.6 s, which the data pipeline rejects", short)
    manifest = {
        "generator": GENERATOR,
        "layout_version": LAYOUT_VERSION,
        "complete": True,
        "config": {k: v for k, v in asdict(config).items() if k != "workers"},  # workers change nothing
        "engine": engine,
        "sample_rate": SAMPLE_RATE,
        "audio_format": "WAV, PCM 16-bit, mono, peak 0.9",
        "list_format": "path|speaker|language|text; path relative to the list file's folder",
        "lists": {"train": "train.list", "heldout_seen": "heldout_seen.list", "heldout_unseen": "heldout_unseen.list"},
        "text_source": TEXT_SOURCE,
        "totals": {
            "clients": config.n_speakers,
            "unseen_speakers": config.unseen_speakers,
            "utterances": len(utterances),
            "seconds": round(float(seconds.sum()), 3),
            "utterance_seconds": {
                q: round(float(f(seconds)), 3) for q, f in (("min", np.min), ("median", np.median), ("max", np.max))
            },
            "under_0.6_s": short,
            "bytes": sum((out / u.speaker.folder / u.wav).stat().st_size for u in utterances),
        },
        "speaker_check": _speaker_check(features, [u.speaker.name for u in utterances], len(speakers)),
        "speakers": entries,
    }
    atomic_write_text(out / MANIFEST, _dump(manifest))
    return manifest


def _voice_entry(speaker: Speaker, engine: dict) -> dict:
    if engine["name"] == "espeak-ng":
        return {
            "espeak_voice": f"{speaker.accent}+{speaker.name}",
            "speed_wpm": speaker.speed_wpm,
            "variant_file": speaker.variant,
        }
    return {"pseudo_speech": asdict(speaker.pseudo_voice)}


def _speaker_check(features: np.ndarray, labels: list[str], n_speakers: int) -> dict:
    """Speaker-ID accuracy against chance, and near-duplicate voices (logged as warnings)."""
    check: dict = {
        "method": "leave-one-out nearest speaker centroid, cosine on z-scored mean and std of MFCC 1-19",
        "speakers": n_speakers,
        "chance": round(1 / n_speakers, 4),
    }
    if n_speakers < 2 or all(labels.count(name) < 2 for name in set(labels)):
        return check  # nothing to tell apart, or no speaker with two utterances
    check["accuracy"] = round(speaker_id_accuracy(features, labels), 4)
    check["near_duplicates"] = similar_speaker_pairs(features, labels)
    for a, b, similarity in check["near_duplicates"]:
        log.warning("speakers %s and %s sound alike (centroid cosine %.3f)", a, b, similarity)
    return check


def _dump(document: dict) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
