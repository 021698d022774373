"""Text -> GPT-SoVITS phonemes: the one entry point of the text frontend.

:func:`phonemize` is GPT-SoVITS's ``clean_text`` followed by ``cleaned_text_to_sequence``:
normalise, g2p, map phones outside the symbol table to ``UNK``, look up ids. zh returns
``word2ph`` (phones per character of ``norm_text``, what per-character BERT features are
repeated by); en returns ``None`` there, as GPT-SoVITS does. Heavy resources (jieba, pypinyin,
CMUdict, wordsegment, the OOV model) load on first use, once per process.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from fedvox.shared.errors import TextError
from fedvox.shared.text import en, en_normalize, ja, ko, yue, zh, zh_normalize
from fedvox.shared.text.g2pw import G2pwSpec
from fedvox.shared.text.symbols import PUNCTUATION, UNK, check_symbols_version, phones_to_ids, symbol_to_id

log = logging.getLogger(__name__)

SUPPORTED_LANGUAGES = ("zh", "en", "yue", "ja", "ko")
GPT_SOVITS_LANGUAGES = ("zh", "en", "ja", "ko", "yue")
_ALIASES = {"jp": "ja"}  # GPT-SoVITS v1 list files write JP
_V2_ONLY = ("yue", "ko")  # their phones exist in the v2 table only
# Pause marks of clean_text's special zh symbols: "￥" -> SP2, "^" -> SP3.
_ZH_PAUSE_MARKS = (("￥", "SP2"), ("^", "SP3"))
_SILENT = frozenset(PUNCTUATION) | {"SP", "SP2", "SP3", ko.SPACE, ko.OTHER}
_MIN_EN_PHONES = 4


@dataclass(frozen=True)
class Phonemes:
    """Phonemized text: ``ids[i]`` is the symbol-table id of ``phones[i]``."""

    ids: list[int]
    phones: list[str]
    word2ph: list[int] | None  # zh and yue: phones per character of norm_text
    norm_text: str
    language: str  # the GPT-SoVITS code the text was read as (BERT features exist for zh only)


def normalize_language(language: str) -> str:
    """GPT-SoVITS language code, v1 spellings included: "ZH" -> "zh", "JP" -> "ja", "Yue" -> "yue"."""
    code = language.strip().lower()
    return _ALIASES.get(code, code)


def _check_language(language: str) -> str:
    code = normalize_language(language)
    if code in SUPPORTED_LANGUAGES:
        return code
    if code in ("auto", "auto_yue"):
        message = f"language {code!r} (mixed-language text) is read run by run: phonemize_mixed, not phonemize"
    else:
        message = (
            f"unknown language code {language!r}: fedvox phonemizes {', '.join(SUPPORTED_LANGUAGES)} "
            "(GPT-SoVITS's codes; v1 list files may write ZH, EN, JP)"
        )
    raise TextError(message, reason="unsupported_language")


def _zh(text: str, symbols_version: str, g2pw: G2pwSpec | None = None) -> tuple[list[str], list[int], str]:
    pause = next(((mark, phone) for mark, phone in _ZH_PAUSE_MARKS if mark in text), None)
    if pause:  # clean_special: the mark is read as a comma, then every comma becomes the pause
        text = text.replace(pause[0], ",")
    norm_text = zh_normalize.normalize(text)
    phones, word2ph = zh.g2p(norm_text, symbols_version, g2pw.build() if g2pw else None)
    if pause:
        phones = [pause[1] if phone == "," else phone for phone in phones]
    return phones, word2ph, norm_text


def _yue(text: str, symbols_version: str) -> tuple[list[str], list[int], str]:
    norm_text = yue.normalize(text)
    phones, word2ph = yue.g2p(norm_text)
    return phones, word2ph, norm_text


def _ja(text: str, symbols_version: str) -> tuple[list[str], None, str]:
    norm_text = ja.normalize(text)
    return ja.g2p(norm_text), None, norm_text


def _ko(text: str, symbols_version: str) -> tuple[list[str], None, str]:
    return ko.g2p(text), None, text  # upstream has no Korean normaliser: norm_text is the text


def _en(text: str, symbols_version: str) -> tuple[list[str], None, str]:
    norm_text = en_normalize.normalize(text)
    phones = en.g2p(norm_text)
    if len(phones) < _MIN_EN_PHONES:  # GPT-SoVITS pads very short English with a leading pause
        phones = [",", *phones]
    return phones, None, norm_text


_READERS = {"en": _en, "yue": _yue, "ja": _ja, "ko": _ko}  # zh also takes the g2pW model


def phonemize(text: str, language: str, symbols_version: str = "v2", g2pw: G2pwSpec | None = None) -> Phonemes:
    """Phoneme ids of ``text`` as GPT-SoVITS's frontend makes them.

    ``language`` is a GPT-SoVITS code (``zh``, ``en``, ``yue``, ``ja``, ``ko``; v1 ``ZH``, ``EN``, ``JP`` accepted);
    ``symbols_version`` is ``v1`` or ``v2`` (v2, v2Pro and v2ProPlus models); ``g2pw`` reads v2
    zh polyphones with GPT-SoVITS's g2pW model (else pypinyin). Raises
    :class:`TextError` with ``reason`` ``empty_text``, ``unsupported_language`` or
    ``unphonemizable_text``, and :class:`ConfigError` for an unknown ``symbols_version``.
    """
    check_symbols_version(symbols_version)
    code = _check_language(language)
    if not text.strip():
        raise TextError("the text is empty: write the transcript of the recording", reason="empty_text")
    result = phonemize_run(text, code, symbols_version, g2pw)
    if is_silent(result):
        hint = ""
        if code == "zh" and re.search("[A-Za-z]", text):
            hint = " (Latin letters are not read in zh text: is it English? use language 'en')"
        elif code == "en" and re.search("[\u4e00-\u9fff]", text):
            hint = " (Chinese characters are not read in en text: use language 'zh')"
        raise TextError(
            f"nothing to pronounce in {code} text {text!r}: after normalisation ({result.norm_text!r}) only "
            f"punctuation is left{hint}; fix the transcript or its language",
            reason="unphonemizable_text",
        )
    return result


def is_silent(phonemes: Phonemes) -> bool:
    """Nothing to pronounce: punctuation and pause phones only."""
    return all(phone in _SILENT for phone in phonemes.phones)


def phonemize_run(text: str, code: str, symbols_version: str, g2pw: G2pwSpec | None = None) -> Phonemes:
    """One run of text in one supported language (its GPT-SoVITS code), read as ``clean_text`` reads it.

    Unlike :func:`phonemize` it accepts a run with nothing to pronounce: a run of mixed-language
    text may be a punctuation mark alone.
    """
    if code in _V2_ONLY and symbols_version == "v1":
        raise TextError(
            f"{code} phones exist in the v2 symbol table only (v2, v2Pro, v2ProPlus models), not in v1",
            reason="unsupported_language",
        )
    word2ph: list[int] | None
    if code == "zh":
        phones, word2ph, norm_text = _zh(text, symbols_version, g2pw)
    else:
        phones, word2ph, norm_text = _READERS[code](text, symbols_version)
    table = symbol_to_id(symbols_version)
    unknown = sorted({phone for phone in phones if phone not in table})
    if unknown:
        log.debug("phones %s are not in the %s table; mapped to UNK", unknown, symbols_version)
        phones = [phone if phone in table else UNK for phone in phones]
    return Phonemes(phones_to_ids(phones, symbols_version), phones, word2ph, norm_text, code)
