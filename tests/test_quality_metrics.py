"""Speech-quality metrics on known inputs (simulations.quality).

Voices come from espeak-ng (similarity, MCD, VAD) and flite (WER: pocketsphinx does not
recognise espeak-ng's formant voices, docs/simulation.md); tests skip when a synthesiser is
missing.
"""

import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from fedvox.simulations.quality import (
    activity,
    distortion,
    intelligibility,
    scoring,
    speaker,
)

SENTENCE = "That old lady is my relative and she lives near the river."
OTHER = "It is very hot outside today so take some water with you."


def _speak(tmp_path, tool: str, voice: str, text: str) -> tuple[np.ndarray, int]:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is NOT installed (apt-get install {tool})")
    path = tmp_path / f"{tool}-{voice}-{abs(hash(text))}.wav"
    if tool == "espeak-ng":
        subprocess.run([tool, "-v", voice, "-w", str(path), text], check=True)
    else:
        subprocess.run([tool, "-voice", voice, "-t", text, "-o", str(path)], check=True)
    wave, rate = sf.read(path, dtype="float32")
    return wave, rate


def test_identical_audio_is_the_same_voice_and_a_different_voice_scores_lower(tmp_path):
    a, rate = _speak(tmp_path, "espeak-ng", "en-us+m3", SENTENCE)
    same_voice, _ = _speak(tmp_path, "espeak-ng", "en-us+m3", OTHER)
    other_voice, _ = _speak(tmp_path, "espeak-ng", "en-gb+f4", OTHER)
    e = speaker.embed(a, rate)
    assert speaker.similarity(e, speaker.embed(a.copy(), rate)) == pytest.approx(1.0, abs=1e-5)
    same, other = (
        speaker.similarity(e, speaker.embed(same_voice, rate)),
        speaker.similarity(e, speaker.embed(other_voice, rate)),
    )
    assert same > other + 0.05, (same, other)


def test_mcd_is_zero_for_identical_audio_and_grows_with_a_different_voice(tmp_path):
    a, rate = _speak(tmp_path, "espeak-ng", "en-us+m3", SENTENCE)
    b, _ = _speak(tmp_path, "espeak-ng", "en-gb+f4", SENTENCE)
    assert distortion.mel_cepstral_distortion(a, a.copy(), rate) == pytest.approx(0.0, abs=1e-6)
    slower = distortion.mel_cepstral_distortion(a, np.repeat(a, 2)[::2], rate)  # same samples: still 0
    assert slower == pytest.approx(0.0, abs=1e-6)
    assert distortion.mel_cepstral_distortion(a, b, rate) > 2.0


def test_wer_is_low_for_the_spoken_sentence_and_high_for_a_wrong_one(tmp_path):
    wave, rate = _speak(tmp_path, "flite", "slt", SENTENCE)
    heard = intelligibility.transcribe(wave, rate)
    right, wrong = intelligibility.word_error_rate(SENTENCE, heard), intelligibility.word_error_rate(OTHER, heard)
    assert right <= 0.3 and wrong >= 0.8, (heard, right, wrong)
    assert intelligibility.transcribe(np.zeros(16000, np.float32), 16000) == ""


def test_speech_check_tells_speech_from_a_dc_level_a_tone_and_silence(tmp_path):
    wave, rate = _speak(tmp_path, "espeak-ng", "en-us", SENTENCE)
    speech = activity.check_speech(wave, rate)
    assert speech.is_speech and speech.speech_fraction > 0.6, speech
    dc = activity.check_speech(np.full(rate * 2, 0.3, np.float32), rate)
    assert not dc.is_speech and "distinct" in dc.reason
    silence = activity.check_speech(np.zeros(rate, np.float32), rate)
    assert not silence.is_speech and silence.rms_dbfs == activity.SILENCE_DBFS
    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(rate * 2) / rate)).astype(np.float32)
    assert activity.check_speech(tone, rate).speech_fraction < activity.MIN_SPEECH_FRACTION


def test_cluster_bootstrap_weighs_speakers_equally_and_brackets_the_mean():
    values = {"a#0": 1.0, "a#1": 1.0, "a#2": 1.0, "b#0": 0.0}
    estimate = scoring.cluster_bootstrap(values)
    assert estimate.mean == pytest.approx(0.5) and estimate.speakers == 2 and estimate.items == 4
    assert estimate.low <= 0.5 <= estimate.high
    shifted = scoring.cluster_bootstrap({f"s{k}#0": 0.1 + 0.01 * k for k in range(10)})
    assert shifted.excludes_zero() and 0.1 < shifted.low < shifted.high < 0.2
    lone = scoring.cluster_bootstrap({"a#0": 0.3, "a#1": 0.4})  # one speaker: a zero-width "interval"
    assert lone.low == lone.high and not lone.excludes_zero()
    assert not scoring.cluster_bootstrap({"a#0": 0.3, "b#0": 0.4}).excludes_zero()
    assert scoring.cluster_bootstrap({"a#0": None}) is None
    assert scoring.paired_differences({"a#0": 2.0, "b#0": 1.0}, {"a#0": 0.5, "c#0": 1.0}) == {"a#0": 1.5}
