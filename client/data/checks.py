"""Checks on a decoded recording: is it a usable utterance for GPT-SoVITS training?

Run on the samples as stored (before resampling, which would smear NaN and overshoot at clipped
edges). Each failed check raises :class:`Rejected` with its reason code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedvox.client.data.reasons import Reason, Rejected


@dataclass(frozen=True)
class AudioLimits:
    """Acceptance thresholds; the defaults are GPT-SoVITS's duration window and common practice."""

    min_duration_s: float = 0.6  # GPT-SoVITS's s2 loader drops clips outside (0.6 s, 54 s)
    max_duration_s: float = 54.0
    silence_dbfs: float = -60.0  # the loudest 20 ms frame quieter than this means silence
    clip_level: float = 0.999  # a sample this close to full scale counts as clipped ...
    max_clipped_fraction: float = 0.001  # ... and more than 0.1 % clipped samples reject a clip


def check_audio(wave: torch.Tensor, sample_rate: int, limits: AudioLimits, where: str) -> float:
    """Check a mono waveform ``[samples]``; returns its duration in seconds."""
    if wave.numel() == 0:
        raise Rejected(Reason.EMPTY_AUDIO, f"{where}: the recording has no samples")
    finite = torch.isfinite(wave)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise Rejected(Reason.NON_FINITE_SAMPLES, f"{where}: {bad} samples are NaN or infinite")
    duration = wave.numel() / sample_rate
    if duration <= limits.min_duration_s:
        raise Rejected(Reason.TOO_SHORT, f"{where}: {duration:.2f} s is not longer than {limits.min_duration_s} s")
    if duration >= limits.max_duration_s:
        raise Rejected(Reason.TOO_LONG, f"{where}: {duration:.1f} s is not shorter than {limits.max_duration_s} s")
    loudest = _loudest_frame_dbfs(wave, sample_rate)
    if loudest < limits.silence_dbfs:
        raise Rejected(
            Reason.SILENT_AUDIO,
            f"{where}: the loudest 20 ms is {loudest:.1f} dBFS, below {limits.silence_dbfs} dBFS",
        )
    clipped = float((wave.abs() >= limits.clip_level).float().mean())
    if clipped > limits.max_clipped_fraction:
        raise Rejected(
            Reason.CLIPPED_AUDIO,
            f"{where}: {clipped:.2%} of samples are at full scale (more than {limits.max_clipped_fraction:.2%})",
        )
    return duration


def _loudest_frame_dbfs(wave: torch.Tensor, sample_rate: int) -> float:
    frame = max(1, sample_rate // 50)
    usable = wave[: wave.numel() // frame * frame] if wave.numel() >= frame else wave
    rms = usable.double().reshape(-1, min(frame, usable.numel())).pow(2).mean(dim=1).sqrt()
    peak = float(rms.max())
    return 20 * math.log10(peak) if peak > 0 else -math.inf
