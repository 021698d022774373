"""English text normalisation as GPT-SoVITS's ``english.text_normalize`` does it.

In GPT-SoVITS's order: full-width sentence marks become ASCII; "1. " list ordinals become
"first, "; arithmetic ("3 + 4"), negative numbers, thousands separators, clock times, measures
("5km"), pounds and dollars, decimals, fractions, ordinals ("21st") and numbers are written out
(inflect's wording, years read in pairs: 1995 -> nineteen ninety-five); accents are stripped,
"%" becomes "percent", everything but letters, spaces and ' . , ? ! - is dropped, "i.e." and
"e.g." are expanded, an upper-case letter inside a word starts a new word ("iPhone" -> "i Phone",
"USA" -> "U S A"), and repeated punctuation collapses to its first mark.

Kept GPT-SoVITS quirks: ; : " and the curly apostrophe are dropped, not mapped (its mapping
table is regex-escaped and never matches), so "don’t" reads as "dont". One deliberate fix: a
negative number keeps the space before it ("is -5" -> "is negative 5", GPT-SoVITS glues it to
the previous word).
"""

from __future__ import annotations

import re
import unicodedata
from functools import cache, partial

from fedvox.shared.text.symbols import PUNCTUATION

_FULL_WIDTH = str.maketrans({"。": ".", "！": "!", "？": "?"})
_UNITS = {
    "m": ("meter", "meters"),
    "km": ("kilometer", "kilometers"),
    "km/h": ("kilometer per hour", "kilometers per hour"),
    "ft": ("feet", "feet"),
    "L": ("liter", "liters"),
    "tbsp": ("tablespoon", "tablespoons"),
    "tsp": ("teaspoon", "teaspoons"),
    "h": ("hour", "hours"),
    "min": ("minute", "minutes"),
    "s": ("second", "seconds"),
    "°C": ("degree celsius", "degrees celsius"),
    "°F": ("degree fahrenheit", "degrees fahrenheit"),
}
_SUPERSCRIPTS = "⁰¹²³⁴⁵⁶⁷⁸⁹ˣʸⁿ"
_OPERAND = rf"((-?)((\d+)(\.\d+)?[{_SUPERSCRIPTS}]*)|(\.\d+[{_SUPERSCRIPTS}]*)|([A-Za-z][{_SUPERSCRIPTS}]*))"
_OPERATORS = {"+": " plus ", "-": " minus ", "×": " times ", "÷": " divided by ", "=": " Equals "}

_LIST_ORDINAL = re.compile(r"\b([0-9]+)\. ")
_ARITHMETIC = re.compile(_OPERAND + r"\s+([\+\-\×÷=])\s+" + _OPERAND)
_NEGATIVE = re.compile(r"(^|\s+)-(\d+)")
_THOUSANDS = re.compile(r"([0-9][0-9\,]+[0-9])")
_TIME = re.compile(r"\b([01]?[0-9]|2[0-3]):([0-5][0-9])\b")
_MEASURE = re.compile(r"\b([0-9]+(\.[0-9]+)?(m|km|km/h|ft|L|tbsp|tsp|h|min|s|°C|°F))\b")
_MONEY = (
    (re.compile(r"£([0-9\.\,]*[0-9]+)"), ("pound", "pounds", "penny", "pence")),
    (re.compile(r"([0-9\.\,]*[0-9]+)£"), ("pound", "pounds", "penny", "pence")),
    (re.compile(r"\$([0-9\.\,]*[0-9]+)"), ("dollar", "dollars", "cent", "cents")),
    (re.compile(r"([(0-9\.\,]*[0-9]+)\$"), ("dollar", "dollars", "cent", "cents")),
)
_DECIMAL = re.compile(r"([0-9]+\.\s*[0-9]+)")
_FRACTION = re.compile(r"([0-9]+/[0-9]+)")
_ORDINAL = re.compile(r"[0-9]+(st|nd|rd|th)")
_NUMBER = re.compile(r"[0-9]+")
_NOT_KEPT = re.compile(r"[^ A-Za-z'.,?!\-]")
_INNER_CAPITAL = re.compile(r"(?<!^)(?<![\s])([A-Z])")
_REPEATED_PUNCTUATION = re.compile(r"([{0}\s])([{0}])+".format("".join(re.escape(p) for p in PUNCTUATION)))


@cache
def _inflect():
    """inflect's number wording; imported only when a text has digits (the import takes ~2 s)."""
    import inflect

    return inflect.engine()


