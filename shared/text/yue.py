"""Cantonese (yue) text -> GPT-SoVITS v2 phones, as its ``cantonese.py`` does.

Normalisation is the Mandarin number/symbol verbaliser (``zh_normalize``: upstream runs the same
PaddleSpeech ``TextNormalizer``, traditional characters simplified included), then Cantonese's
own punctuation map (quotes and brackets become ``'``, which is then dropped like every character
that is neither CJK nor a punctuation phone; no 嗯/呣 rewrite, no collapsing of repeated marks).
ToJyutping reads each character (its dictionary ships in the wheel: offline); a syllable is split
into GPT-SoVITS's "initial" (the first entry of its ``INITIALS`` list the syllable starts with,
in that list's order, so ``aai`` splits as ``aa`` + ``i``) and the rest, which carries the tone;
both get a ``Y`` prefix to keep them apart from Mandarin phones (``nei5`` -> ``Yn``, ``Yei5``).
Punctuation is one phone. ``word2ph`` counts 2 per syllable and 1 per mark; yue text gets no
BERT features (GPT-SoVITS computes them for zh only).
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from fedvox.shared.errors import TextError
from fedvox.shared.text import zh_normalize
from fedvox.shared.text.symbols import CJK_PUNCTUATION_MAP, PUNCTUATION

INITIALS = (
    "aa",
    "aai",
    "aak",
    "aap",
    "aat",
    "aau",
    "ai",
    "au",
    "ap",
    "at",
    "ak",
    "a",
    "p",
    "b",
    "e",
    "ts",
    "t",
    "dz",
    "d",
    "kw",
    "k",
    "gw",
    "g",
    "f",
    "h",
    "l",
    "m",
    "ng",
    "n",
    "s",
    "y",
    "w",
    "c",
    "z",
    "j",
    "ong",
    "on",
    "ou",
    "oi",
    "ok",
    "o",
    "uk",
    "ung",
    "sp",
    "spl",
    "spn",
    "sil",
)
"""GPT-SoVITS ``cantonese.INITIALS``, in its order (the first prefix match wins). Interop data."""

_PUNCTUATION_MAP = {
    **CJK_PUNCTUATION_MAP,
    "...": "…",
    "$": ".",
    "“": "'",
    "”": "'",
    '"': "'",
    "‘": "'",
    "’": "'",
    "（": "'",
    "）": "'",
    "(": "'",
    ")": "'",
    "《": "'",
    "》": "'",
    "【": "'",
    "】": "'",
    "[": "'",
    "]": "'",
    "—": "-",
    "～": "-",
    "~": "-",
    "「": "'",
    "」": "'",
}
_PUNCTUATION_RE = re.compile("|".join(re.escape(mark) for mark in _PUNCTUATION_MAP))
_NOT_KEPT = re.compile("[^\u4e00-\u9fa5" + re.escape("".join(PUNCTUATION)) + "]+")
_SYLLABLE = re.compile(r"^[a-z]+[1-6]$")


def normalize(text: str) -> str:
    """GPT-SoVITS ``cantonese.text_normalize``: the text whose characters are read."""
    sentences = (zh_normalize.verbalize(sentence) for sentence in zh_normalize.split_sentences(text))
    return "".join(_NOT_KEPT.sub("", _PUNCTUATION_RE.sub(lambda m: _PUNCTUATION_MAP[m[0]], s)) for s in sentences)


@cache
def _jyutping() -> Any:
    try:
        import ToJyutping
    except ImportError:
        raise TextError(
            "Cantonese needs ToJyutping (its dictionary ships in the wheel): pip install 'fedvox[yue]'",
            reason="unsupported_language",
        ) from None
    return ToJyutping


def _split(syllable: str) -> list[str]:
    """``"nei5"`` -> ``["Yn", "Yei5"]``."""
    tone, base = syllable[-1], syllable[:-1]
    initial = next((i for i in INITIALS if base.startswith(i)), None)
    if initial is None:
        raise TextError(f"cannot split the jyutping syllable {syllable!r}", reason="unphonemizable_text")
    if base.startswith("nga"):
        initial = base[:2]
    final = base[len(initial) :] or initial[-1]
    return [f"Y{initial}", f"Y{final}{tone}"]


def g2p(norm_text: str) -> tuple[list[str], list[int]]:
    """Phones and per-character phone counts of normalised yue text."""
    phones: list[str] = []
    word2ph: list[int] = []
    for char, syllable in _jyutping().get_jyutping_list(norm_text):
        if char in PUNCTUATION:
            phones.append(char)
            word2ph.append(1)
            continue
        if syllable is None or not _SYLLABLE.match(syllable):
            raise TextError(f"no Cantonese reading for {char!r}", reason="unphonemizable_text")
        phones += _split(syllable)
        word2ph.append(2)
    return phones, word2ph


__all__ = ["INITIALS", "g2p", "normalize"]
