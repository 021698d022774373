"""The pretraining corpus: public voices only, never a simulated speaker or a held-out sentence."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from fedvox.simulations.pretrain import corpus
from fedvox.simulations.pretrain.corpus import CorpusConfig, corpus_voices, generate_corpus, plan_corpus
from fedvox.simulations.speakers import SpeakersConfig, _espeak_version, _make_speaker, sentence_pools

needs_engines = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("flite") is None, reason="espeak-ng and flite are not installed"
)


@needs_engines
def test_corpus_voices_are_stock_and_never_a_simulated_speaker():
    stock = _espeak_version()[1] / "voices" / "!v"
    stock_variants = {path.read_text(encoding="utf-8", errors="replace") for path in stock.iterdir()}
    voices = corpus_voices(CorpusConfig())
    assert {v.language for v in voices} == {"en", "zh"} and len(voices) >= 40
    for voice in voices:
        if voice.engine == "espeak-ng":
            assert (stock / voice.voice.split("+")[1]).is_file(), voice.voice  # a file espeak-ng ships
    simulated = [
        _make_speaker(SpeakersConfig(seed=seed), role, i)
        for seed in (0, 1)
        for role in ("client", "unseen")
        for i in range(50)
    ]
    corpus_args = {v.voice for v in voices}
    for speaker in simulated:
        assert f"{speaker.accent}+{speaker.name}" not in corpus_args
        assert speaker.variant not in stock_variants  # a drawn voice, not one the corpus could use


def test_corpus_leaves_out_the_simulations_heldout_sentences():
    lines = plan_corpus(CorpusConfig(utterances=8, valid=2))
    for language in ("en", "zh"):
        heldout = sentence_pools(language, corpus.SIMULATION_SEED)[1]
        texts = " ".join(line.text for line in lines if line.voice.language == language)
        assert heldout and not any(sentence in texts for sentence in heldout)
    train = {line.text for line in lines if line.split == "train"}
    assert not any(line.text in train for line in lines if line.split == "valid")


@needs_engines
def test_corpus_synthesises_every_voice_and_completes_after_an_interruption(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(corpus, "ESPEAK_VARIANTS", ("m3", "f2"))
    monkeypatch.setattr(corpus, "FLITE_VOICES", ("slt",))
    config = CorpusConfig(utterances=2, valid=1, workers=1)
    manifest = generate_corpus(tmp_path, config)
    assert manifest["totals"]["train"]["utterances"] == 5 and manifest["totals"]["valid"]["utterances"] == 5
    wavs = sorted(tmp_path.glob("*/*.wav"))
    assert len(wavs) == 10 and all(w.stat().st_size > 20_000 for w in wavs)
    lines = (tmp_path / "train.list").read_text(encoding="utf-8").splitlines()
    assert all(re.fullmatch(r"[^|]+\.wav\|[a-z0-9-]+\|(en|zh)\|.+", line) for line in lines)

    kept = wavs[1].stat().st_mtime_ns
    wavs[0].unlink()
    (tmp_path / "manifest.json").write_text(f'{{"generator": "{corpus.GENERATOR}", "complete": false}}')
    generate_corpus(tmp_path, config)
    assert wavs[0].is_file() and wavs[1].stat().st_mtime_ns == kept
