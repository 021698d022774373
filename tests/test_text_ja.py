"""Japanese: GPT-SoVITS's japanese.py prosody phones for sentences whose readings and accents we know."""

from __future__ import annotations

import pytest

from fedvox.shared.text import phonemize
from fedvox.shared.text.ja import prosody_phones

pytest.importorskip("pyopenjtalk")


def test_espnet_documented_example() -> None:
    # ESPnet's pyopenjtalk_g2p_prosody docstring: こんにちは。 -> ^ k o [ N n i ch i w a $
    assert prosody_phones("こんにちは") == ["^", "k", "o", "[", "N", "n", "i", "ch", "i", "w", "a", "$"]
    result = phonemize("こんにちは。", "ja")
    assert result.phones == ["k", "o", "[", "N", "n", "i", "ch", "i", "w", "a", "."]
    assert result.word2ph is None and result.language == "ja"


def test_accent_question_marks_and_spaces() -> None:
    # 元気 is accented on its first mora (ge]nki); the question is marked by the "？" itself
    assert phonemize("元気ですか？", "ja").phones == ["g", "e", "]", "N", "k", "i", "d", "e", "s", "u", "k", "a", "?"]
    # marks between runs become punctuation phones, spaces vanish; repeated ASCII marks collapse
    # (upstream's normaliser knows only its punctuation phones, so "。。" stays two)
    assert phonemize("はい、 はい!!", "ja").phones == ["h", "a", "]", "i", ",", "h", "a", "]", "i", "!"]
    assert phonemize("はい。。", "ja").phones[-2:] == [".", "."]


def test_accent_phrase_border_is_unk_as_upstream() -> None:
    # "#" is in neither symbol table: GPT-SoVITS's clean_text maps it to UNK, and so do we
    phones = phonemize("今日はいい天気ですね！", "ja").phones
    assert "UNK" in phones and "#" not in phones and phones[-1] == "!"
