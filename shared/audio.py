"""Audio I/O, resampling, and spectra exactly as GPT-SoVITS computes them (32 kHz, n_fft 2048, hop 640).

Files are decoded with soundfile (any format libsndfile reads: wav, flac, ogg, ...; any sample rate;
channels averaged to mono, as ffmpeg's ``-ac 1`` does in GPT-SoVITS's loader) and resampled with
torchaudio's windowed-sinc resampler.

The linear spectrogram pads ``(n_fft - hop) / 2`` samples on each side by reflection and runs the
STFT without centring, so ``frames == samples // hop``: 50 frames per second, two per 25 Hz
semantic token. The mel spectrogram (loss only) is a Slaney-scale, Slaney-normalised filterbank
(librosa's default) over that magnitude, compressed with ``log(max(x, 1e-5))``.
"""

from __future__ import annotations

import io
import os
from functools import lru_cache

import soundfile as sf
import torch
import torchaudio.functional as AF
import torchaudio.transforms as T

from fedvox.shared.errors import DataError

SAMPLE_RATE = 32_000
SSL_SAMPLE_RATE = 16_000
N_FFT = 2048
HOP_LENGTH = 640
WIN_LENGTH = 2048
N_MELS = 128
SPEC_CHANNELS = N_FFT // 2 + 1
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 50
SEMANTIC_RATE = FRAMES_PER_SECOND // 2  # 25 Hz


def read_audio(source: str | os.PathLike[str] | bytes, name: str | None = None) -> tuple[torch.Tensor, int]:
    """Decode ``source`` (a path, or a file's bytes) to a mono float32 waveform ``[samples]`` and its rate.

    The file is only ever opened for reading. Integer formats come back in [-1, 1); float formats
    come back as stored (they may hold NaN, inf or values beyond full scale: callers check).
    ``name`` labels the audio in error messages when ``source`` is bytes.
    """
    label = name or ("<bytes>" if isinstance(source, bytes) else os.fspath(source))
    try:
        stream = io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source)
        with sf.SoundFile(stream, mode="r") as fh:
            data = fh.read(dtype="float32", always_2d=True)
            sample_rate = fh.samplerate
    except sf.LibsndfileError as exc:
        raise DataError(
            f"cannot decode audio {label}: {exc.error_string.rstrip('.')}; "
            "use a format libsndfile reads (wav, flac, ogg)"
        ) from None
    except (RuntimeError, ValueError, TypeError) as exc:
        raise DataError(f"cannot decode audio {label}: {exc}") from None
    return torch.from_numpy(data).mean(dim=1), int(sample_rate)


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Resample a float32 ``wave [..., samples]`` from ``orig_rate`` to ``new_rate`` Hz (band-limited sinc)."""
    if orig_rate == new_rate:
        return wave
    return _resampler(orig_rate, new_rate)(wave)


# The cached constants below are built outside inference mode whatever the caller's mode: a
# process that synthesised first (under torch.inference_mode) would otherwise keep inference
# tensors that a later training step cannot use ("Inference tensors cannot be saved for backward").
@lru_cache(maxsize=16)
@torch.inference_mode(False)
def _resampler(orig_rate: int, new_rate: int) -> T.Resample:
    # Building the sinc kernel costs as much as applying it to a few seconds of audio: keep it.
    return T.Resample(orig_rate, new_rate)


@lru_cache(maxsize=8)
@torch.inference_mode(False)
def _window(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.hann_window(WIN_LENGTH, device=device, dtype=dtype)


@lru_cache(maxsize=8)
@torch.inference_mode(False)
def _mel_basis(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    fbanks = AF.melscale_fbanks(
        n_freqs=SPEC_CHANNELS,
        f_min=0.0,
        f_max=SAMPLE_RATE / 2,
        n_mels=N_MELS,
        sample_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    return fbanks.T.contiguous().to(device=device, dtype=dtype)  # [n_mels, n_freqs]


def linear_spectrogram(wave: torch.Tensor) -> torch.Tensor:
    """Magnitude spectrogram ``[..., 1025, samples // 640]`` of a 32 kHz waveform ``[..., samples]``."""
    lead = wave.shape[:-1]
    flat = wave.reshape(-1, wave.shape[-1]).float()
    pad = (N_FFT - HOP_LENGTH) // 2
    flat = torch.nn.functional.pad(flat.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    spec = torch.stft(
        flat,
        N_FFT,
        hop_length=HOP_LENGTH,
        win_length=WIN_LENGTH,
        window=_window(flat.device, flat.dtype),
        center=False,
        normalized=False,
        onesided=True,
        return_complex=True,
    )
    magnitude = spec.abs().pow(2).add(1e-8).sqrt()
    return magnitude.reshape(*lead, *magnitude.shape[-2:])


def mel_from_linear(spec: torch.Tensor) -> torch.Tensor:
    """Log-mel ``[..., 128, frames]`` from a linear magnitude spectrogram ``[..., 1025, frames]``."""
    basis = _mel_basis(spec.device, spec.dtype)
    return torch.log(torch.clamp(torch.matmul(basis, spec), min=1e-5))


def mel_spectrogram(wave: torch.Tensor) -> torch.Tensor:
    """Log-mel ``[..., 128, samples // 640]`` of a 32 kHz waveform ``[..., samples]``."""
    return mel_from_linear(linear_spectrogram(wave))
