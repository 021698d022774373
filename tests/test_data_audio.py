"""shared.audio I/O: any format and rate soundfile reads, channels averaged, band-limited resampling."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from fedvox.shared.audio import read_audio, resample
from fedvox.shared.errors import DataError


def _tone(freq: float, rate: int, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize(
    "fmt, subtype, rate, atol",
    [
        ("WAV", "PCM_16", 22050, 1e-4),
        ("WAV", "FLOAT", 16000, 0.0),
        ("FLAC", "PCM_24", 44100, 1e-6),
        ("OGG", "VORBIS", 48000, 0.05),
    ],
)
def test_formats_and_rates_decode_to_the_samples_written(tmp_path, fmt, subtype, rate, atol):
    wave = _tone(440, rate)
    path = tmp_path / f"tone.{fmt.lower()}"
    sf.write(path, wave, rate, format=fmt, subtype=subtype)
    decoded, got_rate = read_audio(path)
    assert got_rate == rate and decoded.dtype == torch.float32 and decoded.ndim == 1
    assert decoded.numel() == wave.size
    torch.testing.assert_close(decoded, torch.from_numpy(wave), atol=atol, rtol=0)
    from_bytes, _ = read_audio(path.read_bytes(), name="tone")
    assert torch.equal(from_bytes, decoded)


def test_channels_are_averaged_to_mono(tmp_path):
    left, right = _tone(200, 16000), _tone(300, 16000)
    sf.write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    mono, _ = read_audio(tmp_path / "stereo.wav")
    torch.testing.assert_close(mono, torch.from_numpy((left + right) / 2))


def test_undecodable_input_names_the_file_and_the_fix(tmp_path):
    (tmp_path / "noise.wav").write_bytes(b"RIFF not really a wave file")
    with pytest.raises(DataError, match=r"noise\.wav.*wav, flac, ogg"):
        read_audio(tmp_path / "noise.wav")
    with pytest.raises(DataError, match="clip-7"):
        read_audio(b"\x00" * 64, name="clip-7")


@pytest.mark.parametrize("orig, new", [(22050, 32000), (44100, 32000), (32000, 16000), (48000, 32000)])
def test_resampling_keeps_duration_and_pitch(orig, new):
    wave = torch.from_numpy(_tone(440, orig))
    out = resample(wave, orig, new)
    assert out.numel() == int(np.ceil(wave.numel() * new / orig))
    spectrum = torch.fft.rfft(out * torch.hann_window(out.numel()))
    peak_hz = spectrum.abs().argmax().item() * new / out.numel()
    assert abs(peak_hz - 440) < 2
    assert resample(wave, orig, orig) is wave


def test_spectrograms_train_after_synthesis_in_the_same_process():
    """The cached window, mel basis and resampler are built outside inference mode: speaking first
    (synthesis runs under torch.inference_mode) must not break a later training step."""
    from fedvox.shared.audio import mel_spectrogram, resample

    with torch.inference_mode():
        mel_spectrogram(torch.randn(1, 8000, dtype=torch.float64))
        resample(torch.randn(1, 8000), 16000, 24000)
    wave = torch.randn(1, 8000, dtype=torch.float64, requires_grad=True)
    mel_spectrogram(wave).sum().backward()
    wave32 = torch.randn(1, 8000, requires_grad=True)
    resample(wave32, 16000, 24000).sum().backward()
    assert wave.grad is not None and wave32.grad is not None
