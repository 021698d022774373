"""Small offline recordings and list files for the data tests, generated on the fly.

Speech comes from espeak-ng (English voices, and Mandarin read from pinyin, since espeak-ng 1.51
misreads Chinese characters) or from the seeded numpy pseudo-speech of
``simulations.pseudo_speech`` when espeak-ng is missing or ``source="pseudo"``. The good set
deliberately mixes formats, sample rates and channel counts.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf
from pypinyin import Style, lazy_pinyin

from fedvox.simulations.pseudo_speech import SAMPLE_RATE as PSEUDO_RATE
from fedvox.simulations.pseudo_speech import PseudoVoice, synthesize

ESPEAK = shutil.which("espeak-ng")

GOOD = [
    # (file name, speaker, language, text, espeak voice, sample rate, channels, format, subtype)
    ("spkA_0000.wav", "spkA", "en", "Hello world, this is a test.", "en-us+m3", 22050, 1, "WAV", "PCM_16"),
    ("spkA_0001.flac", "spkA", "en", "The birch canoe slid on the planks.", "en-us+m3", 44100, 2, "FLAC", "PCM_16"),
    ("spkB_0000.ogg", "spkB", "en", "Glue the sheet to the blue card.", "en-us+f2", 48000, 1, "OGG", "VORBIS"),
    ("spkB_0001.wav", "spkB", "EN", "It is easy to tell the depth of a well.", "en-us+f2", 16000, 1, "WAV", "FLOAT"),
    ("spkC_0000.wav", "spkC", "zh", "今天天气很好。", "cmn-latn-pinyin+f4", 32000, 1, "WAV", "PCM_16"),
    ("spkC_0001.flac", "spkC", "ZH", "我们去公园散步吧。", "cmn-latn-pinyin+f4", 24000, 1, "FLAC", "PCM_24"),
]


def speech(text: str, language: str, voice: str, seed: int, source: str = "espeak") -> tuple[np.ndarray, int]:
    """Mono float speech (peak 0.9) and its sample rate, from espeak-ng or seeded pseudo-speech."""
    if source == "pseudo" or ESPEAK is None:
        wave = synthesize(text, language.lower(), PseudoVoice.from_seed(seed), seed)
        return wave, PSEUDO_RATE
    spoken = text
    if language.lower() == "zh":
        spoken = " ".join(lazy_pinyin(text, style=Style.TONE3, neutral_tone_with_five=True))
        spoken = spoken.replace("，", ",").replace("。", ".")
    raw = subprocess.run([ESPEAK, "--stdout", "-v", voice, spoken], check=True, capture_output=True).stdout
    wave, rate = sf.read(io.BytesIO(raw), dtype="float32")
    return 0.9 * wave / max(float(np.abs(wave).max()), 1e-6), rate


def _resampled(wave: np.ndarray, rate: int, new_rate: int) -> np.ndarray:
    from scipy.signal import resample_poly

    gcd = np.gcd(rate, new_rate)
    return resample_poly(wave, new_rate // gcd, rate // gcd).astype(np.float32)


def write_good_set(folder: Path, source: str = "espeak", repeat: int = 1) -> Path:
    """Six valid utterances per ``repeat`` (en and zh, wav/flac/ogg, 16-48 kHz, one stereo).

    Returns the list file; each repetition is a different reading (another seed).
    """
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    rows = [(r, *row) for r in range(repeat) for row in GOOD]
    for seed, (r, name, speaker, language, text, voice, rate, channels, fmt, subtype) in enumerate(rows):
        name = name if r == 0 else name.replace(".", f"_{r}.")
        wave, native = speech(text, language, voice, seed, source)
        wave = _resampled(wave, native, rate)
        if channels == 2:  # the right channel quieter: mono is their mean
            wave = np.stack([wave, 0.5 * wave], axis=1)
        sf.write(folder / name, wave, rate, format=fmt, subtype=subtype)
        lines.append(f"{name}|{speaker}|{language}|{text}")
    list_file = folder / "good.list"
    list_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return list_file


def write_bad_set(folder: Path) -> tuple[Path, dict[int, str]]:
    """A list mixing every kind of bad entry with two good ones.

    Returns the list file and the expected reason code per line (``"ok"`` for accepted lines).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    good, rate = speech("Good morning to you all.", "en", "en-us+m3", 11)
    other, _ = speech("A second good utterance here.", "en", "en-us+f2", 12)
    sf.write(folder / "good.wav", good, rate, subtype="PCM_16")
    sf.write(folder / "other.wav", other, rate, subtype="PCM_16")
    shutil.copyfile(folder / "good.wav", folder / "copy_of_good.wav")
    sf.write(folder / "clipped.wav", np.clip(good * 8, -1, 1), rate, subtype="PCM_16")
    sf.write(folder / "silent.wav", np.zeros(rate * 2, np.float32), rate, subtype="PCM_16")
    sf.write(folder / "empty.wav", np.zeros(0, np.float32), rate, subtype="PCM_16")
    nan = good.copy()
    nan[100:110] = np.nan
    sf.write(folder / "nan.wav", nan, rate, subtype="FLOAT")
    sf.write(folder / "short.wav", good[: int(0.3 * rate)], rate, subtype="PCM_16")
    sf.write(folder / "long.wav", rng.normal(0, 0.1, 8000 * 55).astype(np.float32), 8000, subtype="PCM_16")
    (folder / "garbage.wav").write_bytes(rng.bytes(4096))
    (folder / "folder.wav").mkdir(exist_ok=True)
    (folder.parent / "outside.wav").write_bytes((folder / "other.wav").read_bytes())
    for i, _text in enumerate(("empty text", "bad language", "unphonemizable")):
        wave, _ = speech("Another sentence for text checks.", "en", "en-us+m3", 20 + i)
        sf.write(folder / f"text{i}.wav", wave * (0.5 + 0.1 * i), rate, subtype="PCM_16")
    rows = [
        ("good.wav|spk|en|Good morning to you all.", "ok"),
        ("just one field without separators", "malformed_line"),
        ("../outside.wav|spk|en|Escaping the data root.", "path_outside_root"),
        ("missing.wav|spk|en|This file does not exist.", "missing_file"),
        ("folder.wav|spk|en|A folder, not a file.", "unreadable_file"),
        ("garbage.wav|spk|en|Random bytes.", "undecodable_audio"),
        ("good.wav|spk|en|Good morning to you all.", "duplicate_entry"),
        ("copy_of_good.wav|spk|en|Good morning to you all.", "duplicate_entry"),
        ("text0.wav|spk|en|", "empty_text"),
        ("text1.wav|spk|xx|Bonjour tout le monde.", "unsupported_language"),
        ("text2.wav|spk|zh|###", "unphonemizable_text"),
        ("empty.wav|spk|en|No samples at all.", "empty_audio"),
        ("nan.wav|spk|en|Not a number inside.", "non_finite_samples"),
        ("short.wav|spk|en|Too short.", "too_short"),
        ("long.wav|spk|en|Far too long to be one utterance.", "too_long"),
        ("silent.wav|spk|en|Nothing to hear.", "silent_audio"),
        ("clipped.wav|spk|en|Recorded far too loud.", "clipped_audio"),
        ("other.wav|spk2|en|A second good utterance here.", "ok"),
    ]
    list_file = folder / "bad.list"
    list_file.write_text("\n".join(row for row, _ in rows) + "\n", encoding="utf-8")
    return list_file, {line: reason for line, (_, reason) in enumerate(rows, start=1)}


def fingerprint(folder: Path) -> dict[str, tuple[str, int]]:
    """SHA-256 and mtime (ns) of every file under ``folder``."""
    return {
        str(path.relative_to(folder)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
