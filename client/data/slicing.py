"""Long recordings -> utterances: GPT-SoVITS's silence slicer, and segments named by time.

GPT-SoVITS (``tools/slice_audio.py`` with ``tools/slicer2.py``, webui defaults) reads a recording
at 32 kHz, measures its RMS every 10 ms over a centred window (the shorter of the minimum
silence, 300 ms, and four hops), and cuts inside silences (RMS below -34 dBFS) lasting at least
300 ms, once the current clip is at least 4 s long; at most 500 ms of silence stays at each cut
(the quietest frame decides where), and leading/trailing silence longer than that is dropped.
Each clip is then rescaled to ``0.9 * 0.25 * x / peak + 0.75 * x``.

Transcripts cannot be sliced: a user provides one per utterance. ``fedvox-client slice`` writes a
list with one line per slice, ``audio_path#START-END|speaker|language|`` (seconds), whose text
the user fills in; ``prepare --slice`` reads such ``#START-END`` paths (from that template, from
subtitles or from any ASR with timestamps) and cuts them from the source, which is only read.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch

from fedvox.client.data.listfile import read_list
from fedvox.client.data.reasons import Rejection
from fedvox.shared.atomic import atomic_write_text
from fedvox.shared.audio import SAMPLE_RATE, read_audio, resample
from fedvox.shared.errors import DataError

log = logging.getLogger(__name__)

THRESHOLD_DB = -34.0
MIN_LENGTH_MS = 4000
MIN_INTERVAL_MS = 300
HOP_MS = 10
MAX_SILENCE_KEPT_MS = 500
PEAK = 0.9
ALPHA = 0.25

_FRAGMENT = re.compile(r"^(?P<path>.+)#(?P<start>\d+(?:\.\d+)?)-(?P<end>\d+(?:\.\d+)?)$")


@dataclass(frozen=True)
class Segment:
    """``[start_s, end_s)`` of a recording, in seconds."""

    start_s: float
    end_s: float

    def __str__(self) -> str:
        return f"{self.start_s:.3f}-{self.end_s:.3f}"


def split_segment(audio_path: str) -> tuple[str, Segment | None]:
    """``"a.wav#1.5-4.25"`` -> ``("a.wav", Segment(1.5, 4.25))``; a path without one -> ``(path, None)``."""
    match = _FRAGMENT.match(audio_path)
    if not match:
        return audio_path, None
    return match["path"], Segment(float(match["start"]), float(match["end"]))


def cut_segment(wave: torch.Tensor, sample_rate: int, segment: Segment) -> torch.Tensor:
    """The segment of a mono recording at 32 kHz, rescaled as GPT-SoVITS's slicer rescales clips.

    Raises ``ValueError`` for a segment outside the recording or empty.
    """
    audio = resample(wave.float(), sample_rate, SAMPLE_RATE)
    begin, end = round(segment.start_s * SAMPLE_RATE), round(segment.end_s * SAMPLE_RATE)
    if not 0 <= begin < end <= audio.numel() + SAMPLE_RATE // 100:  # 10 ms of rounding slack at the end
        raise ValueError(f"segment {segment} s is outside the recording (0-{audio.numel() / SAMPLE_RATE:.3f} s)")
    return rescale(audio[begin:end])


def rescale(clip: torch.Tensor) -> torch.Tensor:
    """``slice_audio.py``'s per-clip level: peak above 1 first divided out, then ``0.9 * 0.25 * x / peak + 0.75 x``."""
    peak = float(clip.abs().max()) if clip.numel() else 0.0
    if peak == 0.0:
        return clip
    if peak > 1.0:
        clip, peak = clip / peak, 1.0
    return clip / peak * (PEAK * ALPHA) + (1 - ALPHA) * clip


