"""Long recordings: GPT-SoVITS's slicer decisions, the slice list, and ``prepare --slice``."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from fedvox.client.cli import app
from fedvox.client.data.prepare import prepare
from fedvox.client.data.reasons import Reason
from fedvox.client.data.slicing import Segment, cut_segment, find_slices, rescale, split_segment, write_slice_list
from fedvox.shared.semantic import tokenizer_spec

RATE = 32000


def _tone(seconds: float, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * (150 + 50 * rng.random()) * t) + 0.01 * rng.standard_normal(t.size)).astype(
        np.float32
    )


def _recording(*parts: tuple[str, float]) -> torch.Tensor:
    return torch.from_numpy(
        np.concatenate(
            [
                _tone(s, i) if kind == "speech" else np.zeros(int(s * RATE), np.float32)
                for i, (kind, s) in enumerate(parts)
            ]
        )
    )


def test_cuts_only_long_silences_after_long_enough_clips() -> None:
    wave = _recording(
        ("speech", 5.0),
        ("silence", 1.0),
        ("speech", 5.0),
        ("silence", 0.2),
        ("speech", 2.0),
        ("silence", 0.4),
        ("speech", 3.0),
    )
    slices = find_slices(wave)
    # 1 s silence after 5 s: cut, at most 0.5 s of silence kept on each side; the 0.2 s pause is
    # too short; the 0.4 s pause comes 7.2 s into the clip, so it is cut too
    assert len(slices) == 3
    first, second, third = slices
    assert first.start_s == 0.0 and 5.0 <= first.end_s <= 5.5
    assert 5.4 <= second.start_s <= 6.0 and 13.1 <= second.end_s <= 13.7
    assert 13.1 <= third.start_s <= 13.7 and third.end_s == pytest.approx(wave.numel() / RATE)
    assert all(a.end_s <= b.start_s for a, b in pairwise(slices))


def test_short_clips_are_not_cut_and_long_leading_silence_is_dropped() -> None:
    assert len(find_slices(_recording(("speech", 2.0), ("silence", 1.0), ("speech", 2.0)))) == 1
    lead = find_slices(_recording(("silence", 3.0), ("speech", 5.0)))
    assert len(lead) == 1 and 2.4 <= lead[0].start_s < 3.0


def test_segments_and_levels() -> None:
    assert split_segment("dir/a#b.wav#1.5-4.25") == ("dir/a#b.wav", Segment(1.5, 4.25))
    assert split_segment("dir/a.wav") == ("dir/a.wav", None)
    clip = torch.tensor([0.5, -0.25])
    assert torch.allclose(rescale(clip), clip / 0.5 * 0.9 * 0.25 + 0.75 * clip)
    assert float(rescale(torch.tensor([2.0, -1.0])).abs().max()) == pytest.approx(0.9 * 0.25 + 0.75)
    wave = torch.arange(16000.0) / 16000
    part = cut_segment(wave, 16000, Segment(0.25, 0.5))
    assert part.numel() == 8000
    with pytest.raises(ValueError, match="outside the recording"):
        cut_segment(wave, 16000, Segment(0.5, 2.0))


def test_slice_list_then_prepare_slice(tmp_path: Path) -> None:
    wave = _recording(("speech", 4.5), ("silence", 0.8), ("speech", 4.2))
    sf.write(tmp_path / "long.wav", wave.numpy(), RATE, subtype="PCM_16")
    before = (tmp_path / "long.wav").read_bytes()
    (tmp_path / "long.list").write_text("long.wav|spk|en|\n")
    assert write_slice_list(tmp_path / "long.list", tmp_path / "slices.list") == (1, 2)
    lines = (tmp_path / "slices.list").read_text().splitlines()
    assert all(line.startswith("long.wav#") and line.endswith("|spk|en|") for line in lines)
    texts = ["The birch canoe slid on the planks.", "Glue the sheet to the blue card."]
    lines = [line + text for line, text in zip(lines, texts, strict=True)] + ["long.wav#9.000-12.000|spk|en|Too late."]
    (tmp_path / "slices.list").write_text("\n".join(lines) + "\n")
    options = {"tokenizer": tokenizer_spec(), "symbols_version": "v2", "workers": 1, "show_progress": False}
    report = prepare(tmp_path / "slices.list", tmp_path / "cache", slicing=True, **options)
    assert report.accepted == 2 and [r.reason for r in report.rejected] == [Reason.BAD_SEGMENT]
    assert 4.0 < report.total_duration_s < 10.0
    assert (tmp_path / "long.wav").read_bytes() == before
    plain = prepare(tmp_path / "slices.list", tmp_path / "plain", **options)  # '#' read literally
    assert plain.accepted == 0 and {r.reason for r in plain.rejected} == {Reason.MISSING_FILE}


def test_slice_command(tmp_path: Path) -> None:
    sf.write(tmp_path / "long.wav", _recording(("speech", 4.5), ("silence", 0.8), ("speech", 4.2)).numpy(), RATE)
    (tmp_path / "long.list").write_text("long.wav|spk|zh|\n")
    result = CliRunner().invoke(app, ["slice", str(tmp_path / "long.list"), "--out", str(tmp_path / "s.list")])
    assert result.exit_code == 0, result.output
    assert "1 recordings, 2 slices" in result.output and len((tmp_path / "s.list").read_text().splitlines()) == 2
