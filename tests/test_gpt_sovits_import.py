"""``prepare --from-gpt-sovits``: an experiment folder in GPT-SoVITS's layout (made here from pseudo
speech and random weights in the official formats) imports into the cache with prepare's checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from fedvox.client.data.datasets import S1Dataset, S2Dataset
from fedvox.client.data.gpt_sovits_import import import_experiment
from fedvox.client.data.reasons import Reason
from fedvox.shared.errors import ConfigError
from fedvox.shared.models.config import s2_config
from fedvox.shared.models.interop import random_official_state_dict, write_torch_file
from fedvox.shared.models.s2.checkpoint import load_generator, official_hparams
from fedvox.shared.semantic import tokenizer_spec
from fedvox.shared.text import phonemize

UTTERANCES = [  # name, language, text, seconds
    ("a_0001.wav", "zh", "今天天气很好。", 1.6),
    ("a_0002.wav", "en", "The birch canoe slid on the planks.", 2.0),
    ("a_0003.wav", "zh", "我们去公园散步吧。", 1.8),
]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> dict[str, Path]:
    """logs/<exp>/ as GPT-SoVITS's 1A steps write it, the list it was made from, and the weights."""
    root = tmp_path_factory.mktemp("gsv")
    s2_path = root / "s2G2333k.pth"
    write_torch_file(
        {"weight": random_official_state_dict("s2G_v2", seed=5), "config": official_hparams(s2_config("v2"))}, s2_path
    )
    hubert = root / "chinese-hubert-base"
    hubert.mkdir()
    (hubert / "config.json").write_text("{}")
    (hubert / "model.safetensors").write_bytes(b"stand-in: only hashed to name the tokenizer")
    exp = root / "logs" / "voice"
    for sub in ("3-bert", "4-cnhubert", "5-wav32k", "7-sv_cn"):
        (exp / sub).mkdir(parents=True)
    s2 = load_generator(s2_path)
    g = torch.Generator().manual_seed(0)
    texts, semantic, lines = [], ["item_name\tsemantic_audio"], []
    for name, language, text, seconds in UTTERANCES:
        samples = int(seconds * 32000)
        t = np.arange(samples) / 32000
        wave = 0.4 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
        sf.write(exp / "5-wav32k" / name, wave.astype(np.float32), 32000, subtype="PCM_16")
        ssl = torch.randn(1, 768, samples // 640, generator=g)
        torch.save(ssl, exp / "4-cnhubert" / f"{name}.pt")
        codes = s2.extract_latent(ssl)[0]
        semantic.append(f"{name}\t{' '.join(str(int(c)) for c in codes)}")
        phonemes = phonemize(text, language)
        texts.append(f"{name}\t{' '.join(phonemes.phones)}\t{phonemes.word2ph}\t{phonemes.norm_text}")
        if language == "zh":
            torch.save(torch.randn(1024, len(phonemes.phones), generator=g).half(), exp / "3-bert" / f"{name}.pt")
        torch.save(torch.randn(1, 20480, generator=g), exp / "7-sv_cn" / f"{name}.pt")
        lines.append(f"D:/data/voice/{name}|speaker|{language}|{text}")
    (exp / "2-name2text.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    (exp / "6-name2semantic.tsv").write_text("\n".join(semantic), encoding="utf-8")
    (root / "voice.list").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"exp": exp, "list": root / "voice.list", "s2": s2_path, "hubert": hubert}


def _import(files: dict[str, Path], out: Path, exp: Path | None = None):
    spec = tokenizer_spec(files["hubert"], files["s2"], "cpu")
    return import_experiment(
        files["list"], exp or files["exp"], out, tokenizer=spec, symbols_version="v2", show_progress=False
    )


def test_experiment_imports_with_its_features(experiment, tmp_path) -> None:
    before = {p: p.read_bytes() for p in experiment["exp"].rglob("*") if p.is_file()}
    report = _import(experiment, tmp_path / "cache")
    assert report.accepted == 3 and not report.rejected
    assert {p: p.read_bytes() for p in experiment["exp"].rglob("*") if p.is_file()} == before
    s1, s2 = S1Dataset(tmp_path / "cache"), S2Dataset(tmp_path / "cache")
    for i, (name, language, text, _) in enumerate(UTTERANCES):
        assert s1.items[i].source.endswith(name)
        assert s1[i].phoneme_ids.tolist() == phonemize(text, language).ids
        bert = torch.load(experiment["exp"] / "3-bert" / f"{name}.pt") if language == "zh" else None
        assert (s1[i].bert_features is None) == (bert is None)
        if bert is not None:
            assert torch.equal(s1[i].bert_features, bert.T.float())
        assert torch.equal(s2[i].sv_embedding, torch.load(experiment["exp"] / "7-sv_cn" / f"{name}.pt")[0])
        assert s2[i].spec.shape[-1] == 2 * s2[i].semantic_ids.numel()
    settings = json.loads((tmp_path / "cache" / "index.json").read_text())["settings"]
    assert settings["tokenizer"] == tokenizer_spec(experiment["hubert"], experiment["s2"], "cpu").name


def test_missing_and_mismatched_files_are_rejected_with_reasons(experiment, tmp_path) -> None:
    exp = tmp_path / "voice"
    shutil.copytree(experiment["exp"], exp)
    (exp / "4-cnhubert" / "a_0001.wav.pt").unlink()
    lines = (exp / "6-name2semantic.tsv").read_text().split("\n")
    name, codes = lines[2].split("\t")
    lines[2] = f"{name}\t{' '.join(str((int(c) + 1) % 1024) for c in codes.split())}"
    (exp / "6-name2semantic.tsv").write_text("\n".join(lines))
    torch.save(torch.randn(1024, 3), exp / "3-bert" / "a_0003.wav.pt")
    report = _import(experiment, tmp_path / "cache", exp)
    assert report.accepted == 0
    assert [r.reason for r in report.rejected] == [
        Reason.MISSING_FEATURES,
        Reason.MISMATCHED_FEATURES,
        Reason.MISMATCHED_FEATURES,
    ]
    assert "not what the given s2 makes" in report.rejected[1].message
    assert "3-bert/a_0003.wav.pt has shape [1024, 3]" in report.rejected[2].message


def test_the_tokenizer_weights_are_required(experiment, tmp_path) -> None:
    with pytest.raises(ConfigError, match="needs --hubert and --s2"):
        import_experiment(
            experiment["list"],
            experiment["exp"],
            tmp_path,
            tokenizer=tokenizer_spec(),
            symbols_version="v2",
            show_progress=False,
        )
