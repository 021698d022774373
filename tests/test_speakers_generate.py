"""``fedvox-sim speakers``: layout, list files, determinism, distinctness, fallback, refusals."""

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from fedvox.shared.errors import ConfigError
from fedvox.simulations.cli import app, main
from fedvox.simulations.speakers import (
    MIN_UTTERANCES,
    SpeakersConfig,
    _espeak,
    _make_speaker,
    _prepare_espeak_data,
    _Utterance,
    generate_speakers,
    utterance_counts,
)

HAS_ESPEAK = shutil.which("espeak-ng") is not None
needs_espeak = pytest.mark.skipif(
    not HAS_ESPEAK,
    reason="espeak-ng is NOT installed: espeak-ng speaker tests skipped (apt-get install espeak-ng)",
)
SMALL = SpeakersConfig(n_speakers=4, utterances=3, language="mix", seed=5, heldout_utterances=1, unseen_speakers=1)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _read_list(path: Path) -> list[tuple[str, str, str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert all(line.count("|") == 3 for line in lines), path
    return [tuple(line.split("|")) for line in lines]


@pytest.fixture(scope="module")
def espeak_set(tmp_path_factory):
    if not HAS_ESPEAK:
        pytest.skip("espeak-ng is NOT installed (apt-get install espeak-ng)")
    out = tmp_path_factory.mktemp("espeak") / "speakers"
    manifest = generate_speakers(out, SpeakersConfig(**{**SMALL.__dict__, "workers": 2}))
    return out, manifest


@needs_espeak
def test_layout_lists_and_audio_follow_the_contract(espeak_set):
    out, manifest = espeak_set
    assert manifest["complete"] and manifest["engine"]["name"] == "espeak-ng"
    assert manifest["engine"]["fallback"] is False and manifest["engine"]["version"]
    assert sorted(p.name for p in out.iterdir()) == [
        "clients",
        "heldout_seen.list",
        "heldout_unseen.list",
        "manifest.json",
        "train.list",
        "unseen",
    ]
    speakers = {s["name"]: s for s in manifest["speakers"]}
    assert [s["role"] for s in speakers.values()] == ["client"] * 4 + ["unseen"]
    assert {s["language"] for s in speakers.values()} == {"en", "zh"}
    for speaker in speakers.values():
        folder = out / speaker["folder"]
        splits = ["train", "heldout"] if speaker["role"] == "client" else ["heldout"]
        assert sorted(p.name for p in folder.glob("*.list")) == sorted(f"{s}.list" for s in splits)
        for split in splits:
            rows = _read_list(folder / f"{split}.list")
            assert len(rows) == speaker[split]["utterances"] == (3 if split == "train" else 1)
            for path, name, language, text in rows:
                assert name == speaker["name"] and language == speaker["language"] and text
                info = sf.info(folder / path)  # relative to the list's own folder
                assert (info.samplerate, info.channels, info.subtype) == (32000, 1, "PCM_16")
                assert 0.6 <= info.duration <= 12.0
                if language == "zh":
                    assert not any(c.isascii() and c.isalpha() for c in text)  # characters, not pinyin
    top = {name: _read_list(out / f"{name}.list") for name in ("train", "heldout_seen", "heldout_unseen")}
    assert [len(top[name]) for name in ("train", "heldout_seen", "heldout_unseen")] == [12, 4, 1]
    assert all((out / path).is_file() for rows in top.values() for path, *_ in rows)
    train_texts = {text for *_, text in top["train"]}
    assert not train_texts & {text for *_, text in top["heldout_seen"] + top["heldout_unseen"]}
    assert manifest["totals"]["bytes"] == sum(p.stat().st_size for p in out.rglob("*.wav"))
    assert "language variant" not in speakers["spk000"]["voice"]["variant_file"]  # see the 349 test


@needs_espeak
def test_same_seed_gives_identical_files_whatever_the_workers_and_another_seed_differs(espeak_set, tmp_path):
    out, _ = espeak_set
    again = tmp_path / "again"
    generate_speakers(again, SpeakersConfig(**{**SMALL.__dict__, "workers": 1}))
    assert _files(again) == _files(out)
    other = tmp_path / "other"
    generate_speakers(other, SpeakersConfig(**{**SMALL.__dict__, "seed": 6, "workers": 1}))
    first, second = _files(out), _files(other)
    assert first.keys() == second.keys()
    assert all(first[k] != second[k] for k in first if k.endswith(".wav"))
    assert first["train.list"] != second["train.list"]


@needs_espeak
def test_espeak_speakers_are_distinct(espeak_set):
    out, manifest = espeak_set
    check = manifest["speaker_check"]
    assert check["speakers"] == 5 and check["accuracy"] >= 0.75 > 3 * check["chance"]
    pitch = {s["name"]: int(s["voice"]["variant_file"].split("pitch ")[1].split()[0]) for s in manifest["speakers"]}
    f0 = {name: _median_f0(out, name, manifest) for name in ("spk000", "spk001")}  # a man and a woman
    assert f0["spk001"] > 1.3 * f0["spk000"]
    assert abs(f0["spk000"] / pitch["spk000"] - 1) < 0.6


def _median_f0(out: Path, name: str, manifest: dict) -> float:
    """Autocorrelation F0 of the louder 40 ms frames, 60-400 Hz."""
    folder = next(out / s["folder"] for s in manifest["speakers"] if s["name"] == name)
    estimates = []
    for wav in folder.glob("*.wav"):
        wave, rate = sf.read(wav)
        frames = wave[: len(wave) // 1280 * 1280].reshape(-1, 1280)
        for frame in frames[np.abs(frames).mean(axis=1) > 0.1]:
            ac = np.correlate(frame, frame, "full")[1279:]
            lag = np.argmax(ac[rate // 400 : rate // 60]) + rate // 400
            estimates.append(rate / lag)
    return float(np.median(estimates))


@needs_espeak
def test_more_speakers_than_espeaks_349_voice_list_still_load(tmp_path):
    """Variant files without a "language" line stay out of espeak-ng's capped voice list."""
    config = SpeakersConfig(n_speakers=400, language="en")
    speakers = [_make_speaker(config, "client", i) for i in (0, 399)]
    speakers += [_make_speaker(config, "client", i) for i in range(1, 399)]
    _prepare_espeak_data(tmp_path / "espeak", speakers)
    first, last = speakers[0], speakers[1]
    text = "The birch canoe slid on the smooth planks."
    plain = _espeak(
        _Utterance(dataclasses.replace(last, name="none"), "train", "x.wav", text, (0,)), str(tmp_path / "espeak")
    )
    waves = [_espeak(_Utterance(s, "train", "x.wav", text, (0,)), str(tmp_path / "espeak")) for s in (first, last)]
    assert all(len(w) > 32000 for w in waves)
    assert not np.array_equal(waves[0], waves[1])
    assert len(plain) != len(waves[1]) or not np.array_equal(plain, waves[1])  # the variant was applied


def test_zipf_counts_are_unequal_with_the_minimum_and_the_total_kept():
    counts = utterance_counts(20, 10, 1.5, np.random.default_rng(0))
    assert sum(counts) == 200 and min(counts) >= MIN_UTTERANCES
    assert max(counts) >= 5 * min(counts)
    assert counts == utterance_counts(20, 10, 1.5, np.random.default_rng(0))
    assert counts != utterance_counts(20, 10, 1.5, np.random.default_rng(1))
    assert utterance_counts(5, 7, 0.0, np.random.default_rng(0)) == [7] * 5
    assert sorted(utterance_counts(3, MIN_UTTERANCES, 3.0, np.random.default_rng(0))) == [MIN_UTTERANCES] * 3


def test_without_espeak_it_falls_back_to_pseudo_speech_and_says_so(tmp_path, monkeypatch, caplog):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    out = tmp_path / "out"
    config = SpeakersConfig(
        n_speakers=3, utterances=4, language="mix", zipf=2.0, heldout_utterances=1, unseen_speakers=0, workers=1
    )
    manifest = generate_speakers(out, config)
    assert manifest["engine"] == {"name": "pseudo-speech", "fallback": True, "reason": "espeak-ng not found on PATH"}
    assert "FALLING BACK TO PSEUDO-SPEECH" in caplog.text
    counts = [s["train"]["utterances"] for s in manifest["speakers"]]
    assert sum(counts) == 12 and min(counts) >= MIN_UTTERANCES and len(set(counts)) > 1
    for speaker in manifest["speakers"]:
        rows = _read_list(out / speaker["train"]["list"])
        assert len(rows) == speaker["train"]["utterances"]
        assert "pseudo_speech" in speaker["voice"]
        assert all(sf.info(out / speaker["folder"] / path).samplerate == 32000 for path, *_ in rows)
    with pytest.raises(ConfigError, match="not on PATH"):
        generate_speakers(tmp_path / "strict", SpeakersConfig(n_speakers=1, utterances=1, engine="espeak-ng"))
    assert not (tmp_path / "strict").exists()


def test_refuses_a_foreign_folder_and_replaces_only_its_own_output(tmp_path):
    foreign = tmp_path / "recordings"
    foreign.mkdir()
    (foreign / "me.wav").write_bytes(b"precious")
    with pytest.raises(ConfigError, match="not empty"):
        generate_speakers(foreign, SpeakersConfig(n_speakers=1, utterances=1, engine="pseudo-speech"))
    assert _files(foreign) == {"me.wav": b"precious"}

    out = tmp_path / "sim"
    tiny = SpeakersConfig(
        n_speakers=2, utterances=2, heldout_utterances=1, unseen_speakers=1, engine="pseudo-speech", workers=1
    )
    generate_speakers(out, tiny)
    (out / "notes.txt").write_text("mine")
    generate_speakers(out, SpeakersConfig(**{**tiny.__dict__, "n_speakers": 1, "unseen_speakers": 0}))
    assert sorted(p.name for p in (out / "clients").iterdir()) == ["spk000"]
    assert not (out / "unseen").exists() and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recordings", "sim"]  # nothing written elsewhere
    assert not (out / ".espeak").exists()


@pytest.mark.parametrize(
    "change, option",
    [
        ({"n_speakers": 0}, r"speakers n must be in \[1, 1000\] \(the clients; --speakers of fedvox-sim run\), got 0"),
        ({"utterances": 0}, r"speakers utterances must be in \[1, 2000\]"),
        ({"language": "fr"}, r"speakers lang must be one of en, zh, mix, got 'fr'"),
        ({"zipf": -1.0}, r"speakers zipf must be in \[0, 5\]"),
        ({"zipf": 1.0, "utterances": 2}, "utterances must be >= 3 with zipf"),
        ({"seed": -1}, "speakers seed must be >= 0"),
        ({"heldout_utterances": 0, "unseen_speakers": 1}, "unseen-speakers needs heldout-utterances >= 1"),
        ({"engine": "say"}, "speakers engine must be one of"),
        ({"workers": 0}, "speakers workers must be >= 1"),
    ],
)
def test_bad_options_are_one_config_error_naming_the_option(change, option, tmp_path):
    with pytest.raises(ConfigError, match=option):
        generate_speakers(tmp_path / "x", SpeakersConfig(**{**SpeakersConfig().__dict__, **change}))
    assert not (tmp_path / "x").exists()


def test_cli_generates_and_reports(tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        app,
        [
            "speakers",
            "--n",
            "2",
            "--utterances",
            "2",
            "--out",
            str(out),
            "--lang",
            "en",
            "--unseen-speakers",
            "1",
            "--heldout-utterances",
            "1",
            "--engine",
            "pseudo-speech",
            "--workers",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "2 clients + 1 unseen speakers, 7 utterances" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["language"] == "en" and manifest["totals"]["utterances"] == 7


def test_cli_bad_option_is_one_red_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["fedvox-sim", "speakers", "--out", str(tmp_path / "o"), "--lang", "fr"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--lang" in err and len(err.splitlines()) == 1


def test_every_sentence_phonemizes_and_every_line_parses_in_the_data_pipeline(tmp_path):
    """The transcripts must survive the client's own frontend: no utterance lost to text errors."""
    from fedvox.client.data.listfile import Entry, read_list
    from fedvox.shared.text import phonemize
    from fedvox.simulations.speakers import _sentences

    for language in ("en", "zh"):
        for sentence in _sentences(language):
            assert phonemize(sentence, language, "v2").ids, sentence
    out = tmp_path / "out"
    generate_speakers(
        out,
        SpeakersConfig(
            n_speakers=2, utterances=2, heldout_utterances=1, unseen_speakers=1, engine="pseudo-speech", workers=1
        ),
    )
    for list_file in [*out.glob("*.list"), *out.glob("*/*/*.list")]:
        assert all(isinstance(entry, Entry) for entry in read_list(list_file)), list_file