def _list_ordinal(m: re.Match) -> str:
    return _inflect().ordinal(m.group(1)) + ", "


def _arithmetic(m: re.Match) -> str:
    return m.group(1) + _OPERATORS[m.group(8)] + m.group(9)


def _time(m: re.Match) -> str:
    hours, minutes = int(m.group(1)), int(m.group(2))
    period = "a.m." if hours < 12 else "p.m."
    hours = hours - 12 if hours > 12 else hours
    hour_words = _inflect().number_to_words(hours)
    if minutes == 0:
        return f"{hour_words} o'clock {period}"
    return f"{hour_words} {_inflect().number_to_words(minutes)} {period}"


def _measure(m: re.Match) -> str:
    unit = m.group(3)
    singular = m.group(2) is None and int(m.group(1).replace(unit, "").replace(".", "")) == 1
    return m.group(1).replace(unit, " " + _UNITS[unit][0 if singular else 1])


def _money(m: re.Match, units: tuple[str, str, str, str]) -> str:
    """ "$6.24" -> "6 dollars and 24 cents" (numbers are written out later)."""
    one, many, one_cent, many_cents = units
    parts = m.group(1).split(".")
    if len(parts) > 2:
        return m.group(1) + " " + many
    whole = int(parts[0].lstrip("(")) if parts[0].lstrip("(") else 0  # "(5$": the ( is dropped later
    cents = int(parts[1].ljust(2, "0")) if len(parts) > 1 and parts[1] else 0
    whole_text = f"{whole} {one if whole == 1 else many}"
    cents_text = f"{cents} {one_cent if cents == 1 else many_cents}"
    if whole and cents:
        return f"{whole_text} and {cents_text}"
    if whole:
        return whole_text
    if cents:
        return cents_text
    return "zero " + many


def _decimal(m: re.Match) -> str:
    whole, fraction = m.group(1).split(".")
    return whole + " point " + " ".join(fraction)


def _fraction(m: re.Match) -> str:
    """1/2 -> one half, 3/2 -> three halves, 3/4 -> three fourths, 6/1 -> six."""
    numerator, denominator = map(int, m.group(0).split("/"))
    words = _inflect().number_to_words(numerator)
    if denominator == 1:
        return words
    if denominator == 2:
        return f"{words} {'half' if numerator == 1 else 'halves'}"
    ordinal = _inflect().ordinal(_inflect().number_to_words(denominator))
    return f"{words} {ordinal}{'s' if numerator > 1 else ''}"


def _number(m: re.Match) -> str:
    """Years 1001-2999 are read as years: 1995 -> nineteen ninety-five, 2005 -> two thousand five."""
    value = int(m.group(0))
    words = _inflect().number_to_words
    if 1000 < value < 3000:
        if value == 2000:
            return "two thousand"
        if 2000 < value < 2010:
            return "two thousand " + words(value % 100)
        if value % 100 == 0:
            return words(value // 100) + " hundred"
        return words(value, andword="", zero="oh", group=2).replace(", ", " ")
    return words(value, andword="")


def _strip_accents(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")


def normalize(text: str) -> str:
    """GPT-SoVITS ``text_normalize`` for en: the text the English g2p reads."""
    text = text.translate(_FULL_WIDTH)
    text = _LIST_ORDINAL.sub(_list_ordinal, text)
    while _ARITHMETIC.search(text):
        text = _ARITHMETIC.sub(_arithmetic, text)
    text = _NEGATIVE.sub(r"\1negative \2", text)
    text = _THOUSANDS.sub(lambda m: m.group(1).replace(",", ""), text)
    text = _TIME.sub(_time, text)
    text = _MEASURE.sub(_measure, text)
    for pattern, units in _MONEY:
        text = pattern.sub(partial(_money, units=units), text)
    text = _DECIMAL.sub(_decimal, text)
    text = _FRACTION.sub(_fraction, text)
    text = _ORDINAL.sub(lambda m: _inflect().number_to_words(m.group(0)), text)
    text = _NUMBER.sub(_number, text)
    text = _strip_accents(text)
    text = text.replace("%", " percent")
    text = _NOT_KEPT.sub("", text)
    text = re.sub(r"(?i)i\.e\.", "that is", text)
    text = re.sub(r"(?i)e\.g\.", "for example", text)
    text = _INNER_CAPITAL.sub(r" \1", text)
    return _REPEATED_PUNCTUATION.sub(r"\1", text)
