"""Mel-cepstral distortion (MCD) after dynamic time warping, in dB.

Both utterances are cut to their voiced span, turned into mel cepstra (c1-c24 of the DCT of
the natural-log amplitude over 40 mel bands, 16 kHz, 25 ms windows every 5 ms; c0, the energy,
is left out), aligned by DTW on Euclidean frame distance, and the distortion is averaged over the
aligned path: ``MCD = 10 / ln 10 * sqrt(2 * sum_d (c_d - c'_d)^2)``. 0 for identical audio.

Limits: cepstra come from a mel filterbank (MFCC-style), not SPTK's all-pass mel-cepstrum, so
values are comparable between fedvox runs but not with published MCD figures; DTW forgives
timing, so MCD measures spectral envelope (voice and phones), not rhythm.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.fft import dct

SAMPLE_RATE = 16_000
N_MELS = 40
N_CEPSTRA = 24
WINDOW = 400
HOP = 80
TRIM_DB = 40.0
_SCALE = 10.0 / math.log(10.0) * math.sqrt(2.0)


def mel_cepstrum(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mel cepstra c1..c24 per frame, ``[frames, 24]``, of the utterance's voiced span."""
    import librosa

    wave = np.asarray(wave, dtype=np.float32)
    if sample_rate != SAMPLE_RATE:
        wave = librosa.resample(wave, orig_sr=sample_rate, target_sr=SAMPLE_RATE)
    if np.abs(wave).max(initial=0.0) > 0:
        wave, _ = librosa.effects.trim(wave, top_db=TRIM_DB)
    mel = librosa.feature.melspectrogram(y=wave, sr=SAMPLE_RATE, n_fft=WINDOW, hop_length=HOP, n_mels=N_MELS, power=1.0)
    log_mel = np.log(np.maximum(mel, 1e-5))
    return dct(log_mel, type=2, norm="ortho", axis=0)[1 : N_CEPSTRA + 1].T


def mel_cepstral_distortion(
    wave: np.ndarray, reference: np.ndarray, sample_rate: int, reference_rate: int | None = None
) -> float:
    """MCD in dB between ``wave`` and ``reference`` (the same sentence), DTW-aligned."""
    import librosa

    a = mel_cepstrum(wave, sample_rate)
    b = mel_cepstrum(reference, reference_rate or sample_rate)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("mel-cepstral distortion needs two non-empty utterances")
    _, path = librosa.sequence.dtw(X=a.T, Y=b.T, metric="euclidean")
    diff = a[path[:, 0]] - b[path[:, 1]]
    return float(np.mean(_SCALE * np.sqrt(np.sum(diff**2, axis=1))))


__all__ = ["mel_cepstral_distortion", "mel_cepstrum"]
