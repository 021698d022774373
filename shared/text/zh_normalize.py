"""Mandarin text normalisation as GPT-SoVITS's ``chinese2.text_normalize`` does it.

Numbers, dates, times, percentages, fractions, temperatures, units, phone numbers and arithmetic
are written out in characters (the rules of PaddleSpeech's ``zh_normalization`` in the order
GPT-SoVITS applies them), then punctuation is mapped onto the six punctuation phones and
everything that is neither a CJK character nor one of them is dropped. The result is the
``norm_text`` whose characters ``word2ph`` counts.

Deliberate differences from GPT-SoVITS, each a bug there (see docs/text.md): units are written
out only right after a number and longest first ("5mm" -> 五毫米, not 五米米; the letter "s" in
an English word is not turned into 秒); the second half of a time range says 半 only for its
own ":30"; 摄氏度 is kept (GPT-SoVITS compares the wrong regex group and always says 度);
traditional characters are simplified with OpenCC's phrase-aware table instead of a character
table.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from functools import cache

from fedvox.shared.text import zh_numbers as num
from fedvox.shared.text.symbols import CJK_PUNCTUATION_MAP, PUNCTUATION

_SENTENCE_END = re.compile(r"([：、，；。？！,;?!][”’]?)")
_SPLIT_DROP = re.compile(r"[—《》【】<>{}()（）#&@“”^_|\\]")
_FINAL_DROP = re.compile(r"[-—《》【】<=>{}()（）#&@“”^_|\\]")

# Full-width ASCII letters and digits -> half-width; the ideographic space -> space.
_FULL_TO_HALF = {**{ord(c) + 0xFEE0: ord(c) for c in string.ascii_letters + string.digits}, 0x3000: ord(" ")}

_NUM = r"(-?)((\d+)(\.\d+)?)"  # signed integer or decimal, the shape of RE_NUMBER's first branch
_NUM_GROUP = rf"({_NUM})"
_SUPERSCRIPTS = "⁰¹²³⁴⁵⁶⁷⁸⁹ˣʸⁿ"
_POWER_DIGITS = dict(zip(_SUPERSCRIPTS, "0123456789xyn", strict=True))
_OPERAND = (  # a number, a bare decimal or a letter, each with optional superscripts
    rf"((-?)((\d+)(\.\d+)?[{_SUPERSCRIPTS}]*)|(\.\d+[{_SUPERSCRIPTS}]*)|([A-Za-z][{_SUPERSCRIPTS}]*))"
)
_OPERATORS = {"+": "加", "-": "减", "×": "乘", "÷": "除", "=": "等于"}
_UNIT_WORDS = {
    "cm2": "平方厘米",
    "cm²": "平方厘米",
    "cm3": "立方厘米",
    "cm³": "立方厘米",
    "cm": "厘米",
    "db": "分贝",
    "ds": "毫秒",
    "kg": "千克",
    "km": "千米",
    "m2": "平方米",
    "m²": "平方米",
    "m³": "立方米",
    "m3": "立方米",
    "ml": "毫升",
    "mm": "毫米",
    "m": "米",
    "s": "秒",
}
_RANGE_UNITS = r"(%|°C|℃|度|摄氏度|cm2|cm²|cm3|cm³|cm|db|ds|kg|km|m2|m²|m³|m3|ml|m|mm|s)"
# Measure words after which a number is a count (cardinal, 2 -> 两), not a code read digit by digit.
_MEASURE_WORDS = (
    "处台架枚趟幅平方堵间床株批项例列篇栋注亩封艘把目套段人所朵匹张座回场尾条个首阙阵网炮顶丘棵只支"
    "袭辆挑担颗壳窠曲墙群腔砣客贯扎捆刀令打手罗坡山岭江溪钟队单双对出口头脚板跳枝件贴针线管名位身堂"
    "课本页家户层丝毫厘分钱两斤铢石钧锱忽寸尺丈里寻常铺程米撮勺合升斗盘碗碟叠桶笼盆盒杯斛锅簋篮罐瓶"
    "壶卮盏箩箱煲啖袋钵年月日季刻时周天秒旬纪岁世更夜春夏秋冬代伏辈丸泡粒幢堆根道面片块元亿万千百吨"
    "角毛"
)
_MEASURE = rf"(小时|公分|微克|微米|美元|十吨|[{_MEASURE_WORDS}])"
_GREEK = {
    "α": "阿尔法",
    "β": "贝塔",
    "γ": "伽玛",
    "Γ": "伽玛",
    "δ": "德尔塔",
    "Δ": "德尔塔",
    "ε": "艾普西龙",
    "ζ": "捷塔",
    "η": "依塔",
    "θ": "西塔",
    "Θ": "西塔",
    "ι": "艾欧塔",
    "κ": "喀帕",
    "λ": "拉姆达",
    "Λ": "拉姆达",
    "μ": "缪",
    "ν": "拗",
    "ξ": "克西",
    "Ξ": "克西",
    "ο": "欧米克伦",
    "π": "派",
    "Π": "派",
    "ρ": "肉",
    "ς": "西格玛",
    "Σ": "西格玛",
    "σ": "西格玛",
    "τ": "套",
    "υ": "宇普西龙",
    "φ": "服艾",
    "Φ": "服艾",
    "χ": "器",
    "ψ": "普赛",
    "Ψ": "普赛",
    "ω": "欧米伽",
    "Ω": "欧米伽",
}
_SYMBOL_WORDS = {
    "/": "每",
    **dict(zip("①②③④⑤⑥⑦⑧⑨⑩", "一二三四五六七八九十", strict=True)),
    **_GREEK,
    "+": "加",
    "-": "减",
    "×": "乘",
    "÷": "除",
    "=": "等",
}
# chinese2.rep_map: sentence punctuation -> the punctuation phones.
_PUNCTUATION_MAP = {
    **CJK_PUNCTUATION_MAP,
    "...": "…",
    "$": ".",
    "/": ",",
    "—": "-",
    "~": "…",
    "～": "…",
}
_PUNCTUATION_RE = re.compile("|".join(re.escape(p) for p in _PUNCTUATION_MAP))
_NOT_KEPT = re.compile(r"[^\u4e00-\u9fa5" + re.escape("".join(PUNCTUATION)) + "]+")
_PUNCTUATION_CLASS = "[" + re.escape("".join(PUNCTUATION)) + "]"
_REPEATED_PUNCTUATION = re.compile(f"({_PUNCTUATION_CLASS}){_PUNCTUATION_CLASS}+")


def _signed(sign: str, text: str, word: str = "负") -> str:
    return (word if sign else "") + text


def _date(m: re.Match) -> str:
    year, month, day, suffix = m.group(1), m.group(3), m.group(5), m.group(9)
    text = num.digit_by_digit(year) + "年"
    if month:
        text += num.cardinal(month) + "月"
    if day:
        text += num.cardinal(day) + suffix
    return text


def _iso_date(m: re.Match) -> str:
    return f"{num.digit_by_digit(m.group(1))}年{num.cardinal(m.group(3))}月{num.cardinal(m.group(4))}日"


def _clock_minutes(value: str) -> str:
    """Minutes and seconds keep a spoken leading zero: "05" -> 零五."""
    return ("零" if value.startswith("0") else "") + num.number(value.lstrip("0"))


def _clock(hour: str, minute: str, second: str | None) -> str:
    text = num.number(hour) + "点"
    if minute.lstrip("0"):
        text += "半" if int(minute) == 30 else _clock_minutes(minute) + "分"
    if second and second.lstrip("0"):
        text += _clock_minutes(second) + "秒"
    return text


def _time(m: re.Match) -> str:
    return _clock(m.group(1), m.group(2), m.group(4))


def _time_range(m: re.Match) -> str:
    return _clock(m.group(1), m.group(2), m.group(4)) + "至" + _clock(m.group(6), m.group(7), m.group(9))


def _temperature(m: re.Match) -> str:
    unit = "摄氏度" if m.group(4) == "摄氏度" else "度"
    return _signed(m.group(1), num.number(m.group(2)), "零下") + unit


def _arithmetic(m: re.Match) -> str:
    return m.group(1) + _OPERATORS[m.group(8)] + m.group(9)


def _power(m: re.Match) -> str:
    return "的" + "".join(_POWER_DIGITS[c] for c in m.group(0)) + "次方"


def _fraction(m: re.Match) -> str:
    return _signed(m.group(1), f"{num.number(m.group(3))}分之{num.number(m.group(2))}")


def _percentage(m: re.Match) -> str:
    return _signed(m.group(1), "百分之" + num.number(m.group(2)))


def _phone(m: re.Match) -> str:
    """Mobile numbers split on spaces, landlines on dashes; each part digit by digit with 幺."""
    text = m.group(0)
    parts = text.strip("+").split() if "-" not in text else text.split("-")
    return "，".join(num.digit_by_digit(part, yao=True) for part in parts)


def _plain_number(m: re.Match) -> str:
    if m.group(5):  # ".5"
        return num.number(m.group(5))
    return _signed(m.group(1), num.number(m.group(2)))


_NUMBER_RE = re.compile(_NUM + r"|(\.(\d+))")


def _range(m: re.Match) -> str:
    return _NUMBER_RE.sub(_plain_number, m.group(1)) + "到" + _NUMBER_RE.sub(_plain_number, m.group(6))


def _version(m: re.Match) -> str:
    return "".join("点" if c == "." else num.number(c) for c in m.group(1))


def _counted(m: re.Match) -> str:
    count = num.number(m.group(1))
    approx = "多" if m.group(2) == "+" else (m.group(2) or "")
    return ("两" if count == "二" else count) + approx + m.group(3)


def _unit(m: re.Match) -> str:
    return _UNIT_WORDS[m.group(0)]


_CLOCK = r"([0-1]?[0-9]|2[0-3]):([0-5][0-9])(:([0-5][0-9]))?"  # groups: hour, minute, (:second), second
_MEASURED = rf"({_NUM}|(\.(\d+))){_RANGE_UNITS}"  # a number with a unit: 5kg, .5m, 30%
_UNIT = "|".join(sorted(map(re.escape, _UNIT_WORDS), key=len, reverse=True))  # longest first
_ARITHMETIC = re.compile(_OPERAND + r"([\+\-\×÷=])" + _OPERAND)
_NO_OPERATOR_AROUND = r"[\d\+\-\×÷=]"

Rule = tuple[re.Pattern, Callable[[re.Match], str]]
# GPT-SoVITS's order matters: dates and times see the raw digits before any number rule.
_BEFORE_ARITHMETIC: tuple[Rule, ...] = (
    (re.compile(r"(\d{4}|\d{2})年((0?[1-9]|1[0-2])月)?(((0?[1-9])|((1|2)[0-9])|30|31)([日号]))?"), _date),
    (re.compile(r"(\d{4})([- /.])(0[1-9]|1[012])\2(0[1-9]|[12][0-9]|3[01])"), _iso_date),
    (re.compile(_CLOCK + r"(~|-)" + _CLOCK), _time_range),
    (re.compile(_CLOCK), _time),
    (re.compile(_MEASURED + "~" + _MEASURED), lambda m: m.group(0).replace("~", "至")),
    (re.compile(r"(-?)(\d+(\.\d+)?)(°C|℃|度|摄氏度)"), _temperature),
    (re.compile(rf"(?<=\d)({_UNIT})(?![A-Za-z])"), _unit),
)
_AFTER_ARITHMETIC: tuple[Rule, ...] = (
    (re.compile(rf"[{_SUPERSCRIPTS}]+"), _power),
    (re.compile(r"(-?)(\d+)/(\d+)"), _fraction),
    (re.compile(r"(-?)(\d+(\.\d+)?)%"), _percentage),
    (re.compile(r"(?<!\d)((\+?86 ?)?1([38]\d|5[0-35-9]|7[678]|9[89])\d{8})(?!\d)"), _phone),  # mobile
    (re.compile(r"(?<!\d)((0(10|2[1-3]|[3-9]\d{2})-?)?[1-9]\d{6,7})(?!\d)"), _phone),  # land line
    (re.compile(r"(400)(-)?\d{3}(-)?\d{4}"), _phone),  # national 400 numbers
    (re.compile(rf"(?<!{_NO_OPERATOR_AROUND}){_NUM_GROUP}[-~]{_NUM_GROUP}(?!{_NO_OPERATOR_AROUND})"), _range),
    (re.compile(r"(-)(\d+)"), lambda m: "负" + num.number(m.group(2))),
    (re.compile(r"((\d+)(\.\d+)(\.\d+)?(\.\d+)+)"), _version),
    (re.compile(r"(-?)((\d+)(\.\d+))|(\.(\d+))"), _plain_number),  # decimals
    (re.compile(r"(\d+)([多余几\+])?" + _MEASURE), _counted),
    (re.compile(r"\d{3}\d*"), lambda m: num.digit_by_digit(m.group(0), yao=True)),  # codes, ids
    (_NUMBER_RE, _plain_number),
)


@cache
def simplifier() -> Callable[[str], str]:
    """Traditional -> simplified characters (OpenCC ``t2s``)."""
    import opencc  # opencc-python-reimplemented: pure Python, tables ship in the wheel

    return opencc.OpenCC("t2s").convert


def split_sentences(text: str) -> list[str]:
    """Drop spaces and brackets/quotes, then cut after sentence punctuation."""
    text = _SPLIT_DROP.sub("", text.replace(" ", ""))
    text = _SENTENCE_END.sub(r"\1\n", text).strip()
    return [sentence.strip() for sentence in re.split(r"\n+", text)]


def verbalize(sentence: str) -> str:
    """Write out numbers and symbols of one sentence in characters (``normalize_sentence``)."""
    sentence = simplifier()(sentence).translate(_FULL_TO_HALF)
    for pattern, replace in _BEFORE_ARITHMETIC:
        sentence = pattern.sub(replace, sentence)
    while _ARITHMETIC.search(sentence):
        sentence = _ARITHMETIC.sub(_arithmetic, sentence)
    for pattern, replace in _AFTER_ARITHMETIC:
        sentence = pattern.sub(replace, sentence)
    for symbol, word in _SYMBOL_WORDS.items():
        sentence = sentence.replace(symbol, word)
    return _FINAL_DROP.sub("", sentence)


def map_punctuation(sentence: str) -> str:
    """Punctuation -> punctuation phones; drop everything but CJK characters and those phones."""
    sentence = sentence.replace("嗯", "恩").replace("呣", "母")
    sentence = _PUNCTUATION_RE.sub(lambda m: _PUNCTUATION_MAP[m.group(0)], sentence)
    return _NOT_KEPT.sub("", sentence)


def normalize(text: str) -> str:
    """GPT-SoVITS ``text_normalize`` for zh: the text whose characters are phonemized."""
    text = "".join(map_punctuation(verbalize(sentence)) for sentence in split_sentences(text))
    return _REPEATED_PUNCTUATION.sub(r"\1", text)
