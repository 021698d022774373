"""zh BERT features: GPT-SoVITS's computation on a small random model in the official folder format,
stored by ``prepare --bert`` and read back by the s1 dataset (zeros elsewhere, as upstream)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
import torch

from fedvox.client.data.cache import FeatureCache
from fedvox.client.data.datasets import S1Dataset
from fedvox.client.data.extractors import ExtractorSpecs
from fedvox.client.data.prepare import prepare
from fedvox.shared.bert import BERT_DIM, bert_spec
from fedvox.shared.errors import CheckpointError
from fedvox.shared.semantic import tokenizer_spec
from fedvox.shared.text import phonemize
from fedvox.shared.text.mixed import phonemize_mixed
from tests.data_fixtures import speech, write_good_set
from tests.extractor_fixtures import write_roberta

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def roberta(tmp_path_factory) -> Path:
    return write_roberta(tmp_path_factory.mktemp("models") / "chinese-roberta-wwm-ext-large")


def _official(folder: Path, text: str, word2ph: list[int]) -> torch.Tensor:
    """GPT-SoVITS's ``get_bert_feature`` restated: [1024, phones]."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForMaskedLM.from_pretrained(folder)
    with torch.no_grad():
        res = model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True)
        res = torch.cat(res["hidden_states"][-3:-2], -1)[0].cpu()[1:-1]
    return torch.cat([res[i].repeat(word2ph[i], 1) for i in range(len(word2ph))], dim=0).T


def test_features_equal_gpt_sovits_computation(roberta: Path) -> None:
    phonemes = phonemize("今天天气很好，我们去公园散步吧！", "zh")
    extractor = bert_spec(roberta, "cpu").build()
    features = extractor.features(phonemes.norm_text, phonemes.word2ph)
    assert features.shape == (len(phonemes.ids), BERT_DIM) and features.dtype == torch.float32
    assert torch.equal(features.T, _official(roberta, phonemes.norm_text, phonemes.word2ph))


def test_prepare_stores_them_for_zh_only_and_s1_reads_them(roberta: Path, tmp_path: Path) -> None:
    good = write_good_set(tmp_path / "good", source="pseudo")
    options = {"tokenizer": tokenizer_spec(), "symbols_version": "v2", "workers": 1, "show_progress": False}
    report = prepare(good, tmp_path / "cache", extractors=ExtractorSpecs(bert=bert_spec(roberta, "cpu")), **options)
    assert not any("BERT" in note for note in report.notes)
    dataset = S1Dataset(tmp_path / "cache")
    by_language = {item.language.lower(): dataset[i] for i, item in enumerate(dataset.items)}
    zh = by_language["zh"]
    assert zh.bert_features is not None and zh.bert_features.shape == (len(zh.phoneme_ids), BERT_DIM)
    assert by_language["en"].bert_features is None  # zeros in the batch, as upstream
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["settings"]["bert"].startswith("bert-")

    plain = prepare(good, tmp_path / "plain", **options)
    assert any("zero BERT features" in note for note in plain.notes)
    assert "zero BERT features" in (tmp_path / "plain" / "report.txt").read_text()
    assert all(example.bert_features is None for example in S1Dataset(tmp_path / "plain"))


def test_a_folder_that_is_not_the_model_is_refused(tmp_path: Path, roberta: Path) -> None:
    with pytest.raises(CheckpointError, match="no BERT model folder"):
        bert_spec(tmp_path)
    small = tmp_path / "small"
    small.mkdir()
    (small / "model.safetensors").write_bytes((roberta / "model.safetensors").read_bytes())
    (small / "config.json").write_text(json.dumps({"hidden_size": 768}))
    with pytest.raises(CheckpointError, match="hidden_size 768"):
        bert_spec(small)


def test_prepare_reads_auto_lines_run_by_run_with_bert_for_zh_runs(roberta: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    text = "今天天气很好 because 我们去公园散步吧。"
    wave, rate = speech(text, "zh", "", seed=5, source="pseudo")
    sf.write(folder / "mixed.wav", wave, rate)
    (folder / "mixed.list").write_text(f"mixed.wav|spk|auto|{text}\nmixed.wav|spk|all_zh|{text}\n", encoding="utf-8")
    extractors = ExtractorSpecs(bert=bert_spec(roberta, "cpu"))
    options = {"tokenizer": tokenizer_spec(), "symbols_version": "v2", "workers": 1, "show_progress": False}
    report = prepare(folder / "mixed.list", tmp_path / "cache", extractors=extractors, **options)
    # all_zh is an inference code only: a list line names one language or auto/auto_yue
    assert report.accepted == 1 and [r.reason for r in report.rejected] == ["unsupported_language"]

    runs = phonemize_mixed(text, "auto")
    assert [run.language for run in runs] == ["zh", "en", "zh"]
    dataset = S1Dataset(tmp_path / "cache")
    example = dataset[0]
    assert example.phoneme_ids.tolist() == [i for run in runs for i in run.ids]
    extractor = extractors.bert.build()
    zh_first, en, zh_last = (len(run.ids) for run in runs)
    features = example.bert_features
    assert features is not None and features.shape == (zh_first + en + zh_last, BERT_DIM)
    assert torch.equal(features[:zh_first], extractor.features(runs[0].norm_text, runs[0].word2ph))
    assert not features[zh_first : zh_first + en].any()  # the English run reads zeros, as get_bert_inf
    assert torch.equal(features[zh_first + en :], extractor.features(runs[2].norm_text, runs[2].word2ph))
    header = FeatureCache(tmp_path / "cache").item_header(dataset.items[0].id)
    assert header is not None and header["runs"] == [[run.language, len(run.ids)] for run in runs]