def _rms(samples: np.ndarray, window: int, hop: int) -> np.ndarray:
    """RMS of centred, zero-padded windows every ``hop`` samples (librosa's ``rms``, as upstream)."""
    padded = np.pad(samples, (window // 2, window // 2))
    frames = np.lib.stride_tricks.sliding_window_view(padded, window)[::hop]
    return np.sqrt(np.mean(np.abs(frames) ** 2, axis=-1))


def find_slices(wave32k: torch.Tensor) -> list[Segment]:
    """Where GPT-SoVITS's slicer (webui defaults) cuts a 32 kHz mono recording."""
    samples = wave32k.detach().cpu().float().numpy()
    hop = round(SAMPLE_RATE * HOP_MS / 1000)
    min_interval_samples = SAMPLE_RATE * MIN_INTERVAL_MS / 1000
    min_length = round(SAMPLE_RATE * MIN_LENGTH_MS / 1000 / hop)
    min_interval = round(min_interval_samples / hop)
    kept = round(SAMPLE_RATE * MAX_SILENCE_KEPT_MS / 1000 / hop)
    if samples.shape[0] <= min_length:  # upstream compares samples with a length in hops
        return [Segment(0.0, samples.shape[0] / SAMPLE_RATE)]
    rms = _rms(samples, min(round(min_interval_samples), 4 * hop), hop)
    threshold = 10 ** (THRESHOLD_DB / 20)
    cuts = _silences(rms, threshold, min_length, min_interval, kept)
    frames = rms.shape[0]
    bounds: list[tuple[int, int]] = []
    if not cuts:
        bounds.append((0, frames))
    else:
        if cuts[0][0] > 0:
            bounds.append((0, cuts[0][0]))
        bounds += [(left[1], right[0]) for left, right in pairwise(cuts)]
        if cuts[-1][1] < frames:
            bounds.append((cuts[-1][1], frames))
    total = samples.shape[0]
    return [Segment(a * hop / SAMPLE_RATE, min(b * hop, total) / SAMPLE_RATE) for a, b in bounds]


def _silences(
    rms: np.ndarray, threshold: float, min_length: int, min_interval: int, kept: int
) -> list[tuple[int, int]]:
    """The silent frame ranges to remove, ``[(first, last)]`` in hops (the slicer's decisions)."""

    def quietest(a: int, b: int) -> int:
        return int(rms[a:b].argmin()) + a

    cuts: list[tuple[int, int]] = []
    silence_start: int | None = None
    clip_start = 0
    for i, value in enumerate(rms):
        if value < threshold:
            silence_start = i if silence_start is None else silence_start
            continue
        if silence_start is None:
            continue
        leading = silence_start == 0 and i > kept
        long_enough = i - silence_start >= min_interval and i - clip_start >= min_length
        if not leading and not long_enough:
            silence_start = None
            continue
        length = i - silence_start
        if length <= kept:  # short silence: cut at its quietest frame
            pos = quietest(silence_start, i + 1)
            cuts.append((0, pos) if silence_start == 0 else (pos, pos))
            clip_start = pos
        else:
            left = quietest(silence_start, silence_start + kept + 1)
            right = quietest(i - kept, i + 1)
            if silence_start == 0:
                cuts.append((0, right))
                clip_start = right
            elif length <= 2 * kept:  # medium: keep up to `kept` frames, around the quietest middle
                middle = quietest(i - kept, silence_start + kept + 1)
                cuts.append((min(left, middle), max(right, middle)))
                clip_start = max(right, middle)
            else:  # long: keep `kept` frames on each side
                cuts.append((left, right))
                clip_start = right
        silence_start = None
    frames = rms.shape[0]
    if silence_start is not None and frames - silence_start >= min_interval:
        end = min(frames, silence_start + kept)
        cuts.append((quietest(silence_start, end + 1), frames + 1))
    return cuts


def write_slice_list(list_file: str | os.PathLike[str], out: str | os.PathLike[str]) -> tuple[int, int]:
    """Slice every recording of ``list_file`` and write ``out``: one ``path#START-END|speaker|language|``
    line per slice, its text left for the user to fill in. Returns (recordings, slices).

    Paths are written relative to ``out``'s folder. Unreadable entries are skipped with a warning.
    """
    out = Path(out)
    lines: list[str] = []
    recordings = 0
    for entry in read_list(list_file):
        if isinstance(entry, Rejection):
            log.warning("line %d: skipped (%s)", entry.line, entry.reason)
            continue
        source = Path(entry.audio_path).expanduser()
        source = source if source.is_absolute() else Path(list_file).parent / source
        try:
            wave, rate = read_audio(source)
        except (DataError, OSError):
            log.warning("line %d: skipped (the recording cannot be read or decoded)", entry.line)
            continue
        recordings += 1
        relative = os.path.relpath(os.path.realpath(source), os.path.realpath(out.parent))
        for segment in find_slices(resample(wave, rate, SAMPLE_RATE)):
            lines.append(f"{relative}#{segment}|{entry.speaker}|{entry.language}|")
    atomic_write_text(out, "".join(line + "\n" for line in lines))
    return recordings, len(lines)


__all__ = ["Segment", "cut_segment", "find_slices", "rescale", "split_segment", "write_slice_list"]
