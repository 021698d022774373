"""Cantonese: GPT-SoVITS's cantonese.py phones for sentences whose Jyutping we know."""

from __future__ import annotations

import pytest

from fedvox.shared.errors import TextError
from fedvox.shared.text import phonemize
from fedvox.shared.text.symbols import UNK

pytest.importorskip("ToJyutping")


@pytest.mark.parametrize(
    ("text", "norm_text", "phones", "word2ph"),
    [
        ("你好。", "你好.", ["Yn", "Yei5", "Yh", "You2", "."], [2, 2, 1]),
        # ngo5 hai6 hoeng1 gong2 jan4; traditional 係 is simplified first, as upstream's normaliser does
        (
            "我係香港人！",
            "我系香港人!",
            ["Yng", "Yo5", "Yh", "Yai6", "Yh", "Yoeng1", "Yg", "Yong2", "Yj", "Yan4", "!"],
            [2, 2, 2, 2, 2, 1],
        ),
        # numbers are written out (saam1); aai3 splits at the first listed initial "aa"; m4 repeats its initial
        (
            "3個，嗌唔？",
            "三个,嗌唔?",
            ["Ys", "Yaam1", "Yg", "Yo3", ",", "Yaa", "Yi3", "Ym", "Ym4", "?"],
            [2, 2, 1, 2, 2, 1],
        ),
        # quotes become ' and are dropped; "nga" keeps "ng" as its initial
        ("「牙」", "牙", ["Yng", "Yaa4"], [2]),
    ],
)
def test_known_sentences(text: str, norm_text: str, phones: list[str], word2ph: list[int]) -> None:
    result = phonemize(text, "yue")
    assert (result.norm_text, result.phones, result.word2ph, result.language) == (norm_text, phones, word2ph, "yue")
    assert UNK not in result.phones and len(result.ids) == sum(word2ph)


def test_v1_has_no_cantonese() -> None:
    with pytest.raises(TextError, match="v2 symbol table only") as caught:
        phonemize("你好", "yue", "v1")
    assert caught.value.reason == "unsupported_language"
