"""Synthetic speakers for a federated simulation (``fedvox-sim speakers``).

No package ships multi-speaker human speech with transcripts, so every simulated client gets a
procedurally generated voice. With espeak-ng each speaker is a private voice-variant file
(pitch, formant scaling = vocal-tract length, roughness, breath, flutter, spectral tone) in a
private, pruned copy of espeak-ng's data, plus an accent and a speaking rate; Mandarin is read
from pypinyin syllables through ``cmn-latn-pinyin`` (espeak-ng 1.51 misreads Chinese characters).
Without espeak-ng the seeded formant synthesiser in :mod:`simulations.pseudo_speech` stands in,
loudly. Sentences come from the ``hsk-sentences-audio`` dataset (Mandarin and its English
translations, CC-BY-SA-4.0), two or three joined where needed so most utterances last 2-8 s.

Layout of ``out`` (list paths relative to the list file's folder, GPT-SoVITS format
``path|speaker|language|text``)::

    manifest.json                  everything: speakers, voices, counts, durations, seed, engine
    train.list                     all clients' training utterances (centralised baseline)
    heldout_seen.list              the clients' held-out utterances (seen-speaker validation)
    heldout_unseen.list            the unseen speakers' utterances (unseen-speaker validation)
    clients/spk000/train.list      one federated client: its private training data ...
    clients/spk000/heldout.list    ... and its own held-out utterances
    clients/spk000/spk000_train_0000.wav ...
    unseen/unseen000/heldout.list  speakers no client has (held-out only)

Every value is drawn from generators keyed by (seed, role, speaker index), so a speaker's voice
and sentences do not depend on how many speakers are generated, and the same seed gives
byte-identical files on the same espeak-ng version. Work is spread over processes per utterance;
the workers never import torch (its OpenMP threads would fight the espeak-ng children).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from io import BytesIO
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from shared.atomic import atomic_path, atomic_write_text
from shared.cli import progress
from shared.errors import ConfigError, DataError
from simulations.pseudo_speech import SAMPLE_RATE, PseudoVoice, synthesize
from simulations.speaker_id import mfcc_statistics, similar_speaker_pairs, speaker_id_accuracy

log = logging.getLogger(__name__)

GENERATOR = "fedvox-sim speakers"
LAYOUT_VERSION = 1
MANIFEST = "manifest.json"
LANGUAGES = ("en", "zh", "mix")
ENGINES = ("auto", "espeak-ng", "pseudo-speech")
MIN_UTTERANCES = 3  # a Zipf draw never leaves a client with fewer training utterances
MAX_SENTENCES = 3  # sentences joined into one utterance
TARGET_SECONDS = (2.5, 7.0)  # each utterance aims at a duration drawn from this range
HELDOUT_TEXT_SHARE = 0.1  # sentences reserved for held-out utterances (never in training)
MAX_SPEAKERS = 1000
MAX_UTTERANCES = 2000
# English accents that honour voice variants (plain "en-gb" silently ignores them).
ENGLISH_ACCENTS = ("en-us", "en", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-rp",
                   "en-gb-x-gbclan", "en-gb-x-gbcwmd")
MANDARIN_VOICE = "cmn-latn-pinyin"
# The part of espeak-ng's data the accents above need (2.5 MB of 13 MB); a private copy
# holds only these, so the voice list stays far below espeak-ng's 349-entry cap.
_ESPEAK_FILES = ("phontab", "phonindex", "phondata", "intonations", "en_dict", "cmn_dict")
_ESPEAK_LANGS = ("lang/gmw/en", "lang/sit/cmn")  # file-name prefixes
_OUTPUTS = (MANIFEST, "train.list", "heldout_seen.list", "heldout_unseen.list", "clients", "unseen",
            ".espeak")
_SECONDS_PER_UNIT = {"en": 0.36, "zh": 0.30}  # espeak-ng at 175 wpm: per word / per character
_TEXT_SOURCE = {
    "name": "hsk-sentences-audio", "version": "1.0.0", "licence": "CC-BY-SA-4.0",
    "url": "https://github.com/no7z/hsk-sentences-audio",
    "fields": "chinese (zh), translation.en (en)",
}


@dataclass(frozen=True)
class SpeakersConfig:
    """What to generate; every field has a command-line option of the same meaning."""

    n_speakers: int = 8
    utterances: int = 20  # training utterances per client (the mean when zipf > 0)
    language: str = "mix"  # en | zh | mix (half the clients each, both sexes in each)
    seed: int = 0
    zipf: float = 0.0  # 0: equal counts; > 0: client k of rank r gets ~ r**-zipf of the total
    heldout_utterances: int = 2  # per client and per unseen speaker
    unseen_speakers: int = 2
    engine: str = "auto"  # auto | espeak-ng | pseudo-speech
    workers: int | None = None  # processes; default: the CPUs this process may use

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad option and its valid range."""
        checks = [
            (1 <= self.n_speakers <= MAX_SPEAKERS, f"--n must be 1..{MAX_SPEAKERS}, got {self.n_speakers}"),
            (1 <= self.utterances <= MAX_UTTERANCES,
             f"--utterances must be 1..{MAX_UTTERANCES}, got {self.utterances}"),
            (self.language in LANGUAGES, f"--lang must be one of {', '.join(LANGUAGES)}, got {self.language!r}"),
            (self.seed >= 0, f"--seed must be >= 0, got {self.seed}"),
            (0.0 <= self.zipf <= 5.0 and np.isfinite(self.zipf), f"--zipf must be 0..5 (0 = equal counts), got {self.zipf}"),
            (self.zipf == 0.0 or self.utterances >= MIN_UTTERANCES,
             f"--utterances must be >= {MIN_UTTERANCES} with --zipf (each client keeps at least "
             f"{MIN_UTTERANCES}), got {self.utterances}"),
            (0 <= self.heldout_utterances <= 100, f"--heldout-utterances must be 0..100, got {self.heldout_utterances}"),
            (0 <= self.unseen_speakers <= MAX_SPEAKERS, f"--unseen-speakers must be 0..{MAX_SPEAKERS}, got {self.unseen_speakers}"),
            (self.unseen_speakers == 0 or self.heldout_utterances > 0,
             "--unseen-speakers needs --heldout-utterances >= 1 (unseen speakers only have held-out utterances)"),
            (self.engine in ENGINES, f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}"),
            (self.workers is None or self.workers >= 1, f"--workers must be >= 1, got {self.workers}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker and how each engine renders it."""

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
class _Job:
    """One utterance to synthesise (picklable: it crosses into the worker processes)."""

    path: str  # absolute WAV path
    text: str  # as written in the list file
    speaker: Speaker
    seed: tuple[int, ...]
    engine: str
    espeak_root: str  # folder holding the private espeak-ng-data


@dataclass
class _Result:
    speaker: str
    split: str  # train | heldout
    wav: str  # path relative to the speaker's folder
    text: str
    seconds: float = 0.0
    features: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]


def generate_speakers(out: str | os.PathLike[str], config: SpeakersConfig) -> dict:
    """Generate the speakers, their WAVs, list files and manifest under ``out``; return the manifest.

    Refuses a non-empty ``out`` that is not a previous output of this command; a previous
    output is replaced (only the entries this command writes are removed).
    """
    config.validate()
    out = Path(out).absolute()
    _claim_output_folder(out)
    engine, engine_info = _choose_engine(config.engine)
    speakers = [_make_speaker(config, "client", i) for i in range(config.n_speakers)]
    speakers += [_make_speaker(config, "unseen", j) for j in range(config.unseen_speakers)]
    counts = utterance_counts(config.n_speakers, config.utterances, config.zipf,
                              np.random.default_rng([config.seed, 2]))
    atomic_write_text(out / MANIFEST, _dump({"generator": GENERATOR, "complete": False, "config": asdict(config)}))

    espeak_root = out / ".espeak"
    if engine == "espeak-ng":
        _prepare_espeak_data(espeak_root, speakers)
    jobs, results = _plan(out, config, speakers, counts, engine, espeak_root)
    workers = min(config.workers or _available_cpus(), len(jobs))
    log.info("synthesising %d utterances of %d speakers with %s on %d process%s", len(jobs),
             len(speakers), engine, workers, "" if workers == 1 else "es")
    with progress() as bar:
        task = bar.add_task("speakers", total=len(jobs))
        for index, seconds, features in _run_jobs(jobs, workers):
            results[index].seconds, results[index].features = seconds, features
            bar.advance(task)
    shutil.rmtree(espeak_root, ignore_errors=True)  # the variants are kept in the manifest

    manifest = _write_lists_and_manifest(out, config, speakers, results, engine_info)
    log.info("wrote %d speakers, %.1f min of audio (%.1f MB) to %s", len(speakers),
             manifest["totals"]["seconds"] / 60, manifest["totals"]["bytes"] / 1e6, out)
    return manifest


def utterance_counts(n: int, mean: int, zipf: float, rng: np.random.Generator) -> list[int]:
    """Training utterances per client: ``mean`` each, or a Zipf split of ``n * mean`` in total.

    With ``zipf > 0`` the client at (random) rank r gets a share proportional to r**-zipf of
    what is left after every client has its :data:`MIN_UTTERANCES`, apportioned by largest
    remainders, so the total is exactly ``n * mean`` and no client falls below the minimum.
    """
    if zipf == 0.0:
        return [mean] * n
    weights = np.arange(1, n + 1, dtype=np.float64) ** -zipf
    weights = weights[rng.permutation(n)] / weights.sum()
    spare = n * mean - n * MIN_UTTERANCES
    exact = weights * spare
    counts = np.floor(exact).astype(int)
    counts[np.argsort(-(exact - counts), kind="stable")[: spare - counts.sum()]] += 1
    return [int(c) + MIN_UTTERANCES for c in counts]


# ---------------------------------------------------------------------------- speakers


def _make_speaker(config: SpeakersConfig, role: str, index: int) -> Speaker:
    """Draw speaker ``index`` of ``role`` from its own generator (independent of the others)."""
    rng = np.random.default_rng([config.seed, 0 if role == "client" else 1, index, 0])
    name = f"spk{index:03d}" if role == "client" else f"unseen{index:03d}"
    sex = "female" if index % 2 else "male"
    language = config.language if config.language != "mix" else ("zh" if (index // 2) % 2 else "en")
    female = sex == "female"
    tract = rng.uniform(1.08, 1.24) if female else rng.uniform(0.86, 1.02)
    f0 = rng.uniform(165, 235) if female else rng.uniform(78, 135)
    lines = [f"name {name}", f"pitch {int(f0)} {int(f0 * rng.uniform(1.3, 1.9))}", "formant 0 100 100 100"]
    for k in range(1, 6):
        lines.append(f"formant {k} {int(100 * tract * rng.uniform(0.97, 1.03))} "
                     f"{int(rng.uniform(85, 115))} {int(rng.uniform(85, 120))}")
    lines += [f"flutter {rng.integers(0, 26)}", f"roughness {rng.integers(0, 4)}",
              f"tone 600 {rng.integers(140, 201)} 1200 {rng.integers(110, 161)} 2000 {rng.integers(80, 131)}"]
    breath = int(rng.choice([0, 0, 0, 1, 2, 4]))
    if breath:
        lines.append("breath " + " ".join([str(breath)] * 6))
    # No "language variant" line: espeak-ng then leaves the file out of its voice list (capped
    # at 349 entries) but still loads it by path for "<accent>+<name>".
    accent = str(rng.choice(ENGLISH_ACCENTS)) if language == "en" else MANDARIN_VOICE
    speed = int(rng.integers(140, 196))
    pseudo = PseudoVoice.from_seed([config.seed, 0 if role == "client" else 1, index, 3], sex=sex)
    return Speaker(name, role, index, sex, language, accent, speed, "\n".join(lines) + "\n", pseudo)


def _plan(out: Path, config: SpeakersConfig, speakers: list[Speaker], counts: list[int], engine: str,
          espeak_root: Path) -> tuple[list[_Job], list[_Result]]:
    """Every utterance's text, path and seed, in a fixed order."""
    jobs: list[_Job] = []
    results: list[_Result] = []
    for k, speaker in enumerate(speakers):
        role_code, index = (0 if speaker.role == "client" else 1), speaker.index
        train_pool, heldout_pool = _sentence_pools(speaker.language, config.seed)
        rng = np.random.default_rng([config.seed, role_code, index, 1])
        splits = [("heldout", config.heldout_utterances, heldout_pool)]
        if speaker.role == "client":
            splits.insert(0, ("train", counts[k], train_pool))
        for split, count, pool in splits:
            stream = _sentence_stream(pool, rng)
            for u in range(count):
                text = _utterance_text(stream, speaker, rng)
                wav = f"{speaker.name}_{split}_{u:04d}.wav"
                seed = (config.seed, role_code, index, 2, 0 if split == "train" else 1, u)
                jobs.append(_Job(str(out / speaker.folder / wav), text, speaker, seed, engine, str(espeak_root)))
                results.append(_Result(speaker.name, split, wav, text))
    return jobs, results


def _sentence_stream(pool: tuple[str, ...], rng: np.random.Generator):
    """Sentences in a fresh random order, pass after pass (no repeat within a pass)."""
    while True:
        for i in rng.permutation(len(pool)):
            yield pool[i]


def _utterance_text(stream, speaker: Speaker, rng: np.random.Generator) -> str:
    """Join 1-3 sentences until the estimated reading time reaches a drawn target."""
    target = rng.uniform(*TARGET_SECONDS)
    per_unit = _SECONDS_PER_UNIT[speaker.language] * 175.0 / speaker.speed_wpm
    sentences: list[str] = []
    while len(sentences) < MAX_SENTENCES:
        sentences.append(next(stream))
        units = sum(_text_units(s, speaker.language) for s in sentences)
        if units * per_unit >= target:
            break
    return ("" if speaker.language == "zh" else " ").join(sentences)


def _text_units(text: str, language: str) -> int:
    return len(re.findall(r"[\u4e00-\u9fff]", text)) if language == "zh" else len(text.split())


@lru_cache(maxsize=4)
def _sentences(language: str) -> tuple[str, ...]:
    """Clean, distinct sentences of one language from the HSK dataset, in dataset order.

    English keeps only plain ASCII sentences without digits (a dash becomes a comma), so the
    audio says exactly what the transcript says; Mandarin keeps Han characters and 。，？！、.
    """
    from hsk_sentences_audio import load_sentences

    keep: dict[str, None] = {}
    for row in load_sentences():
        if language == "zh":
            text = row["chinese"].strip()
            ok = re.fullmatch(r"[\u4e00-\u9fff，、][\u4e00-\u9fff，、]*[。？！]", text) is not None
        else:
            text = re.sub(r"\s*—\s*", ", ", row["translation"]["en"].strip())
            ok = re.fullmatch(r"[A-Za-z][A-Za-z ,;'\-]*[.?!]", text) is not None
        if ok:
            keep.setdefault(text)
    return tuple(keep)


def _sentence_pools(language: str, seed: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split the sentences into a training and a held-out pool (seeded, the same for all speakers)."""
    sentences = _sentences(language)
    order = np.random.default_rng([seed, 3, LANGUAGES.index(language)]).permutation(len(sentences))
    cut = int(len(sentences) * HELDOUT_TEXT_SHARE)
    return tuple(sentences[i] for i in order[cut:]), tuple(sentences[i] for i in order[:cut])


# ----------------------------------------------------------------------------- engines


def _choose_engine(requested: str) -> tuple[str, dict]:
    if requested == "pseudo-speech":
        return "pseudo-speech", {"name": "pseudo-speech", "fallback": False}
    if shutil.which("espeak-ng") is not None:
        return "espeak-ng", {"name": "espeak-ng", "version": _espeak_version()[0], "fallback": False}
    if requested == "espeak-ng":
        raise ConfigError("--engine espeak-ng: espeak-ng is not on PATH; install it "
                          "(apt-get install espeak-ng) or use --engine auto to fall back to pseudo-speech")
    reason = "espeak-ng not found on PATH"
    log.warning("%s: FALLING BACK TO PSEUDO-SPEECH (a formant caricature, not intelligible speech). "
                "Install espeak-ng (apt-get install espeak-ng) for real synthetic speech.", reason)
    return "pseudo-speech", {"name": "pseudo-speech", "fallback": True, "reason": reason}


def _espeak_version() -> tuple[str, Path]:
    """espeak-ng's version and its data folder, from ``espeak-ng --version``."""
    done = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=False)
    match = re.search(r"text-to-speech:\s*(\S+)\s+Data at:\s*(.+)", done.stdout)
    if done.returncode != 0 or match is None:
        raise DataError(f"cannot read espeak-ng's version and data folder from `espeak-ng --version` "
                        f"(exit {done.returncode}): {done.stdout.strip() or done.stderr.strip()}")
    return match.group(1), Path(match.group(2).strip())


def _prepare_espeak_data(root: Path, speakers: list[Speaker]) -> None:
    """A private, pruned copy of espeak-ng's data with one voice-variant file per speaker."""
    source = _espeak_version()[1]
    target = root / "espeak-ng-data"
    shutil.rmtree(root, ignore_errors=True)
    try:
        for name in _ESPEAK_FILES:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, target / name)
        for prefix in _ESPEAK_LANGS:
            folder, stem = prefix.rsplit("/", 1)
            (target / folder).mkdir(parents=True, exist_ok=True)
            for path in sorted((source / folder).glob(stem + "*")):
                shutil.copyfile(path, target / folder / path.name)
    except OSError as exc:
        raise DataError(f"cannot copy espeak-ng data from {source}: {exc}; is espeak-ng-data complete?") from exc
    variants = target / "voices" / "!v"
    variants.mkdir(parents=True, exist_ok=True)
    for speaker in speakers:
        (variants / speaker.name).write_text(speaker.variant, encoding="utf-8")


def _espeak(job: _Job) -> np.ndarray:
    speaker = job.speaker
    spoken = _pinyin_for_espeak(job.text) if speaker.language == "zh" else job.text
    command = ["espeak-ng", f"--path={job.espeak_root}", "--stdout", "--stdin",
               "-v", f"{speaker.accent}+{speaker.name}", "-s", str(speaker.speed_wpm)]
    done = subprocess.run(command, input=spoken.encode("utf-8"), capture_output=True, check=False)
    try:
        wave, rate = sf.read(BytesIO(done.stdout), dtype="float64")
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise DataError(f"espeak-ng produced no audio for {speaker.name} ({' '.join(command[3:])}, exit "
                        f"{done.returncode}): {done.stderr.decode(errors='replace').strip() or exc}") from exc
    if done.returncode != 0 or len(wave) == 0:
        raise DataError(f"espeak-ng failed for {speaker.name} (exit {done.returncode}): "
                        f"{done.stderr.decode(errors='replace').strip()}")
    g = np.gcd(SAMPLE_RATE, rate)
    return resample_poly(wave, SAMPLE_RATE // g, rate // g)


def _pinyin_for_espeak(text: str) -> str:
    """Numbered pinyin with ASCII punctuation: espeak-ng 1.51 cannot read Chinese characters."""
    from pypinyin import Style, lazy_pinyin

    punctuation = {"，": ",", "、": ",", "。": ".", "？": "?", "！": "!"}
    spoken = ""
    for token in lazy_pinyin(text, style=Style.TONE3, neutral_tone_with_five=True):
        mapped = "".join(punctuation.get(ch, "") for ch in token)
        spoken += mapped if mapped or not token.strip() else f" {token}"
    return spoken.strip()


def _synthesise(indexed: tuple[int, _Job]) -> tuple[int, float, np.ndarray]:
    """Worker: render one utterance, write it atomically as 16-bit 32 kHz WAV."""
    index, job = indexed
    if job.engine == "espeak-ng":
        wave = _espeak(job)
    else:
        wave = synthesize(job.text, job.speaker.language, job.speaker.pseudo_voice, job.seed)
    wave = (0.9 * wave / max(float(np.abs(wave).max()), 1e-6)).astype(np.float32)
    path = Path(job.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        sf.write(tmp, wave, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return index, len(wave) / SAMPLE_RATE, mfcc_statistics(wave, SAMPLE_RATE)


def _init_worker() -> None:
    """If torch was imported anyway (fork start), keep its threads off the espeak-ng cores."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _run_jobs(jobs: list[_Job], workers: int):
    indexed = list(enumerate(jobs))
    if workers == 1:
        yield from map(_synthesise, indexed)
        return
    # spawn: a fresh interpreter per worker, safe whatever threads the parent runs (torch, Ray).
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
        yield from pool.imap_unordered(_synthesise, indexed, chunksize=2)


def _available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ------------------------------------------------------------------------------ output


def _claim_output_folder(out: Path) -> None:
    """Make ``out`` ours: empty, new, or a previous speakers output (whose entries are removed)."""
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
        raise ConfigError(f"--out {out} is not empty and is not an earlier `{GENERATOR}` output "
                          f"(no {MANIFEST} of ours); choose a new or empty folder")
    log.info("replacing the earlier speakers output in %s", out)
    for name in _OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _list_line(path: str, speaker: str, language: str, text: str) -> str:
    return f"{path}|{speaker}|{language}|{text}\n"


def _write_lists_and_manifest(out: Path, config: SpeakersConfig, speakers: list[Speaker],
                              results: list[_Result], engine_info: dict) -> dict:
    by_speaker = {s.name: s for s in speakers}
    top: dict[str, list[str]] = {"train.list": [], "heldout_seen.list": [], "heldout_unseen.list": []}
    entries = []
    for speaker in speakers:
        mine = [r for r in results if r.speaker == speaker.name]
        entry = {"name": speaker.name, "role": speaker.role, "sex": speaker.sex, "language": speaker.language,
                 "folder": speaker.folder}
        if engine_info["name"] == "espeak-ng":
            entry["voice"] = {"espeak_voice": f"{speaker.accent}+{speaker.name}", "speed_wpm": speaker.speed_wpm,
                              "variant_file": speaker.variant}
        else:
            entry["voice"] = {"pseudo_speech": asdict(speaker.pseudo_voice)}
        for split in ("train", "heldout"):
            rows = [r for r in mine if r.split == split]
            if speaker.role == "unseen" and split == "train":
                continue
            lines = [_list_line(r.wav, r.speaker, by_speaker[r.speaker].language, r.text) for r in rows]
            atomic_write_text(out / speaker.folder / f"{split}.list", "".join(lines))
            key = "train.list" if split == "train" else f"heldout_{'seen' if speaker.role == 'client' else 'unseen'}.list"
            top[key] += [_list_line(f"{speaker.folder}/{r.wav}", r.speaker, speaker.language, r.text) for r in rows]
            entry[split] = {"list": f"{speaker.folder}/{split}.list", "utterances": len(rows),
                            "seconds": round(sum(r.seconds for r in rows), 3)}
        entries.append(entry)
    for name, lines in top.items():
        atomic_write_text(out / name, "".join(lines))

    seconds = np.array([r.seconds for r in results])
    labels = [r.speaker for r in results]
    features = np.stack([r.features for r in results])
    check: dict = {"method": "leave-one-out nearest speaker centroid, cosine on z-scored mean+std of MFCC 1-19",
                   "speakers": len(speakers), "chance": round(1 / len(speakers), 4)}
    if len(speakers) > 1 and any(labels.count(s.name) > 1 for s in speakers):
        check["accuracy"] = round(speaker_id_accuracy(features, labels), 4)
        check["near_duplicates"] = similar_speaker_pairs(features, labels)
        for a, b, similarity in check["near_duplicates"]:
            log.warning("speakers %s and %s sound alike (centroid cosine %.3f)", a, b, similarity)
    short = int((seconds < 0.6).sum())
    if short:
        log.warning("%d utterances are shorter than 0.6 s (the data pipeline rejects them)", short)
    manifest = {
        "generator": GENERATOR,
        "layout_version": LAYOUT_VERSION,
        "complete": True,
        "config": {k: v for k, v in asdict(config).items() if k != "workers"},  # workers change nothing
        "engine": engine_info,
        "sample_rate": SAMPLE_RATE,
        "format": "WAV PCM_16 mono",
        "list_format": "path|speaker|language|text, path relative to the list file's folder",
        "text_source": _TEXT_SOURCE,
        "lists": {"train": "train.list", "heldout_seen": "heldout_seen.list", "heldout_unseen": "heldout_unseen.list"},
        "totals": {
            "speakers": len(speakers), "clients": config.n_speakers, "unseen_speakers": config.unseen_speakers,
            "utterances": len(results), "seconds": round(float(seconds.sum()), 3),
            "utterance_seconds": {"min": round(float(seconds.min()), 3), "median": round(float(np.median(seconds)), 3),
                                  "max": round(float(seconds.max()), 3)},
            "under_0.6_s": short,
            "bytes": sum((out / by_speaker[r.speaker].folder / r.wav).stat().st_size for r in results),
        },
        "speaker_check": check,
        "speakers": entries,
    }
    atomic_write_text(out / MANIFEST, _dump(manifest))
    return manifest


def _dump(document: dict) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
