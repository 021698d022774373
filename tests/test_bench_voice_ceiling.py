"""bench/voice_ceiling's stage ceilings run on any s2: a perfect s1 and the posterior decode the recording."""

import numpy as np
import soundfile as sf
import torch

from bench.voice_ceiling import stage_waveforms
from fedvox.shared.audio import HOP_LENGTH, SAMPLE_RATE
from fedvox.shared.models.factory import build_model
from fedvox.shared.semantic import FallbackTokenizer
from fedvox.shared.stages import recipe
from fedvox.simulations.quality.scoring import TestItem
from fedvox.simulations.sample import PLAIN


def test_perfect_s1_and_posterior_render_the_recordings_length(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name, seconds in (("a", 1.28), ("b", 0.96)):
        t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        wave = 0.3 * np.sin(2 * np.pi * 180 * t) + 0.01 * rng.standard_normal(t.size)
        sf.write(tmp_path / f"{name}.wav", wave.astype(np.float32), SAMPLE_RATE)
        paths.append(tmp_path / f"{name}.wav")
    item = TestItem("spk000", 0, "en", "Hello there.", paths[0], paths[1], "Good day.", (paths[1],))
    s2 = recipe("s2").voice_model(build_model("s2", "tiny", PLAIN, seed=0)).eval()
    torch.manual_seed(0)

    waves = stage_waveforms(s2, item, FallbackTokenizer(), "v2", seed=0)

    frames = int(1.28 * SAMPLE_RATE) // HOP_LENGTH
    assert set(waves) == {"perfect s1", "s2 posterior"}
    assert waves["s2 posterior"].shape == (frames * HOP_LENGTH,)  # the recording's own frames, decoded
    assert waves["perfect s1"].shape == (frames // 2 * 2 * HOP_LENGTH,)  # its 25 Hz codes, two frames each
    assert all(np.isfinite(w).all() and np.abs(w).max() > 0 for w in waves.values())
