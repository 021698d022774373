"""Mandarin g2p: GPT-SoVITS's ``chinese.py`` (v1) and ``chinese2.py`` (v2, with g2pW when given
its model, else its pypinyin path).

Per chunk (the text is cut after each punctuation mark): jieba segments with parts of speech,
the sandhi stage regroups words, pypinyin reads each word (its phrase dictionary picks the
reading of polyphones; with g2pW, :mod:`fedvox.shared.text.g2pw` reads the whole chunk), the tone
rules change finals, v2 adds the erhua tone rule, and each syllable becomes an initial and a toned
final through the opencpop-strict table. Every character of ``norm_text`` yields one ``word2ph``
entry: 2 phones per syllable, 1 per punctuation mark.
"""

from __future__ import annotations

import logging
import re
from functools import cache, lru_cache
from importlib import resources

from fedvox.shared.errors import TextError
from fedvox.shared.text.g2pw import G2pw, correct_pronunciation
from fedvox.shared.text.symbols import PUNCTUATION
from fedvox.shared.text.zh_sandhi import apply_sandhi, finals_tone3, merge_words, word_lists

_LATIN = re.compile("[a-zA-Z]+")  # chinese2 drops Latin letters from each chunk
_CHUNK_END = re.compile(r"(?<=[{}])\s*".format(re.escape("".join(PUNCTUATION))))
# pypinyin writes some finals in their full form; the pinyin table uses the spelled form.
_FINAL_SPELLING = {"uei": "ui", "iou": "iu", "uen": "un"}
# Syllables without an initial: pypinyin gives the bare final ("i", "iou", "v"), pinyin spells
# them with y/w ("yi", "you", "yu").
_ZERO_INITIAL = {"ing": "ying", "i": "yi", "in": "yin", "u": "wu"}
_ZERO_INITIAL_LETTER = {"v": "yu", "e": "e", "i": "y", "u": "w"}


@cache
def pinyin_to_phones() -> dict[str, tuple[str, str]]:
    """opencpop-strict: toneless pinyin syllable -> (initial phone, final phone)."""
    text = resources.files("fedvox.shared.text.data").joinpath("opencpop-strict.txt").read_text("utf-8")
    table = {}
    for line in text.splitlines():
        syllable, phones = line.split("\t")
        initial, final = phones.split(" ")
        table[syllable] = (initial, final)
    return table


@cache
def _posseg():
    """jieba's part-of-speech segmenter, loaded once (about a second; jieba caches its
    dictionary in the temp dir)."""
    import jieba
    import jieba.posseg

    logging.getLogger("jieba").setLevel(logging.WARNING)
    jieba.initialize()
    return jieba.posseg


@lru_cache(maxsize=1 << 16)
def _initials(word: str) -> tuple[str, ...]:
    from pypinyin import Style, lazy_pinyin  # loaded on first use: its phrase tables cost 0.2-0.35 s of an import

    return tuple(lazy_pinyin(word, neutral_tone_with_five=True, style=Style.INITIALS))


def _erhua(word: str, pos: str, finals: list[str]) -> list[str]:
    """v2 erhua (``_merge_erhua``): a final 儿 takes the previous syllable's tone; er1 -> er2.

    GPT-SoVITS keeps 儿 as its own syllable (so ``word2ph`` still counts one entry per
    character); only its tone changes.
    """
    lists = word_lists()
    finals = list(finals)
    last = len(finals) - 1
    if last >= 0 and word[last] == "儿" and finals[last] == "er1":
        finals[last] = "er2"
    if word not in lists["must_erhua"] and (word in lists["not_erhua"] or pos in {"a", "j", "nr"}):
        return finals
    if len(finals) != len(word) or last < 1:
        return finals
    if word[last] == "儿" and finals[last] in {"er2", "er5"} and word[-2:] not in lists["not_erhua"]:
        finals[last] = "er" + finals[last - 1][-1]
    return finals


def _syllable_phones(initial: str, final: str, text: str) -> list[str]:
    if initial == final:  # pypinyin passes what it cannot read through unchanged
        if initial in PUNCTUATION:
            return [initial]
        raise TextError(
            f"cannot phonemize {initial!r} in zh text {text!r}: pypinyin has no reading for it; "
            "replace or remove the character",
            reason="unphonemizable_text",
        )
    body, tone = final[:-1], final[-1:]
    if initial:
        syllable = initial + _FINAL_SPELLING.get(body, body)
    elif body in _ZERO_INITIAL:
        syllable = _ZERO_INITIAL[body]
    else:
        syllable = _ZERO_INITIAL_LETTER.get(body[:1], body[:1]) + body[1:]
    phones = pinyin_to_phones().get(syllable)
    if phones is None or not tone or tone not in "12345":
        raise TextError(
            f"cannot phonemize the syllable {initial + final!r} in zh text {text!r}: it is not in "
            "the opencpop pinyin table (e.g. 覅 fiao, 噷 hm have no phones); "
            "replace the character",
            reason="unphonemizable_text",
        )
    return [phones[0], phones[1] + tone]


def g2p(norm_text: str, symbols_version: str, g2pw: G2pw | None = None) -> tuple[list[str], list[int]]:
    """Phones and per-character phone counts of normalised zh text (see module docstring).

    With ``g2pw`` (v2 tables only: v1's ``chinese.py`` never used it) each chunk's syllables are
    g2pW's readings after GPT-SoVITS's correction dictionary, as ``chinese2.py`` with
    ``is_g2pw=True``; the sandhi and erhua rules then run on them as on pypinyin's.
    """
    posseg = _posseg()
    chunks = [_LATIN.sub("", chunk) for chunk in _CHUNK_END.split(norm_text) if chunk.strip()]
    readings = None
    if g2pw is not None and symbols_version != "v1":
        readings = iter(g2pw.pinyins([chunk for chunk in chunks if chunk]))
    phones: list[str] = []
    word2ph: list[int] = []
    for chunk in chunks:
        if not chunk:
            continue
        pinyins = next(readings) if readings is not None else []
        end = 0
        for word, pos in merge_words([(pair.word, pair.flag) for pair in posseg.lcut(chunk)]):
            start, end = end, end + len(word)
            if pos == "eng":
                continue
            if readings is not None:
                initials, finals = _split_pinyins(correct_pronunciation(word, pinyins[start:end]))
            else:
                initials, finals = list(_initials(word)), list(finals_tone3(word))
            finals = apply_sandhi(word, pos, finals)
            if symbols_version != "v1":
                finals = _erhua(word, pos, finals)
            for initial, final in zip(initials, finals, strict=True):
                syllable = _syllable_phones(initial, final, norm_text)
                phones += syllable
                word2ph.append(len(syllable))
    return phones, word2ph


def _split_pinyins(pinyins: list[str]) -> tuple[list[str], list[str]]:
    """Toned pinyin -> initials and ``FINALS_TONE3`` finals (punctuation stays itself in both)."""
    from pypinyin.contrib.tone_convert import to_finals_tone3, to_initials

    initials = [to_initials(pinyin) if pinyin[:1].isalpha() else pinyin for pinyin in pinyins]
    finals = [
        to_finals_tone3(pinyin, neutral_tone_with_five=True) if pinyin[:1].isalpha() else pinyin for pinyin in pinyins
    ]
    return initials, finals
