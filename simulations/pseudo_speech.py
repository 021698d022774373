"""Seeded pseudo-speech: a small text-driven formant synthesiser in numpy, no system dependency.

Tests and machines without espeak-ng still need many distinct speakers whose audio follows
their transcripts. Each text is turned into syllables (pinyin initials, finals and tones for
Mandarin; letter groups for English), each syllable into phone targets (formants, voicing,
aspiration, frication), and the targets are rendered by a source-filter model: a glottal
flow-derivative pulse train plus noise, shaped frame by frame by a cascade of five formant
resonators applied in the STFT domain (overlap-add of windowed blocks, exact per-block
convolution). The same text gives the same phone sequence for every speaker, so a text-to-speech
model can learn from it; a :class:`PseudoVoice` (F0, vocal-tract length, glottal shape,
breathiness, bandwidths, speaking rate) changes how it sounds. Not intelligible speech, but it
has speech's rhythm, formant motion, voiced/unvoiced alternation and intonation (Mandarin tones).

Everything is a function of the seeds: output is bit-identical per seed on one numpy version.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from fedvox.shared.errors import ConfigError

SAMPLE_RATE = 32_000  # == shared.audio.SAMPLE_RATE (not imported: that module pulls in torch)
LANGUAGES = ("en", "zh")

_HOP = 256  # control and STFT hop: 8 ms
_WIN = 1024  # analysis window: 32 ms, Hann at hop WIN/4 sums to exactly 2
_NFFT = 2048  # room for the resonators' impulse-response tails (no circular wrap)
_SILENCE = (0.0, 0.0, 0.0)

# Vowel targets (F1, F2, F3 in Hz) for a reference adult male vocal tract: Peterson & Barney
# (1952) averages, e and o from Hillenbrand et al. (1995), schwa (@), Mandarin ü (y) and
# e (7) approximated; a voice scales them by its vocal-tract length.
_VOWELS: dict[str, tuple[float, float, float]] = {
    "i": (270, 2290, 3010),
    "I": (390, 1990, 2550),
    "e": (480, 2090, 2690),
    "E": (530, 1840, 2480),
    "ae": (660, 1720, 2410),
    "a": (730, 1090, 2440),
    "o": (500, 910, 2460),
    "O": (570, 840, 2410),
    "U": (440, 1020, 2240),
    "u": (300, 870, 2240),
    "V": (640, 1190, 2390),
    "@": (500, 1500, 2500),
    "r": (490, 1350, 1690),
    "y": (270, 1900, 2300),
    "7": (460, 1200, 2600),
}


@dataclass(frozen=True)
class _Consonant:
    """How a consonant is rendered: its manner, noise centre and formant locus."""

    manner: str  # stop | affricate | fricative | nasal | approximant | aspirate
    noise_hz: float = 0.0  # burst / frication centre (reference vocal tract)
    locus: tuple[float, float, float] = (400.0, 1500.0, 2500.0)  # formants the vowel moves from
    voiced: bool = False
    aspirated: bool = False


_LABIAL, _ALVEOLAR, _POSTALVEOLAR, _PALATAL, _VELAR = (
    (300.0, 900.0, 2200.0),
    (350.0, 1700.0, 2600.0),
    (350.0, 1900.0, 2400.0),
    (300.0, 2200.0, 2900.0),
    (350.0, 1900.0, 2100.0),
)

_PINYIN_INITIALS: dict[str, _Consonant] = {
    "b": _Consonant("stop", 900, _LABIAL),
    "p": _Consonant("stop", 900, _LABIAL, aspirated=True),
    "d": _Consonant("stop", 4000, _ALVEOLAR),
    "t": _Consonant("stop", 4000, _ALVEOLAR, aspirated=True),
    "g": _Consonant("stop", 2200, _VELAR),
    "k": _Consonant("stop", 2200, _VELAR, aspirated=True),
    "z": _Consonant("affricate", 6000, _ALVEOLAR),
    "c": _Consonant("affricate", 6000, _ALVEOLAR, aspirated=True),
    "zh": _Consonant("affricate", 3200, _POSTALVEOLAR),
    "ch": _Consonant("affricate", 3200, _POSTALVEOLAR, aspirated=True),
    "j": _Consonant("affricate", 4200, _PALATAL),
    "q": _Consonant("affricate", 4200, _PALATAL, aspirated=True),
    "f": _Consonant("fricative", 7000, _LABIAL),
    "s": _Consonant("fricative", 6000, _ALVEOLAR),
    "sh": _Consonant("fricative", 3200, _POSTALVEOLAR),
    "x": _Consonant("fricative", 4200, _PALATAL),
    "h": _Consonant("aspirate", 0, _VELAR),
    "r": _Consonant("approximant", 0, (350, 1300, 1700), voiced=True),
    "m": _Consonant("nasal", 0, _LABIAL, voiced=True),
    "n": _Consonant("nasal", 0, _ALVEOLAR, voiced=True),
    "l": _Consonant("approximant", 0, (360, 1300, 2700), voiced=True),
    "y": _Consonant("approximant", 0, (270, 2200, 3000), voiced=True),
    "w": _Consonant("approximant", 0, (300, 700, 2200), voiced=True),
}
# English letters map onto the same consonant inventory (a letter-level caricature, not G2P).
_LETTERS: dict[str, _Consonant] = {
    **{c: _PINYIN_INITIALS[c] for c in "bpdtgkfsmnlrwyh"},
    "c": _PINYIN_INITIALS["k"],
    "q": _PINYIN_INITIALS["k"],
    "x": _PINYIN_INITIALS["s"],
    "v": _Consonant("fricative", 7000, _LABIAL, voiced=True),
    "z": _Consonant("fricative", 6000, _ALVEOLAR, voiced=True),
    "j": _PINYIN_INITIALS["zh"],
    "sh": _PINYIN_INITIALS["sh"],
    "ch": _PINYIN_INITIALS["ch"],
    "th": _Consonant("fricative", 7500, _ALVEOLAR),
    "ng": _PINYIN_INITIALS["n"],
}
_ENGLISH_VOWELS = {
    "a": "ae",
    "e": "E",
    "i": "I",
    "o": "O",
    "u": "V",
    "y": "i",
    "ee": "i",
    "ea": "i",
    "oo": "u",
    "ou": "a U",
    "ow": "a U",
    "ai": "e I",
    "ay": "e I",
    "oi": "O I",
    "oy": "O I",
    "au": "O",
    "aw": "O",
    "ie": "a I",
}
# Mandarin finals as vowel targets (glides and diphthongs as sequences) plus a nasal coda.
_FINAL_VOWELS = {
    "a": "a",
    "o": "o",
    "e": "7",
    "i": "i",
    "u": "u",
    "v": "y",
    "er": "r",
    "ai": "a I",
    "ei": "e I",
    "ao": "a U",
    "ou": "o U",
    "ia": "i a",
    "ie": "i E",
    "ua": "u a",
    "uo": "u o",
    "ve": "y E",
    "iao": "i a U",
    "iu": "i o U",
    "iou": "i o U",
    "uai": "u a I",
    "ui": "u e I",
    "uei": "u e I",
    "an": "a",
    "en": "@",
    "in": "i",
    "un": "u @",
    "vn": "y @",
    "ian": "i E",
    "uan": "u a",
    "van": "y E",
    "ang": "a",
    "eng": "@",
    "ing": "i",
    "ong": "U",
    "iang": "i a",
    "iong": "i U",
    "uang": "u a",
    "ueng": "u @",
    "uen": "u @",
}
# Mandarin tones as F0 targets in semitones around the speaker's median (start, [mid,] end).
_TONES = {1: (3.0, 3.0), 2: (-1.0, 3.5), 3: (-1.5, -4.5, -1.0), 4: (4.0, -3.5), 5: (0.0, -1.0)}
_PAUSES = {
    ",": 0.18,
    "，": 0.18,
    "、": 0.12,
    ";": 0.25,
    ".": 0.32,
    "。": 0.32,
    "!": 0.32,
    "！": 0.32,
    "?": 0.32,
    "？": 0.32,
}


@dataclass(frozen=True)
class _Syllable:
    onset: _Consonant | None
    vowels: tuple[str, ...]
    coda: _Consonant | None
    pitch: tuple[float, ...]  # F0 targets in semitones across the syllable
    pause_after: float = 0.0  # seconds of silence (punctuation)


@dataclass(frozen=True)
class PseudoVoice:
    """One synthetic speaker: what makes its pseudo-speech recognisably its own."""

    sex: str
    f0_hz: float  # median fundamental frequency
    f0_range: float  # intonation scale: 1.0 = tones and accents as tabulated
    vocal_tract: float  # formant frequency scale (shorter tract -> higher formants)
    formant_shift: tuple[float, float, float, float]  # per-formant individual offsets
    bandwidth: float  # formant bandwidth scale (damping: thin vs dull voice)
    open_quotient: float  # glottal open phase: higher is softer/breathier, steeper tilt
    pulse_skew: float  # opening share of the open phase: higher is a more abrupt closure
    breathiness: float  # aspiration noise mixed into voicing
    jitter: float  # random F0 perturbation from frame to frame (fraction)
    rate: float  # speaking-rate factor (durations are divided by it)

    @classmethod
    def from_seed(cls, seed: int | Sequence[int], sex: str | None = None) -> PseudoVoice:
        """Draw a voice; ``sex`` fixes the F0 and vocal-tract ranges ('female' or 'male')."""
        rng = np.random.default_rng(seed)
        drawn_sex = "female" if rng.random() < 0.5 else "male"
        sex = sex or drawn_sex
        if sex not in ("female", "male"):
            raise ConfigError(f"pseudo-speech voice sex must be 'female' or 'male', got {sex!r}")
        female = sex == "female"
        f0_lo, f0_hi = (160.0, 255.0) if female else (82.0, 145.0)
        vt_lo, vt_hi = (1.08, 1.24) if female else (0.86, 1.02)
        return cls(
            sex=sex,
            f0_hz=float(np.exp(rng.uniform(np.log(f0_lo), np.log(f0_hi)))),
            f0_range=float(rng.uniform(0.6, 1.4)),
            vocal_tract=float(rng.uniform(vt_lo, vt_hi)),
            formant_shift=tuple(float(v) for v in rng.uniform(0.94, 1.06, size=4)),
            bandwidth=float(rng.uniform(0.7, 1.6)),
            open_quotient=float(rng.uniform(0.35, 0.8)),
            pulse_skew=float(rng.uniform(0.55, 0.85)),
            breathiness=float(rng.uniform(0.0, 0.35)),
            jitter=float(rng.uniform(0.003, 0.02)),
            rate=float(rng.uniform(0.8, 1.25)),
        )


def synthesize(
    text: str, language: str, voice: PseudoVoice, seed: int | Sequence[int], sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    """Pseudo-speech for ``text`` in ``voice``: float32 mono at ``sample_rate``, peak 0.9.

    ``seed`` picks this reading's small variations (durations, F0 offset, noise), as two
    readings of one sentence by one person differ.
    """
    if language not in LANGUAGES:
        raise ConfigError(f"pseudo-speech language must be one of {LANGUAGES}, got {language!r}")
    rng = np.random.default_rng(seed)
    syllables = _mandarin_syllables(text) if language == "zh" else _english_syllables(text)
    if not syllables:
        raise ConfigError(f"pseudo-speech: no speakable syllables in {text!r}")
    timeline = _Timeline(voice, rng, sample_rate)
    timeline.silence(float(rng.uniform(0.12, 0.25)))
    for syllable in syllables:
        timeline.syllable(syllable)
    timeline.silence(float(rng.uniform(0.15, 0.3)))
    return _render(timeline.tracks(), voice, rng, sample_rate)


# ------------------------------------------------------------------------------------ text


def _mandarin_syllables(text: str) -> list[_Syllable]:
    from pypinyin import Style, lazy_pinyin  # pure Python; imported lazily (slow dictionary load)

    syllables: list[_Syllable] = []
    for token in lazy_pinyin(text, style=Style.TONE3, neutral_tone_with_five=True):
        match = re.fullmatch(r"([a-z]+)([1-5])", token)
        if match is None:
            _add_pause(syllables, token)
            continue
        body, tone = match.group(1), int(match.group(2))
        initial = next((i for i in ("zh", "ch", "sh") if body.startswith(i)), body[0])
        if initial not in _PINYIN_INITIALS or initial == body:
            initial = ""
        final = body[len(initial) :]
        if initial in ("j", "q", "x", "y") and final.startswith("u"):
            final = "v" + final[1:]  # ju = jü
        if initial in ("y", "w") and final not in _FINAL_VOWELS:
            final = {"y": "i", "w": "u"}[initial] + final
        if final == "i" and initial in ("z", "c", "s", "zh", "ch", "sh", "r"):
            vowels = ("r",) if initial in ("zh", "ch", "sh", "r") else ("@",)  # apical vowels
        else:
            vowels = tuple(_FINAL_VOWELS.get(final, "@").split())
        coda = _PINYIN_INITIALS["n"] if final.endswith(("n", "ng")) and final != "er" else None
        syllables.append(_Syllable(_PINYIN_INITIALS.get(initial), vowels, coda, _TONES[tone]))
    return syllables


def _english_syllables(text: str) -> list[_Syllable]:
    syllables: list[_Syllable] = []
    for token in re.findall(r"[a-z']+|[.,;!?]", text.lower()):
        if token in _PAUSES:
            _add_pause(syllables, token)
            continue
        word = token.replace("'", "")
        groups = re.findall(r"([^aeiouy]*)([aeiouy]+)", word) or [(word, "")]
        tail = re.search(r"[^aeiouy]*$", word).group(0) if re.search(r"[aeiouy]", word) else ""
        for k, (onset, nucleus) in enumerate(groups):
            vowel = _ENGLISH_VOWELS.get(nucleus[:2]) or _ENGLISH_VOWELS.get(nucleus[:1], "@")
            pitch = (2.0, 1.0) if k == 0 else (0.0, -0.5)  # stress the first syllable of a word
            coda = _consonant(tail) if k == len(groups) - 1 and tail else None
            syllables.append(_Syllable(_consonant(onset), tuple(vowel.split()), coda, pitch))
    if text.rstrip().endswith("?") and syllables:  # yes/no-question rise on the last syllable
        syllables[-1] = replace(syllables[-1], pitch=(0.0, 5.0))
    return syllables


def _consonant(letters: str) -> _Consonant | None:
    """The last consonant sound of a letter cluster (digraphs first)."""
    for size in (2, 1):
        chunk = letters[-size:]
        if len(chunk) == size and chunk in _LETTERS:
            return _LETTERS[chunk]
    return None


def _add_pause(syllables: list[_Syllable], token: str) -> None:
    pause = max((_PAUSES.get(ch, 0.0) for ch in token), default=0.0)
    if pause and syllables:
        syllables[-1] = replace(syllables[-1], pause_after=syllables[-1].pause_after + pause)


# ------------------------------------------------------------------------------ rendering


class _Timeline:
    """Phone targets laid out on the control grid (one row per ``_HOP`` samples)."""

    def __init__(self, voice: PseudoVoice, rng: np.random.Generator, sample_rate: int):
        self.voice, self.rng, self.frame_s = voice, rng, _HOP / sample_rate
        self.rows: list[tuple[int, float, float, float, float, float, float, float]] = []
        self.pitch: list[np.ndarray] = []  # semitones per frame; NaN while silent

    def add(
        self,
        seconds: float,
        formants: tuple[float, float, float],
        voicing: float = 0.0,
        aspiration: float = 0.0,
        frication: float = 0.0,
        noise_hz: float = 0.0,
    ) -> int:
        """Hold one target for ``seconds`` (stretched by the rate and this reading); its frames."""
        stretch = float(self.rng.lognormal(0.0, 0.12)) / self.voice.rate
        frames = max(1, round(seconds * stretch / self.frame_s))
        self.rows.append((frames, *formants, voicing, aspiration, frication, noise_hz))
        return frames

    def silence(self, seconds: float) -> None:
        self.pitch.append(np.full(self.add(seconds, _SILENCE), np.nan))

    def syllable(self, syllable: _Syllable) -> None:
        frames = 0
        if syllable.onset is not None:
            frames += _consonant_phones(self, syllable.onset, _VOWELS[syllable.vowels[0]], onset=True)
        for v in syllable.vowels:
            frames += self.add(0.1 / len(syllable.vowels) + 0.03, _VOWELS[v], voicing=1.0)
        if syllable.coda is not None:
            frames += _consonant_phones(self, syllable.coda, _VOWELS[syllable.vowels[-1]], onset=False)
        targets = np.asarray(syllable.pitch, dtype=np.float64)
        self.pitch.append(np.interp(np.linspace(0, 1, frames), np.linspace(0, 1, len(targets)), targets))
        if syllable.pause_after:
            self.silence(syllable.pause_after)

    def tracks(self) -> _Tracks:
        table = np.array(self.rows, dtype=np.float64)
        table = np.repeat(table[:, 1:], table[:, 0].astype(int), axis=0)
        formants, (voicing, aspiration, frication, noise_hz) = table[:, :3], table[:, 3:].T
        formants[np.all(formants == 0.0, axis=1)] = _VOWELS["@"]  # a neutral tract while silent
        pitch = np.concatenate(self.pitch)
        voiced = ~np.isnan(pitch)
        # Declination: F0 drifts down over the utterance, as in read speech; plus a reading offset.
        pitch[voiced] += np.linspace(1.5, -2.5, int(voiced.sum())) + self.rng.normal(0.0, 0.7)
        pitch = np.interp(np.arange(len(pitch)), np.flatnonzero(voiced), pitch[voiced])
        return _Tracks(
            formants=_smooth(formants, 7),
            voicing=_smooth(voicing, 3),
            aspiration=_smooth(aspiration, 3),
            frication=_smooth(frication, 2),
            noise_hz=np.maximum(noise_hz, 1000.0),
            pitch=_smooth(pitch * self.voice.f0_range, 5),
        )


@dataclass
class _Tracks:
    """Control tracks, one value per ``_HOP`` samples."""

    formants: np.ndarray  # [frames, 3] F1-F3 in Hz for the reference vocal tract
    voicing: np.ndarray  # [frames] amplitude of the glottal source
    aspiration: np.ndarray  # [frames] noise through the formants
    frication: np.ndarray  # [frames] noise in the frication band
    noise_hz: np.ndarray  # [frames] frication band centre
    pitch: np.ndarray  # [frames] semitones around the speaker's median F0


def _consonant_phones(timeline: _Timeline, c: _Consonant, vowel: tuple[float, float, float], onset: bool) -> int:
    """Add a consonant's phones; formants sit between its locus and the vowel, so vowels glide."""
    locus = tuple(0.5 * (np.asarray(c.locus) + np.asarray(vowel)))
    voicing = 0.35 if c.voiced else 0.0
    if c.manner in ("stop", "affricate"):
        frames = timeline.add(0.05, locus, voicing=voicing)  # closure, then burst or frication
        frames += timeline.add(0.012 if c.manner == "stop" else 0.07, locus, frication=0.6, noise_hz=c.noise_hz)
        if c.aspirated and onset:
            frames += timeline.add(0.05, vowel, aspiration=0.5)
        return frames
    if c.manner == "fricative":
        return timeline.add(
            0.08, locus, voicing=voicing, frication=0.8 if c.noise_hz < 5000 else 0.45, noise_hz=c.noise_hz
        )
    if c.manner == "aspirate":
        return timeline.add(0.06, vowel, aspiration=0.6)
    if c.manner == "nasal":
        return timeline.add(0.055, (260.0, c.locus[1], 2500.0), voicing=0.45)
    return timeline.add(0.045, c.locus, voicing=0.7)  # approximant


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    """Centred moving average along time (edges held): coarticulation and click-free gains."""
    kernel = np.ones(width) / width
    pad = [(width // 2, width - 1 - width // 2)] + [(0, 0)] * (x.ndim - 1)
    padded = np.pad(x, pad, mode="edge")
    if x.ndim == 1:
        return np.convolve(padded, kernel, mode="valid")
    return np.stack([np.convolve(padded[:, k], kernel, mode="valid") for k in range(x.shape[1])], axis=1)


def _render(tracks: _Tracks, voice: PseudoVoice, rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    frames = len(tracks.pitch)
    n = frames * _HOP
    centres = (np.arange(frames) + 0.5) * _HOP  # where each control value holds
    t = np.arange(n, dtype=np.float64)

    # Glottal source: a Rosenberg flow pulse per period (slow opening, abrupt closure),
    # differentiated (the flow derivative includes lip radiation); the open quotient and the
    # opening share set the spectral tilt. F0 wobbles a little from frame to frame (jitter).
    jitter = _smooth(rng.normal(0.0, voice.jitter, frames), 2)
    f0 = np.interp(t, centres, voice.f0_hz * 2.0 ** (tracks.pitch / 12.0) * (1.0 + jitter))
    phase = np.cumsum(f0 / sample_rate)
    frac = phase - np.floor(phase)
    x = np.minimum(frac / voice.open_quotient, 1.0)
    opening = voice.pulse_skew
    flow = np.where(
        x < opening, 0.5 * (1.0 - np.cos(np.pi * x / opening)), np.cos(0.5 * np.pi * (x - opening) / (1.0 - opening))
    )
    glottal = np.diff(flow, prepend=0.0) * sample_rate / (40.0 * f0)  # level independent of F0
    noise = rng.standard_normal((2, n))
    gate = np.where(frac < voice.open_quotient, 1.0, 0.4)  # aspiration peaks while the glottis is open
    voicing = np.interp(t, centres, tracks.voicing)
    aspiration = np.interp(t, centres, tracks.aspiration) + voice.breathiness * voicing
    tract_source = glottal * voicing + 0.25 * noise[0] * gate * aspiration
    frication_source = 0.12 * noise[1] * np.interp(t, centres, tracks.frication)

    # Filters, one response per analysis block (block i is centred at i * hop + win / 2).
    block_centres = np.arange(frames) * _HOP + _WIN / 2
    scale = voice.vocal_tract * np.asarray(voice.formant_shift)
    moving = [np.interp(block_centres, centres, tracks.formants[:, k]) * scale[k] for k in range(3)]
    fixed = [np.full(frames, 3500.0 * scale[3]), np.full(frames, 4500.0 * scale[0])]  # F4, F5
    formants = np.stack(moving + fixed, axis=1)
    bandwidths = voice.bandwidth * np.array([60.0, 90.0, 130.0, 180.0, 250.0])
    tract = _all_pole_response(formants, bandwidths, sample_rate)
    # Frication: noise in a band about an octave wide around the constriction's resonance.
    centre = np.interp(block_centres, centres, tracks.noise_hz) * voice.vocal_tract
    bins = np.maximum(np.fft.rfftfreq(_NFFT, 1.0 / sample_rate), 1.0)
    frication = np.exp(-0.5 * (np.log2(bins[None, :] / centre[:, None]) / 0.5) ** 2)

    out = _filter_blocks([(tract_source, tract), (frication_source, frication)], frames)[:n]
    out += rng.normal(0.0, 3e-4 * np.std(out) + 1e-7, n)  # a faint room/microphone noise floor
    return (0.9 * out / max(float(np.abs(out).max()), 1e-6)).astype(np.float32)


def _all_pole_response(centre: np.ndarray, bandwidth: np.ndarray, sample_rate: int) -> np.ndarray:
    """Frequency response [frames, bins] of cascaded two-pole resonators, unit gain at 0 Hz.

    ``centre`` and ``bandwidth`` are [frames, k] (bandwidth may broadcast). The k second-order
    denominators are multiplied into one polynomial per frame and evaluated with one FFT.
    """
    r = np.exp(-np.pi * np.broadcast_to(bandwidth, centre.shape) / sample_rate)
    c = 2.0 * r * np.cos(2.0 * np.pi * centre / sample_rate)
    poly = np.zeros((centre.shape[0], 2 * centre.shape[1] + 1))
    poly[:, 0] = 1.0
    for k in range(centre.shape[1]):
        shifted1 = np.pad(poly[:, :-1], ((0, 0), (1, 0)))
        shifted2 = np.pad(poly[:, :-2], ((0, 0), (2, 0)))
        poly = poly - c[:, k : k + 1] * shifted1 + (r[:, k : k + 1] ** 2) * shifted2
    gain = np.prod(1.0 - c + r * r, axis=1, keepdims=True)
    return gain / np.fft.rfft(poly, _NFFT)


def _filter_blocks(sources: list[tuple[np.ndarray, np.ndarray]], n_frames: int) -> np.ndarray:
    """Sum of (signal, per-frame response) pairs: each signal is cut into Hann-windowed blocks,
    each block filtered by its frame's response and the results overlap-added (exact per block,
    as ``_NFFT`` leaves room for the tails)."""
    window = np.hanning(_WIN + 1)[:-1]  # periodic Hann: sums to 2 at hop WIN/4
    spectrum = 0.0
    for signal, response in sources:
        blocks = np.lib.stride_tricks.sliding_window_view(np.pad(signal, (0, _WIN)), _WIN)
        spectrum = spectrum + np.fft.rfft(blocks[: n_frames * _HOP : _HOP] * window, _NFFT) * response
    per_hop = np.fft.irfft(spectrum, _NFFT).reshape(n_frames, _NFFT // _HOP, _HOP)
    out = np.zeros((n_frames + _NFFT // _HOP, _HOP))
    for k in range(_NFFT // _HOP):
        out[k : k + n_frames] += per_hop[:, k]
    return out.reshape(-1) / 2.0
