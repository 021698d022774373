"""Pseudo-speech: seeded, text-driven, distinct per voice, speech-like enough to feature."""

import numpy as np
import pytest

from fedvox.shared.errors import ConfigError
from fedvox.simulations.pseudo_speech import SAMPLE_RATE, PseudoVoice, synthesize
from fedvox.simulations.speaker_id import mfcc_statistics, speaker_id_accuracy

EN = [
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It is easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
]
ZH = ["老师，您好！", "今天天气很好。", "我们去公园散步吧。", "他是一位谦虚的学者。"]


def test_sample_rate_is_the_project_rate():
    from fedvox.shared.audio import SAMPLE_RATE as PROJECT_RATE

    assert SAMPLE_RATE == PROJECT_RATE


def test_same_seed_is_bit_identical_and_another_seed_differs():
    voice = PseudoVoice.from_seed(7)
    assert PseudoVoice.from_seed(7) == voice
    a = synthesize(EN[0], "en", voice, seed=3)
    assert a.dtype == np.float32 and a.ndim == 1
    assert np.array_equal(a, synthesize(EN[0], "en", voice, seed=3))
    b = synthesize(EN[0], "en", voice, seed=4)
    assert len(a) != len(b) or not np.array_equal(a, b)
    assert PseudoVoice.from_seed(8) != voice


def test_level_and_duration_follow_the_text():
    voice = PseudoVoice.from_seed(1, sex="female")
    short = synthesize("Hello.", "en", voice, seed=0)
    long = synthesize(" ".join(EN), "en", voice, seed=0)
    assert np.abs(short).max() == pytest.approx(0.9, abs=1e-6)
    assert 0.6 < len(short) / SAMPLE_RATE < 2.0
    assert 6.0 < len(long) / SAMPLE_RATE < 20.0
    zh = synthesize(ZH[2], "zh", voice, seed=0)  # 8 syllables: about 2-3 s
    assert 1.5 < len(zh) / SAMPLE_RATE < 4.0
    assert np.isfinite(long).all()


def test_sex_sets_the_voice_ranges():
    women = [PseudoVoice.from_seed(s, sex="female") for s in range(20)]
    men = [PseudoVoice.from_seed(s, sex="male") for s in range(20)]
    assert min(v.f0_hz for v in women) > max(v.f0_hz for v in men)
    assert min(v.vocal_tract for v in women) > max(v.vocal_tract for v in men)


def test_voices_are_told_apart_by_mfcc_statistics():
    features, labels = [], []
    for speaker in range(6):
        voice = PseudoVoice.from_seed(speaker, sex="female" if speaker % 2 else "male")
        for k, text in enumerate(EN):  # every speaker reads the same sentences
            features.append(mfcc_statistics(synthesize(text, "en", voice, seed=[speaker, k]), SAMPLE_RATE))
            labels.append(f"s{speaker}")
    assert speaker_id_accuracy(np.array(features), labels) >= 0.8  # chance: 1/6


def test_the_speaker_check_is_not_fooled_by_one_voice_under_several_names():
    voice = PseudoVoice.from_seed(11)
    features, labels = [], []
    for k in range(16):
        features.append(mfcc_statistics(synthesize(EN[k // 4], "en", voice, seed=k), SAMPLE_RATE))
        labels.append(f"alias{k % 4}")  # each alias reads every sentence once
    assert speaker_id_accuracy(np.array(features), labels) <= 0.5  # chance: 0.25


def test_the_text_not_the_seed_decides_what_is_said():
    """Two readings of one sentence are closer to each other than to another sentence."""
    voice = PseudoVoice.from_seed(3)

    def envelope(wave):
        frames = np.abs(wave[: len(wave) // 320 * 320]).reshape(-1, 320).mean(axis=1)
        return np.interp(np.linspace(0, 1, 200), np.linspace(0, 1, len(frames)), frames)

    first, again, other = (
        envelope(synthesize(t, "zh", voice, seed=s)) for t, s in ((ZH[1], 0), (ZH[1], 1), (ZH[3], 0))
    )
    assert np.corrcoef(first, again)[0, 1] > np.corrcoef(first, other)[0, 1]


@pytest.mark.parametrize(
    "text, language, message",
    [
        ("hello", "fr", "language"),
        ("123 456", "en", "no speakable"),
        ("", "zh", "no speakable"),
    ],
)
def test_bad_input_is_a_config_error(text, language, message):
    with pytest.raises(ConfigError, match=message):
        synthesize(text, language, PseudoVoice.from_seed(0), seed=0)


def test_unknown_sex_is_refused():
    with pytest.raises(ConfigError, match="sex"):
        PseudoVoice.from_seed(0, sex="robot")
