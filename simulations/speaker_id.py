"""How distinct are generated speakers? A nearest-centroid speaker-ID check on MFCC statistics.

A federated simulation is only meaningful if its clients really have different voices. Each
utterance becomes a fixed vector (mean and standard deviation of MFCC 1-19 over its louder
frames); every utterance is then assigned to the nearest speaker centroid (cosine, z-scored
features, leave-one-out), and the accuracy is compared with chance. Speaker pairs whose
centroids are almost parallel are reported as near-duplicates. numpy only, so it runs inside
the generator's worker processes on each utterance as it is made.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.fft import dct

N_MFCC = 19  # MFCC 1..19 (c0, the frame energy, is left out)
FEATURE_SIZE = 2 * N_MFCC
_N_FFT = 1024
_HOP = 320  # 10 ms at 32 kHz
_N_MELS = 40
_F_MAX = 8000.0
_QUIET_SHARE = 0.3  # drop this share of the quietest frames (pauses, closures)


def mfcc_statistics(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mean and standard deviation of MFCC 1-19 over the utterance's louder frames: ``[38]``."""
    wave = np.asarray(wave, dtype=np.float64)
    if len(wave) < _N_FFT:
        wave = np.pad(wave, (0, _N_FFT - len(wave)))
    frames = np.lib.stride_tricks.sliding_window_view(wave, _N_FFT)[::_HOP] * np.hanning(_N_FFT)
    power = np.abs(np.fft.rfft(frames, _N_FFT)) ** 2
    log_mel = np.log(power @ _mel_filterbank(sample_rate).T + 1e-10)
    energy = log_mel.sum(axis=1)
    loud = log_mel[energy >= np.quantile(energy, _QUIET_SHARE)]
    mfcc = dct(loud, type=2, norm="ortho", axis=1)[:, 1 : N_MFCC + 1]
    return np.concatenate([mfcc.mean(axis=0), mfcc.std(axis=0)])


@lru_cache(maxsize=4)
def _mel_filterbank(sample_rate: int) -> np.ndarray:
    """Triangular filters equally spaced on the HTK mel scale, 0 Hz to 8 kHz: ``[40, bins]``."""
    mel = lambda hz: 2595.0 * np.log10(1.0 + hz / 700.0)  # noqa: E731
    edges_hz = 700.0 * (10.0 ** (np.linspace(0.0, mel(_F_MAX), _N_MELS + 2) / 2595.0) - 1.0)
    bins = np.fft.rfftfreq(_N_FFT, 1.0 / sample_rate)
    lower, centre, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling))


def speaker_id_accuracy(features: np.ndarray, speakers: list[str]) -> float:
    """Leave-one-out nearest-centroid accuracy (cosine on z-scored features).

    Each utterance is compared with every speaker's centroid, its own speaker's centroid being
    recomputed without it. Speakers with a single utterance cannot be tested and are skipped.
    """
    z, labels, names = _standardise(features, speakers)
    counts = np.bincount(labels, minlength=len(names)).astype(np.float64)
    sums = np.zeros((len(names), z.shape[1]))
    np.add.at(sums, labels, z)
    testable = counts[labels] > 1
    if not testable.any():
        raise ValueError("speaker-ID check needs at least one speaker with two utterances")
    correct = 0
    for i in np.flatnonzero(testable):
        centroids = sums / counts[:, None]
        centroids[labels[i]] = (sums[labels[i]] - z[i]) / (counts[labels[i]] - 1)
        correct += int(np.argmax(_unit(centroids) @ _unit(z[i])) == labels[i])
    return correct / int(testable.sum())


def similar_speaker_pairs(
    features: np.ndarray, speakers: list[str], threshold: float = 0.95
) -> list[tuple[str, str, float]]:
    """Speaker pairs whose centroids have cosine similarity above ``threshold`` (near-duplicates)."""
    z, labels, names = _standardise(features, speakers)
    centroids = np.stack([z[labels == k].mean(axis=0) for k in range(len(names))])
    similarity = _unit(centroids) @ _unit(centroids).T
    first, second = np.triu_indices(len(names), k=1)
    close = similarity[first, second] > threshold
    return [
        (names[a], names[b], round(float(s), 4))
        for a, b, s in zip(first[close], second[close], similarity[first, second][close], strict=True)
    ]


def _standardise(features: np.ndarray, speakers: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) != len(speakers):
        raise ValueError(f"features {features.shape} do not match {len(speakers)} speaker labels")
    names = sorted(set(speakers))
    labels = np.array([names.index(s) for s in speakers])
    z = (features - features.mean(axis=0)) / (features.std(axis=0) + 1e-8)
    return z, labels, names


def _unit(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)
