"""Mandarin frontend: normalisation, tone sandhi, pinyin -> opencpop phones, word2ph.

Expected phones are written from pinyin (CC-CEDICT / pypinyin readings), GPT-SoVITS's sandhi
rules and its opencpop-strict table (e.g. shi -> sh ir, si -> s i0, you -> y ou, yuan -> y van).
"""

import pytest

from fedvox.shared.text import phonemize
from fedvox.shared.text.zh_normalize import normalize
from fedvox.shared.text.zh_numbers import cardinal, digit_by_digit, number
from fedvox.shared.text.zh_sandhi import apply_sandhi, merge_words


def phones(text: str, version: str = "v2") -> list[str]:
    return phonemize(text, "zh", version).phones


@pytest.mark.parametrize(
    "digits, expected",
    [
        ("0", "零"),
        ("10", "十"),
        ("12", "十二"),
        ("110", "一百一十"),
        ("1005", "一千零五"),
        ("1010", "一千零一十"),
        ("10000", "一万"),
        ("100000000", "一亿"),
        ("1000000000000", "一万亿"),
    ],
)
def test_cardinal(digits, expected):
    assert cardinal(digits) == expected


def test_decimals_and_digit_strings():
    assert number("3.5") == "三点五"
    assert number(".25") == "零点二五"
    assert number("3.20") == "三点二零"  # trailing zeros collapse to one spoken 零
    assert number("3.00") == "三点零"
    assert digit_by_digit("110", yao=True) == "幺幺零"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("今天是2024年3月15日。", "今天是二零二四年三月十五日."),
        ("2024-01-15", "二零二四年一月十五日"),
        ("湿度50%，气温-3°C", "湿度百分之五十,气温零下三度"),
        ("价格3.50元", "价格三点五零元"),
        ("我有2个苹果和12个梨", "我有两个苹果和十二个梨"),
        ("1005个", "一千零五个"),
        ("10000元", "一万元"),
        ("编号1005", "编号幺零零五"),  # no measure word: read digit by digit
        ("3/4的人", "四分之三的人"),
        ("电话13812345678", "电话幺三八幺二三四五六七八"),
        ("8:30开会", "八点半开会"),
        ("8:05", "八点零五分"),
        ("8:30-9:15", "八点半至九点十五分"),
        ("5mm和10kg", "五毫米和十千克"),
        ("3+2=5", "三加二等于五"),
        ("版本1.2.3", "版本一点二点三"),
        ("２０２４年", "二零二四年"),
        ("漢語", "汉语"),
        ("OK好的", "好的"),
        ("你好!!!???", "你好!"),
        ("嗯～好……", "恩…好…"),
        ("《书名》：内容；结束", "书名,内容,结束"),
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


def test_sentence_with_punctuation():
    result = phonemize("你好，世界。", "zh")
    assert result.norm_text == "你好,世界."
    assert result.phones == ["n", "i2", "h", "ao3", ",", "sh", "ir4", "j", "ie4", "."]
    assert result.word2ph == [2, 2, 1, 2, 2, 1]


@pytest.mark.parametrize(
    "char, expected",
    [
        ("日", ["r", "ir4"]),
        ("四", ["s", "i04"]),
        ("鱼", ["y", "v2"]),
        ("元", ["y", "van2"]),
        ("有", ["y", "ou3"]),
        ("问", ["w", "en4"]),
        ("为", ["w", "ei4"]),
        ("月", ["y", "ve4"]),
        ("饿", ["EE", "e4"]),
        ("二", ["EE", "er4"]),
    ],
)
def test_pinyin_to_opencpop_phones(char, expected):
    assert phones(char) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("你好", ["n", "i2", "h", "ao3"]),  # 3-3 -> 2-3
        ("展览馆", ["zh", "an2", "l", "an2", "g", "uan3"]),  # (2+1): 2-2-3
        ("纸老虎", ["zh", "ir3", "l", "ao2", "h", "u3"]),  # (1+2): 3-2-3
        ("不怕", ["b", "u2", "p", "a4"]),  # 不 before tone 4 -> bu2
        ("不好", ["b", "u4", "h", "ao3"]),
        ("看不懂", ["k", "an4", "b", "u5", "d", "ong3"]),  # X不Y -> neutral 不
        ("一天", ["y", "i4", "t", "ian1"]),  # 一 before tone 1 -> yi4
        ("一段", ["y", "i2", "d", "uan4"]),  # 一 before tone 4 -> yi2
        ("第一", ["d", "i4", "y", "i1"]),  # ordinal keeps yi1
        ("看一看", ["k", "an4", "y", "i5", "k", "an4"]),
        ("东西", ["d", "ong1", "x", "i5"]),  # neutral-tone word list
        ("我们", ["w", "o3", "m", "en5"]),
    ],
)
def test_tone_sandhi(text, expected):
    assert phones(text) == expected


def test_sandhi_rules_on_finals():
    assert apply_sandhi("不怕", "d", ["u4", "a4"]) == ["u2", "a4"]
    assert apply_sandhi("一零零", "m", ["i1", "ing2", "ing2"]) == ["i1", "ing2", "ing2"]  # digit string
    assert apply_sandhi("奶奶", "n", ["ai3", "ai3"]) == ["ai3", "ai5"]  # reduplicated noun
    assert apply_sandhi("你好", "l", ["i3", "ao3"]) == ["i2", "ao3"]


def test_word_merging_before_sandhi():
    assert merge_words([("听", "v"), ("一", "m"), ("听", "v")]) == [("听一听", "v")]
    assert merge_words([("不", "d"), ("好", "a")]) == [("不好", "a")]
    assert merge_words([("一", "m"), ("天", "q")]) == [("一天", "m")]
    assert merge_words([("很", "d"), ("好", "a")]) == [("很好", "d")]  # third tones join
    # at most three syllables; a word that just joined takes no more
    assert merge_words([("老鼠", "n"), ("很", "d"), ("小", "a")]) == [("老鼠很", "n"), ("小", "a")]
    assert merge_words([("孩", "n"), ("儿", "n")]) == [("孩儿", "n")]


def test_erhua_is_v2_only():
    # v2: a final 儿 takes the previous syllable's tone; v1 keeps pypinyin's er2.
    assert phones("一点儿", "v2") == ["y", "i4", "d", "ian3", "EE", "er3"]
    assert phones("一点儿", "v1") == ["y", "i4", "d", "ian3", "EE", "er2"]
    assert phones("哪儿", "v2") == ["n", "a3", "EE", "er3"]
    assert phones("哪儿", "v1") == ["n", "a3", "EE", "er2"]


def test_pause_marks():
    assert phones("你好￥世界") == ["n", "i2", "h", "ao3", "SP2", "sh", "ir4", "j", "ie4"]
    assert phones("你好^世界")[4] == "SP3"


def test_word2ph_counts_every_character():
    for text in ["我们2024年去了北京，看了3场比赛！", "小孩儿在胡同儿里玩儿。", "他说：“不，一点也不。”"]:
        result = phonemize(text, "zh")
        assert len(result.word2ph) == len(result.norm_text)
        assert sum(result.word2ph) == len(result.phones)
