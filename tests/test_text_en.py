"""English frontend: normalisation, CMUdict lookup, homographs, OOV prediction, post-processing.

Dictionary phones are CMUdict's (HELLO = HH AH0 L OW1); homograph readings are g2p_en's
homographs.en; the OOV expectations are the predictions of g2p_en 2.1.0's own numpy code.
"""

import pytest

from fedvox.shared.text import phonemize, symbol_to_id
from fedvox.shared.text.en_normalize import normalize
from fedvox.shared.text.en_oov import predict


def phones(text: str) -> list[str]:
    return phonemize(text, "en").phones


@pytest.mark.parametrize(
    "text, expected",
    [
        ("I have 2 cats.", "I have two cats."),
        ("It costs $6.24", "It costs six dollars and twenty-four cents"),
        ("In 1995 and 2005", "In nineteen ninety-five and two thousand five"),
        ("12,345 users", "twelve thousand, three hundred forty-five users"),
        ("1,234 users", "twelve thirty-four users"),  # 1001-2999 are read like years
        ("50% off", "fifty percent off"),
        ("the 21st time", "the twenty-first time"),
        ("3/4 and 1/2", "three fourths and one half"),
        ("at 13:30", "at one thirty p.m."),
        ("run 5km", "run five kilometers"),
        ("3.14", "three point one four"),
        ("It is -5 today", "It is negative five today"),
        ("e.g. this, i.e. that", "for example this, that is that"),
        ("iPhone USA", "i Phone U S A"),
        ("café", "cafe"),
        ("Wait... what?!", "Wait. what?"),
        ("你好。", "."),
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


def test_dictionary_words_keep_stress():
    assert phones("Hello world.") == ["HH", "AH0", "L", "OW1", "W", "ER1", "L", "D", "."]


def test_short_sequences_get_a_leading_pause():
    assert phones("Hi") == [",", "HH", "AY1"]
    assert phones("A") == [",", "EY1"]  # a capital A read alone is the letter
    assert phones("a cat") == ["AH0", "K", "AE1", "T"]  # four phones: no padding


def test_short_unknown_words_are_spelled_out():
    assert phones("qzx") == ["K", "Y", "UW1", "Z", "IY1", "EH1", "K", "S"]
    assert phones("ai") == [",", "EY1", "AY1"]  # removed from the dictionary, as GPT-SoVITS does


def test_homographs_by_context():
    assert phones("I read books.")[:4] == ["AY1", "R", "IY1", "D"]
    record = phones("to record the record")
    assert record[2:8] == ["R", "IH0", "K", "AO1", "R", "D"]  # verb after "to"
    assert record[-5:] == ["R", "EH1", "K", "ER0", "D"]  # noun after "the"


def test_apostrophes_become_pauses():
    assert phones("'hello'") == ["-", "HH", "AH0", "L", "OW1", "-"]


def test_compounds_and_possessives():
    assert phones("doomscrolling") == ["D", "UW1", "M", "S", "K", "R", "OW1", "L", "IH0", "NG"]
    assert phones("fedvox's")[-3:] == ["S", "AH0", "Z"]  # sibilant + 's
    assert phones("chatgpt") == ["CH", "AE1", "T", "JH", "IY1", "P", "IY1", "T", "IY1"]
    assert phones("k-pop") == ["K", "EY1", "P", "AA1", "P"]  # unknown hyphenated word, part by part


@pytest.mark.parametrize(
    "word, expected",
    [
        ("activationist", "AE2 K T IH0 V EY1 SH AH0 N IH0 S T"),
        ("fedvox", "F EH1 D V AA2 K S"),
        ("zuckerberg", "Z AH1 K ER0 B ER0 G"),
        ("o'neill", "OW0 N IY1 L"),
    ],
)
def test_oov_model_matches_g2p_en(word, expected):
    assert " ".join(predict(word)) == expected


def test_oov_words_get_plausible_phones():
    table = symbol_to_id("v2")
    for word in ["Blorptastic", "Quizzaciously", "Snorfle"]:
        result = phones(word)
        assert len(result) >= 4 and all(p in table for p in result)
        assert any(p[-1] in "012" for p in result)  # at least one stressed/unstressed vowel
    assert phones("Blorptastic")[:2] == ["B", "L"]
