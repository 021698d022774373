"""Is it speech? Voice-activity share by silero-vad, and the checks a sample must pass.

silero-vad (MIT) ships its model inside its wheel; it scores 32 ms windows at 16 kHz and
``get_speech_timestamps`` merges them into speech segments. The *speech fraction* is the
segments' total length over the waveform's. A constant (DC) or near-silent waveform is rejected
before the VAD runs: it has too few distinct sample values or no energy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

SAMPLE_RATE = 16_000
MIN_SPEECH_FRACTION = 0.5  # "speech over most of its length"
MIN_RMS_DBFS = -50.0
SILENCE_DBFS = -120.0  # the level reported for digital silence (finite, for JSON)
MIN_DISTINCT_VALUES = 256  # 16-bit samples; a DC level or a few-value square wave has far fewer


@lru_cache(maxsize=1)
def _model():
    import warnings

    from silero_vad import load_silero_vad

    with warnings.catch_warnings():  # torch deprecates torch.jit.load, which silero-vad's loader uses
        warnings.simplefilter("ignore", FutureWarning)
        return load_silero_vad()


def speech_fraction(wave: np.ndarray, sample_rate: int) -> float:
    """Share of the waveform's length that silero-vad marks as speech (0..1)."""
    import librosa
    from silero_vad import get_speech_timestamps

    wave = np.asarray(wave, dtype=np.float32)
    if sample_rate != SAMPLE_RATE:
        wave = librosa.resample(wave, orig_sr=sample_rate, target_sr=SAMPLE_RATE)
    if len(wave) == 0:
        return 0.0
    segments = get_speech_timestamps(torch.from_numpy(wave), _model(), sampling_rate=SAMPLE_RATE)
    return float(sum(s["end"] - s["start"] for s in segments) / len(wave))


@dataclass(frozen=True)
class SpeechCheck:
    """What was measured on a waveform, and whether it counts as speech."""

    seconds: float
    rms_dbfs: float
    distinct_values: int
    speech_fraction: float

    @property
    def is_speech(self) -> bool:
        return (
            self.rms_dbfs >= MIN_RMS_DBFS
            and self.distinct_values >= MIN_DISTINCT_VALUES
            and self.speech_fraction >= MIN_SPEECH_FRACTION
        )

    @property
    def reason(self) -> str:
        """Why it is not speech (empty when it is)."""
        if self.distinct_values < MIN_DISTINCT_VALUES:
            return f"only {self.distinct_values} distinct 16-bit sample values (a DC level or a buzz)"
        if self.rms_dbfs < MIN_RMS_DBFS:
            return f"level {self.rms_dbfs:.0f} dBFS (near silence)"
        if self.speech_fraction < MIN_SPEECH_FRACTION:
            return f"speech detected over {self.speech_fraction:.0%} of its length"
        return ""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "is-speech": self.is_speech, "reason": self.reason}


def check_speech(wave: np.ndarray, sample_rate: int) -> SpeechCheck:
    """Measure a waveform: level, distinct 16-bit values, and silero-vad's speech fraction."""
    wave = np.asarray(wave, dtype=np.float32)
    rms = float(np.sqrt(np.mean(wave.astype(np.float64) ** 2))) if wave.size else 0.0
    distinct = int(np.unique(np.round(np.clip(wave, -1, 1) * 32767).astype(np.int16)).size)
    silent = rms == 0.0 or distinct < MIN_DISTINCT_VALUES
    return SpeechCheck(
        seconds=len(wave) / sample_rate,
        rms_dbfs=max(20 * float(np.log10(rms)), SILENCE_DBFS) if rms > 0 else SILENCE_DBFS,
        distinct_values=distinct,
        speech_fraction=0.0 if silent else speech_fraction(wave, sample_rate),
    )


__all__ = ["MIN_SPEECH_FRACTION", "SpeechCheck", "check_speech", "speech_fraction"]
