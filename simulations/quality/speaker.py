"""Speaker similarity: cosine between GE2E d-vectors of resemblyzer's pretrained encoder.

The encoder (3-layer LSTM over 40 mel bands at 16 kHz, trained with the generalised end-to-end
loss on LibriSpeech, VoxCeleb 1 and 2; Wan et al. 2018) ships inside resemblyzer's wheel as
``pretrained.pt``. Its weights are loaded here without importing the ``resemblyzer`` package:
that import pulls in webrtcvad, whose PyPI release needs ``pkg_resources`` (gone from setuptools
81 on). The front end follows resemblyzer's ``embed_utterance``: 1.6 s windows (160 frames) every
77 frames, each embedded and L2-normalised, then averaged and normalised again. Unlike
resemblyzer, leading and trailing silence is cut with an energy threshold, not webrtcvad.

Same speaker, different sentences typically scores 0.75-0.9, different speakers 0.5-0.75;
identical audio scores 1. Synthetic voices and a model trained on them sit outside the
encoder's training data, so only differences between models on the same speakers mean much.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedvox.shared.errors import ConfigError

SAMPLE_RATE = 16_000
N_MELS = 40
WINDOW = 400  # 25 ms
HOP = 160  # 10 ms
PARTIAL_FRAMES = 160  # 1.6 s per partial utterance
PARTIAL_STEP = 77  # frames between partials (resemblyzer's rate of 1.3 per second)
MIN_COVERAGE = 0.75  # a last partial shorter than this share of a window is dropped
TRIM_DB = 40.0  # silence threshold below the peak, at both ends


class GE2EEncoder(nn.Module):
    """The d-vector network: LSTM(40 -> 256, 3 layers) -> linear 256 -> ReLU -> L2 norm."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(N_MELS, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, 256)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(mels)
        embeds = torch.relu(self.linear(hidden[-1]))
        return embeds / embeds.norm(dim=1, keepdim=True).clamp_min(1e-12)


def weights_path() -> Path:
    """resemblyzer's ``pretrained.pt`` in its installed wheel."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("speaker similarity needs resemblyzer's encoder weights: pip install resemblyzer")
    path = Path(next(iter(spec.submodule_search_locations))) / "pretrained.pt"
    if not path.is_file():
        raise ConfigError(f"resemblyzer is installed without its encoder weights ({path}); reinstall it")
    return path


@lru_cache(maxsize=1)
def encoder() -> GE2EEncoder:
    """The pretrained encoder, loaded once per process (CPU, eval mode)."""
    model = GE2EEncoder()
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)["model_state"]
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("similarity_")})
    return model.eval()


def _mel(wave: np.ndarray) -> np.ndarray:
    import librosa

    return (
        librosa.feature.melspectrogram(y=wave, sr=SAMPLE_RATE, n_fft=WINDOW, hop_length=HOP, n_mels=N_MELS)
        .astype(np.float32)
        .T
    )


def prepare(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """16 kHz, silence trimmed at both ends, raised to -30 dBFS when quieter (as resemblyzer)."""
    import librosa

    wave = np.asarray(wave, dtype=np.float32)
    if sample_rate != SAMPLE_RATE:
        wave = librosa.resample(wave, orig_sr=sample_rate, target_sr=SAMPLE_RATE)
    if np.abs(wave).max(initial=0.0) > 0:
        wave, _ = librosa.effects.trim(wave, top_db=TRIM_DB)
    rms = float(np.sqrt(np.mean(wave.astype(np.float64) ** 2))) if wave.size else 0.0
    if 0 < rms < 10 ** (-30 / 20):
        wave = wave * (10 ** (-30 / 20) / rms)
    return wave


@torch.inference_mode()
def embed(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """Unit-norm d-vector ``[256]`` of one utterance (mean of its 1.6 s partials)."""
    wave = prepare(wave, sample_rate)
    n_frames = int(np.ceil((len(wave) + 1) / HOP))
    starts = list(range(0, max(1, n_frames - PARTIAL_FRAMES + PARTIAL_STEP + 1), PARTIAL_STEP))
    if len(starts) > 1 and (len(wave) - starts[-1] * HOP) / (PARTIAL_FRAMES * HOP) < MIN_COVERAGE:
        starts = starts[:-1]
    end = (starts[-1] + PARTIAL_FRAMES) * HOP
    wave = np.pad(wave, (0, max(0, end - len(wave))))
    mel = _mel(wave)
    partials = torch.from_numpy(np.stack([mel[s : s + PARTIAL_FRAMES] for s in starts]))
    mean = encoder()(partials).mean(dim=0).numpy()
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


def centroid(embeddings: list[np.ndarray]) -> np.ndarray:
    """The unit-norm mean of several utterances' d-vectors (a speaker's voice)."""
    mean = np.mean(np.stack(embeddings), axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two unit-norm d-vectors (1: same direction)."""
    return float(np.dot(a, b))


__all__ = ["GE2EEncoder", "centroid", "embed", "encoder", "similarity", "weights_path"]
