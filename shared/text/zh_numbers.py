"""Chinese verbalisation of digit strings, as GPT-SoVITS's ``zh_normalization/num.py`` reads them.

Cardinals use the 十/百/千/万/亿 units with 零 for skipped places ("1005" -> 一千零五) and drop
a leading 一 before 十 ("12" -> 十二); codes and long numbers without a measure word are read
digit by digit with 幺 for 1.
"""

from __future__ import annotations

DIGITS = "零一二三四五六七八九"
_UNITS = ((8, "亿"), (4, "万"), (3, "千"), (2, "百"), (1, "十"))


def _cardinal_parts(digits: str) -> list[str]:
    """Recursive place-value reading; a zero run inside the number is read as one 零."""
    stripped = digits.lstrip("0")
    if not stripped:
        return []
    if len(stripped) == 1:
        zero = [DIGITS[0]] if len(stripped) < len(digits) else []
        return [*zero, DIGITS[int(stripped)]]
    power, unit = next((p, u) for p, u in _UNITS if p < len(stripped))
    return [*_cardinal_parts(digits[:-power]), unit, *_cardinal_parts(digits[-power:])]


def cardinal(digits: str) -> str:
    """ "1005" -> 一千零五, "10" -> 十, "0" -> 零, "" -> ""."""
    if not digits:
        return ""
    stripped = digits.lstrip("0")
    if not stripped:
        return DIGITS[0]
    parts = _cardinal_parts(stripped)
    if parts[:2] == [DIGITS[1], "十"]:
        parts = parts[1:]
    return "".join(parts)


def digit_by_digit(digits: str, yao: bool = False) -> str:
    """ "2024" -> 二零二四; with ``yao`` 1 is read 幺 (phone numbers, codes)."""
    text = "".join(DIGITS[int(d)] for d in digits)
    return text.replace("一", "幺") if yao else text


def number(value: str) -> str:
    """A non-negative decimal string: "3.5" -> 三点五, ".25" -> 零点二五, "3.20" -> 三点二零.

    Trailing zeros of the fraction collapse to one spoken 零 (GPT-SoVITS's current rule).
    """
    integer, _, fraction = value.partition(".")
    if "." in fraction:
        raise ValueError(f"{value!r} has more than one decimal point")
    text = cardinal(integer)
    fraction = fraction.rstrip("0") + "0" if fraction.endswith("0") else fraction
    if fraction:
        text = (text or DIGITS[0]) + "点" + digit_by_digit(fraction)
    return text
