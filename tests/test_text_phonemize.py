"""phonemize(): the contract (ids, phones, word2ph, norm_text), language codes, errors, coverage."""

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedvox.shared.errors import ConfigError, TextError
from fedvox.shared.text import Phonemes, normalize_language, phonemize, phones_to_ids, symbol_to_id

CORPUS = {
    "zh": [
        "你好，世界！",
        "今天是2024年3月15日，气温-3°C，湿度50%。",
        "我们一起去看一看吧？",
        "这本书一共有1005页，我读了3/4。",
        "请拨打13812345678或者010-12345678。",
        "小孩儿在胡同儿里玩儿，一点儿也不累。",
        "他说：“不，我不想去。”然后走了……",
        "老鼠很小，但是展览馆很大。",
        "版本1.2.3在8:30发布，价格是3.50元。",
        "漢字轉換也可以。",
        "你好￥世界",
        "嗯，好的～",
    ],
    "en": [
        "Hello world.",
        "I read the book, then I will read it again.",
        "In 1995, 50% of users paid $3.50 for 12,345 items.",
        "The 21st century started on January 1st, 2001.",
        "e.g. OpenAI's iPhone app, i.e. USA-made?",
        "Doomscrolling blorptastic kubernetes clusters!",
        "It's 13:30 and -5°C outside; 3/4 of us stayed.",
        "'Quoted' words and hyphen-ated ones - fine.",
        "A",
        "ok",
    ],
}


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("language", ["zh", "en"])
def test_every_phone_is_in_the_symbol_table(language, version):
    table = symbol_to_id(version)
    for text in CORPUS[language]:
        result = phonemize(text, language, version)
        assert result.phones and all(phone in table for phone in result.phones), text
        assert result.ids == phones_to_ids(result.phones, version)
        assert "UNK" not in result.phones, text
        if language == "zh":
            assert len(result.word2ph) == len(result.norm_text)
            assert sum(result.word2ph) == len(result.phones)
        else:
            assert result.word2ph is None


def test_result_is_a_frozen_dataclass():
    result = phonemize("你好", "zh")
    assert isinstance(result, Phonemes)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.ids = []


def test_v1_and_v2_share_ids_for_the_same_phones():
    for language in ("zh", "en"):
        for text in CORPUS[language]:
            v1, v2 = phonemize(text, language, "v1"), phonemize(text, language, "v2")
            if v1.phones == v2.phones:  # zh erhua may differ; same phones must give the same ids
                assert v1.ids == v2.ids


@pytest.mark.parametrize(
    "code, expected",
    [
        ("zh", "zh"),
        ("ZH", "zh"),
        ("EN", "en"),
        ("En", "en"),
        (" en ", "en"),
        ("JP", "ja"),
        ("jp", "ja"),
        ("JA", "ja"),
        ("KO", "ko"),
        ("Ko", "ko"),
        ("YUE", "yue"),
        ("Yue", "yue"),
    ],
)
def test_language_codes(code, expected):
    assert normalize_language(code) == expected


def test_v1_codes_are_accepted():
    assert phonemize("你好", "ZH").phones == phonemize("你好", "zh").phones
    assert phonemize("hello", "EN").phones == phonemize("hello", "en").phones


@pytest.mark.parametrize("language", ["fr", "de", ""])
def test_unsupported_languages(language):
    with pytest.raises(TextError) as info:
        phonemize("こんにちは", language)
    assert info.value.reason == "unsupported_language"
    assert "zh, en, yue, ja, ko" in str(info.value)


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text(text):
    with pytest.raises(TextError) as info:
        phonemize(text, "zh")
    assert info.value.reason == "empty_text"


@pytest.mark.parametrize(
    "text, language, hint",
    [
        ("。！？", "zh", ""),
        ("……", "zh", ""),
        ("Hello world", "zh", "use language 'en'"),
        ("...!?", "en", ""),
        ("你好", "en", "use language 'zh'"),
        ("@#^&*", "en", ""),
    ],
)
def test_text_with_nothing_to_pronounce(text, language, hint):
    with pytest.raises(TextError) as info:
        phonemize(text, language)
    assert info.value.reason == "unphonemizable_text"
    assert hint in str(info.value)


@pytest.mark.parametrize("char", ["覅", "噷", "兙"])  # fiao4, hm, a two-syllable unit character
def test_characters_without_a_table_syllable_are_rejected_not_dropped(char):
    with pytest.raises(TextError) as info:
        phonemize(f"你好{char}", "zh")
    assert info.value.reason == "unphonemizable_text"
    assert char in str(info.value)


def test_unknown_symbols_version():
    with pytest.raises(ConfigError):
        phonemize("你好", "zh", "v3")


def test_deterministic_across_processes():
    texts = CORPUS["zh"][:4] + CORPUS["en"][:4]
    here = [phonemize(t, "zh" if i < 4 else "en").ids for i, t in enumerate(texts)]
    script = (
        "import json,sys; from fedvox.shared.text import phonemize; t=json.loads(sys.argv[1]);"
        "print(json.dumps([phonemize(x, 'zh' if i < 4 else 'en').ids for i, x in enumerate(t)]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(texts)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here
    assert [phonemize(t, "zh" if i < 4 else "en").ids for i, t in enumerate(texts)] == here


def test_throughput_after_warm_up():
    """Heavy resources load once; after that a short sentence takes milliseconds."""
    for language in ("zh", "en"):
        phonemize(CORPUS[language][0], language)
    sentences = [(t, lang) for lang in ("zh", "en") for t in CORPUS[lang]] * 5
    start = time.perf_counter()
    for text, language in sentences:
        phonemize(text, language)
    per_sentence = (time.perf_counter() - start) / len(sentences)
    assert per_sentence < 0.05, f"{per_sentence * 1e3:.1f} ms per sentence"


def test_auto_is_read_run_by_run_not_by_phonemize():
    with pytest.raises(TextError, match="phonemize_mixed") as info:
        phonemize("你好 hello", "auto")
    assert info.value.reason == "unsupported_language"
