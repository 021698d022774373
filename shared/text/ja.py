"""Japanese (ja) text -> GPT-SoVITS phones with prosody marks, as its ``japanese.py`` does.

Normalisation only collapses repeated punctuation. ``％`` is read パーセント and Latin letters
are lower-cased; the text is cut at every character that is not Japanese (kana, kanji, Latin
letters, digits, full-width forms). Each Japanese run goes through OpenJTalk's full-context labels
(pyopenjtalk-plus, whose dictionary ships in the wheel: offline; run without its own reading
corrections, ``use_vanilla``, to stay close to upstream's pyopenjtalk), read as ESPnet's
``pyopenjtalk_g2p_prosody``: the phone of each label (devoiced vowels lower-cased, ``pau`` -> ``_``)
followed by ``#`` at an accent-phrase border, ``]`` where the pitch falls and ``[`` where it rises
(the run's leading ``^`` and final ``$``/``?`` are dropped, as upstream). The cut characters are
kept as phones (``。`` -> ``.``, ``、`` -> ``,`` ...), spaces dropped. Phones outside the symbol
table (``#`` is in neither) become ``UNK`` in :func:`phonemize`, as upstream. No ``word2ph``
and no BERT features for ja, as upstream.
"""

from __future__ import annotations

import contextlib
import io
import re
from functools import cache
from typing import Any

from fedvox.shared.errors import TextError
from fedvox.shared.text.symbols import PUNCTUATION

_JAPANESE = r"A-Za-z\d\u3005\u3040-\u30ff\u4e00-\u9fff\uff11-\uff19\uff21-\uff3a\uff41-\uff5a\uff66-\uff9d"
_JAPANESE_START = re.compile(f"[{_JAPANESE}]")
_NOT_JAPANESE = re.compile(f"[^{_JAPANESE}]")
_REPEATED_PUNCTUATION = re.compile("([{0}])([{0}])+".format("".join(re.escape(p) for p in PUNCTUATION)))
_MARKS = {"：": ",", "；": ",", "，": ",", "。": ".", "！": "!", "？": "?", "\n": ".", "·": ",", "、": ","}

_PHONE = re.compile(r"\-(.*?)\+")
_A1 = re.compile(r"/A:([0-9\-]+)\+")
_A2 = re.compile(r"\+(\d+)\+")
_A3 = re.compile(r"\+(\d+)/")
_E3 = re.compile(r"!(\d+)_")
_F1 = re.compile(r"/F:(\d+)_")
_ABSENT = -50  # ESPnet's value for a feature a label lacks


def normalize(text: str) -> str:
    """GPT-SoVITS ``japanese.text_normalize``: repeated punctuation collapsed to its first mark."""
    return _REPEATED_PUNCTUATION.sub(r"\1", text)


@cache
def _openjtalk() -> Any:
    try:  # its import prints a note about an optional ONNX model we do not use (use_vanilla below)
        with contextlib.redirect_stdout(io.StringIO()):
            import pyopenjtalk
    except ImportError:
        raise TextError(
            "Japanese needs pyopenjtalk-plus (its OpenJTalk dictionary ships in the wheel): pip install 'fedvox[ja]'",
            reason="unsupported_language",
        ) from None
    return pyopenjtalk


def _feature(pattern: re.Pattern[str], label: str) -> int:
    match = pattern.search(label)
    return int(match[1]) if match else _ABSENT


def prosody_phones(text: str) -> list[str]:
    """Phones and prosody marks of one run of Japanese text, ``^`` ... ``$``/``?`` included."""
    openjtalk = _openjtalk()
    # use_vanilla: OpenJTalk's own analysis, without pyopenjtalk-plus's extra reading corrections
    labels = openjtalk.make_label(openjtalk.run_frontend(text, use_vanilla=True))
    phones: list[str] = []
    for n, label in enumerate(labels):
        match = _PHONE.search(label)
        if match is None:  # every OpenJTalk full-context label names its phone
            raise TextError("OpenJTalk returned a label without a phone", reason="unphonemizable_text")
        phone = match[1]
        if phone in "AEIOU":  # devoiced vowels read as plain ones (a substring test, as upstream)
            phone = phone.lower()
        if phone == "sil":
            if n == 0:
                phones.append("^")
            elif _feature(_E3, label) in (0, 1):
                phones.append("$" if _feature(_E3, label) == 0 else "?")
            continue
        if phone == "pau":
            phones.append("_")
            continue
        phones.append(phone)
        a1, a2, a3 = _feature(_A1, label), _feature(_A2, label), _feature(_A3, label)
        a2_next = _feature(_A2, labels[n + 1])
        if a3 == 1 and a2_next == 1 and phone in "aeiouAEIOUNcl":  # accent-phrase border
            phones.append("#")
        elif a1 == 0 and a2_next == a2 + 1 and a2 != _feature(_F1, label):  # pitch falls
            phones.append("]")
        elif a2 == 1 and a2_next == 2:  # pitch rises
            phones.append("[")
    return phones


def g2p(norm_text: str) -> list[str]:
    """Phones of normalised ja text (``japanese.g2p`` with prosody)."""
    text = norm_text.replace("％", "パーセント").lower()
    runs = _NOT_JAPANESE.split(text)
    marks = _NOT_JAPANESE.findall(text)
    phones: list[str] = []
    for i, run in enumerate(runs):
        if _JAPANESE_START.match(run):
            phones += prosody_phones(run)[1:-1]
        if i < len(marks) and marks[i] != " ":
            phones.append(marks[i])
    return [_MARKS.get(phone, phone) for phone in phones]


__all__ = ["g2p", "normalize", "prosody_phones"]
