"""``prepare``: every entry checked with a reason, good ones featurised, sources untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from fedvox.client.cli import main
from fedvox.client.data.cache import FeatureCache
from fedvox.client.data.prepare import prepare
from fedvox.client.data.reasons import FIXES, Reason
from fedvox.shared.audio import read_audio
from fedvox.shared.errors import DataError
from fedvox.shared.semantic import FallbackTokenizer, tokenizer_spec
from tests.data_fixtures import fingerprint, speech, write_bad_set, write_good_set

FALLBACK = tokenizer_spec()
CLIENT = Path(sys.executable).with_name("fedvox-client")
IMPORT_ONLY = {Reason.MISSING_FEATURES, Reason.MISMATCHED_FEATURES, Reason.BAD_SEGMENT}  # import and --slice checks


def run(list_file: Path, out: Path, **kwargs) -> PrepareReport:  # noqa: F821
    options = {"tokenizer": FALLBACK, "symbols_version": "v2", "workers": 1, "show_progress": False}
    return prepare(list_file, out, **(options | kwargs))


@pytest.fixture(scope="module")
def good_set(tmp_path_factory) -> Path:
    return write_good_set(tmp_path_factory.mktemp("good"))


def test_good_set_featurises_deterministically_and_leaves_sources_untouched(good_set, tmp_path):
    before = fingerprint(good_set.parent)
    first = run(good_set, tmp_path / "a")
    run(good_set, tmp_path / "b")
    assert fingerprint(good_set.parent) == before

    assert first.accepted == 6 and not first.rejected
    assert first.languages == {"en": 4, "zh": 2} and first.speakers == {"spkA": 2, "spkB": 2, "spkC": 2}
    assert first.tokenizer == FallbackTokenizer().name
    index_a = (tmp_path / "a" / "index.json").read_bytes()
    assert index_a == (tmp_path / "b" / "index.json").read_bytes()
    items = FeatureCache(tmp_path / "a").read_index().items
    for item in items:
        a = (tmp_path / "a" / "items" / f"{item.id}.safetensors").read_bytes()
        assert a == (tmp_path / "b" / "items" / f"{item.id}.safetensors").read_bytes()

    for item in items:
        tensors = load_file(tmp_path / "a" / "items" / f"{item.id}.safetensors")
        wave, ids, phonemes = tensors["wave"], tensors["semantic_ids"], tensors["phoneme_ids"]
        assert wave.dtype == torch.int16 and wave.numel() == 1280 * ids.numel()
        assert int(ids.min()) >= 0 and int(ids.max()) < 1024 and phonemes.numel() == item.phonemes > 0
        source, rate = read_audio(good_set.parent / item.source)
        assert item.duration_s == pytest.approx(source.numel() / rate, abs=1e-3)
        # at most one token (40 ms) of audio is trimmed; GPT-SoVITS's 50/50 peak mix sets the level
        assert 0 <= item.duration_s - wave.numel() / 32000 < 0.04 + 1e-3
        peak = wave.abs().max().item() / 32768
        assert peak == pytest.approx(0.5 * 0.95 + 0.5 * source.abs().max().item(), abs=0.02)
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["accepted"] == 6 and report["total_duration_s"] == pytest.approx(
        sum(item.duration_s for item in items), abs=1e-3
    )


def test_every_bad_entry_gets_its_reason_and_the_good_ones_pass(tmp_path):
    list_file, expected = write_bad_set(tmp_path / "sources" / "data")
    before = fingerprint(tmp_path / "sources")
    report = run(list_file, tmp_path / "out")
    assert fingerprint(tmp_path / "sources") == before

    got = {r.line: str(r.reason) for r in report.rejected}
    assert got == {line: reason for line, reason in expected.items() if reason != "ok"}
    accepted_lines = [item.line for item in FeatureCache(tmp_path / "out").read_index().items]
    assert accepted_lines == [line for line, reason in expected.items() if reason == "ok"]
    assert set(got.values()) == set(Reason) - {Reason.FEATURE_ERROR, *IMPORT_ONLY}
    summary = (tmp_path / "out" / "report.txt").read_text()
    for reason in set(got.values()):
        assert f"{reason}:" in summary and FIXES[Reason(reason)] in summary
    messages = {r.line: r.message for r in report.rejected}
    assert "same file as line 1" in messages[7] and "same audio as line 1" in messages[8]
    assert messages[4].startswith("line 4: missing.wav")


def test_latin_letters_in_zh_transcripts_are_noted_and_read_in_auto_lines(tmp_path):
    text = "我用iPhone拍照，今天天气很好。"
    for name, seed in (("zh.wav", 1), ("auto.wav", 2)):
        wave, rate = speech(text, "zh", "", seed, source="pseudo")
        sf.write(tmp_path / name, wave, rate)
    (tmp_path / "zh.list").write_text(f"zh.wav|spk|zh|{text}\n", encoding="utf-8")
    (tmp_path / "auto.list").write_text(f"auto.wav|spk|auto|{text}\n", encoding="utf-8")
    zh = run(tmp_path / "zh.list", tmp_path / "zh")
    assert zh.accepted == 1 and any("1 zh/yue transcripts hold Latin letters" in note for note in zh.notes)
    auto = run(tmp_path / "auto.list", tmp_path / "auto")
    assert auto.accepted == 1 and not any("Latin" in note for note in auto.notes)
    phones = {
        out: FeatureCache(tmp_path / out).item_header(FeatureCache(tmp_path / out).read_index().items[0].id)["phones"]
        for out in ("zh", "auto")
    }
    iphone = ["AY1", "F", "OW1", "N"]  # read as English in the auto line only, as GPT-SoVITS's inference reads it
    assert phones["auto"][4:8] == iphone and "AY1" not in phones["zh"]
    assert phones["zh"] == phones["auto"][:4] + phones["auto"][8:]


def test_one_failing_utterance_does_not_stop_the_others(good_set, tmp_path):
    class Flaky:
        name = "flaky-test-tokenizer"

        def __init__(self):
            self.inner, self.calls = FallbackTokenizer(), 0

        def encode(self, wave):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("tokenizer exploded")
            return self.inner.encode(wave)

    class FlakySpec:
        name, hubert = Flaky.name, None

        def build(self):
            return Flaky()

    report = run(good_set, tmp_path / "out", tokenizer=FlakySpec())
    assert report.accepted == 5 and [str(r.reason) for r in report.rejected] == ["feature_error"]
    assert "tokenizer exploded" in report.rejected[0].message


def test_changed_recordings_and_settings_are_featurised_again(good_set, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for path in good_set.parent.iterdir():
        (data / path.name).write_bytes(path.read_bytes())
    list_file = data / good_set.name
    out = tmp_path / "out"
    assert run(list_file, out).featurised == 6

    again = run(list_file, out)
    assert (again.featurised, again.reused, again.stale_removed) == (0, 6, 0)

    wave, rate = sf.read(data / "spkA_0000.wav")
    sf.write(data / "spkA_0000.wav", wave * 0.5, rate, subtype="PCM_16")
    changed = run(list_file, out)
    assert (changed.featurised, changed.reused, changed.stale_removed) == (1, 5, 1)

    v1 = run(list_file, out, symbols_version="v1")
    assert (v1.featurised, v1.reused, v1.stale_removed) == (6, 0, 6)
    index = FeatureCache(out).read_index()
    assert index.settings.symbols_version == "v1"
    assert sorted(p.stem for p in (out / "items").iterdir()) == sorted(item.id for item in index.items)


def test_a_cache_being_written_is_not_written_twice(good_set, tmp_path):
    with FeatureCache(tmp_path / "out").lock(), pytest.raises(DataError, match="another prepare"):
        run(good_set, tmp_path / "out")


def test_list_file_parsing(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    sf.write(data / "a.wav", np.sin(np.arange(16000) / 5).astype(np.float32) * 0.5, 16000)
    os.symlink(tmp_path / "elsewhere.wav", data / "link.wav")
    sf.write(tmp_path / "elsewhere.wav", np.sin(np.arange(16000) / 7).astype(np.float32) * 0.5, 16000)
    (data / "x.list").write_text(
        "\ufeffa.wav|spk|EN|Text with | a bar.\n\n   \nlink.wav|spk|en|Symlink out.\n|spk|en|No path.\n",
        encoding="utf-8",
    )
    report = run(data / "x.list", tmp_path / "out")
    item = FeatureCache(tmp_path / "out").read_index().items[0]
    assert (item.line, item.language, item.source) == (1, "en", "a.wav")
    assert {r.line: str(r.reason) for r in report.rejected} == {4: "path_outside_root", 5: "malformed_line"}
    assert run(data / "x.list", tmp_path / "out2", data_root=tmp_path).accepted == 2


@pytest.mark.slow
def test_command_line_success(good_set, tmp_path):
    """The installed console script, as a device owner runs it."""
    done = subprocess.run(
        [str(CLIENT), "prepare", str(good_set), "--out", str(tmp_path / "ok"), "--model-config", "tiny", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["accepted"] == 6 and "6 accepted" in done.stderr


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["fedvox-client", "prepare", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def test_command_line_failures_exit_non_zero_with_one_clear_line(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.list"
    bad.write_text("nope.wav|s|en|Missing.\nalso/nope.wav|s|en|Missing too.\n", encoding="utf-8")
    code, err = _main(monkeypatch, capsys, str(bad), "--out", str(tmp_path / "none"))
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1
    assert "none of the 2 entries" in errors[0] and "missing_file 2" in errors[0]
    assert not (tmp_path / "none" / "index.json").exists()

    code, err = _main(monkeypatch, capsys, str(tmp_path / "absent.list"), "--out", str(tmp_path / "x"))
    assert code == 2 and "error: list file" in err and "does not exist" in err

    code, err = _main(monkeypatch, capsys, str(bad), "--out", str(tmp_path / "x"), "--hubert", str(tmp_path))
    assert code == 2 and "need both --hubert" in err
