"""Mandarin tone sandhi, the rules of GPT-SoVITS's ``tone_sandhi.py`` (from PaddleSpeech).

Finals are pypinyin ``FINALS_TONE3`` strings whose last character is the tone (1-4, 5 for
neutral). Two stages, as in GPT-SoVITS:

- :func:`merge_words` regroups jieba's (word, part-of-speech) segmentation so the rules see the
  right units: 不 and 一 join the next word, "看一看" becomes one word, reduplications and
  runs of third tones join (at most three syllables), 儿 joins the previous word.
- :func:`apply_sandhi` changes tones inside one word: 不 before a fourth tone -> bu2, 一 -> yi2
  before a fourth tone and yi4 before others (yi1 in "第一" and in digit strings, yi5 in
  "看一看"), neutral tones for reduplicated nouns/verbs, particles and a word list, and 3-3 ->
  2-3 inside words and across the two halves of three- and four-syllable words.
"""

from __future__ import annotations

import json
from functools import cache, lru_cache
from importlib import resources

Segment = list[tuple[str, str]]

_PARTICLES = "吧呢哈啊呐噻嘛吖嗨呐哦哒额滴哩哟喽啰耶喔诶"
_STRUCTURAL = "的地得"
_PUNCTUATION = "：，；。？！“”‘’':,;.?!"


@cache
def word_lists() -> dict[str, frozenset[str]]:
    """Neutral-tone and erhua word lists (data/zh_tone_words.json)."""
    text = resources.files("fedvox.shared.text.data").joinpath("zh_tone_words.json").read_text("utf-8")
    return {name: frozenset(words) for name, words in json.loads(text).items()}


@lru_cache(maxsize=1 << 16)
def finals_tone3(word: str) -> tuple[str, ...]:
    """pypinyin finals with tone digits ("你好" -> ('i3', 'ao3')); non-Chinese runs stay as is."""
    from pypinyin import Style, lazy_pinyin  # loaded on first use (zh._initials)

    return tuple(lazy_pinyin(word, neutral_tone_with_five=True, style=Style.FINALS_TONE3))


def _tone(final: str) -> str:
    """The tone digit of a final ("" for a final pypinyin could not give)."""
    return final[-1:]


def _with_tone(final: str, tone: str) -> str:
    return final[:-1] + tone


def _all_third(finals: list[str] | tuple[str, ...]) -> bool:
    return all(_tone(final) == "3" for final in finals)


@lru_cache(maxsize=1 << 16)
def _halves(word: str) -> tuple[str, str]:
    """Split a word around its shortest search-mode sub-word, as GPT-SoVITS's ``_split_word``.

    When the shortest sub-word is not a prefix the halves overlap (word minus the sub-word,
    then the sub-word); the rules index finals by the first half's length either way.
    """
    import jieba

    shortest = sorted(jieba.cut_for_search(word), key=len)[0]
    if word.find(shortest) == 0:
        return shortest, word[len(shortest) :]
    return word[: -len(shortest)], shortest


def _bu(word: str, finals: list[str]) -> None:
    if len(word) == 3 and word[1] == "不":  # 看不懂
        finals[1] = _with_tone(finals[1], "5")
        return
    for i, char in enumerate(word[:-1]):
        if char == "不" and _tone(finals[i + 1]) == "4":  # 不怕
            finals[i] = _with_tone(finals[i], "2")


def _yi(word: str, finals: list[str]) -> None:
    if "一" in word and all(char.isnumeric() for char in word if char != "一"):
        return  # digit strings: 一零零
    if len(word) == 3 and word[1] == "一" and word[0] == word[-1]:  # 看一看
        finals[1] = _with_tone(finals[1], "5")
    elif word.startswith("第一"):
        finals[1] = _with_tone(finals[1], "1")
    else:
        for i, char in enumerate(word[:-1]):
            if char != "一":
                continue
            if _tone(finals[i + 1]) == "4":  # 一段
                finals[i] = _with_tone(finals[i], "2")
            elif word[i + 1] not in _PUNCTUATION:  # 一天
                finals[i] = _with_tone(finals[i], "4")


def _neutral(word: str, pos: str, finals: list[str]) -> list[str]:
    lists = word_lists()
    always, never = lists["must_neutral_tone"], lists["must_not_neutral_tone"]
    for j in range(1, len(word)):  # reduplicated nouns, verbs, adjectives: 奶奶, 试试
        if word[j] == word[j - 1] and pos[:1] in {"n", "v", "a"} and word not in never:
            finals[j] = _with_tone(finals[j], "5")
    ge = word.find("个")
    if (
        (word[-1:] and word[-1] in _PARTICLES)
        or (word[-1:] and word[-1] in _STRUCTURAL)
        or (len(word) == 1 and word in "了着过" and pos in {"ul", "uz", "ug"})
        or (len(word) > 1 and word[-1] in "们子" and pos in {"r", "n"} and word not in never)
        or (len(word) > 1 and word[-1] in "上下里" and pos in {"s", "l", "f"})
        or (len(word) > 1 and word[-1] in "来去" and word[-2] in "上下进出回过起开")
    ):
        finals[-1] = _with_tone(finals[-1], "5")
    elif (ge >= 1 and (word[ge - 1].isnumeric() or word[ge - 1] in "几有两半多各整每做是")) or word == "个":
        finals[ge] = _with_tone(finals[ge], "5")  # 个 as a measure word
    elif word in always or word[-2:] in always:
        finals[-1] = _with_tone(finals[-1], "5")

    first, second = _halves(word)
    parts = [finals[: len(first)], finals[len(first) :]]
    for part, sub_word in zip(parts, (first, second), strict=True):
        if (sub_word in always or sub_word[-2:] in always) and part:
            part[-1] = _with_tone(part[-1], "5")
    return parts[0] + parts[1]


def _third(word: str, finals: list[str]) -> list[str]:
    if len(word) == 2 and _all_third(finals):
        finals[0] = _with_tone(finals[0], "2")
    elif len(word) == 3:
        first, _ = _halves(word)
        if _all_third(finals):
            if len(first) == 2:  # 蒙古/包
                finals[0] = _with_tone(finals[0], "2")
                finals[1] = _with_tone(finals[1], "2")
            elif len(first) == 1:  # 纸/老虎
                finals[1] = _with_tone(finals[1], "2")
        else:
            parts = [finals[: len(first)], finals[len(first) :]]
            for i, part in enumerate(parts):
                if _all_third(part) and len(part) == 2:  # 所有/人
                    part[0] = _with_tone(part[0], "2")
                elif i == 1 and not _all_third(part) and _tone(part[0]) == "3" and _tone(parts[0][-1]) == "3":
                    parts[0][-1] = _with_tone(parts[0][-1], "2")  # 好/喜欢
            finals = parts[0] + parts[1]
    elif len(word) == 4:  # idioms: two two-syllable halves
        for start in (0, 2):
            if _all_third(finals[start : start + 2]):
                finals[start] = _with_tone(finals[start], "2")
    return finals


def apply_sandhi(word: str, pos: str, finals: list[str]) -> list[str]:
    """Tone changes inside one word (GPT-SoVITS ``modified_tone``); returns the new finals."""
    finals = list(finals)
    _bu(word, finals)
    _yi(word, finals)
    finals = _neutral(word, pos, finals)
    return _third(word, finals)


def _merge_bu(seg: Segment) -> Segment:
    merged: Segment = []
    pending = ""
    for word, pos in seg:
        word = pending + word
        pending = word if word == "不" else ""
        if word != "不":
            merged.append((word, pos))
    if pending:
        merged.append((pending, "d"))
    return merged


def _merge_yi(seg: Segment) -> Segment:
    """ "听 一 听" -> "听一听"; a lone 一 joins the next word (GPT-SoVITS ``_merge_yi``).

    GPT-SoVITS indexes its output by input position and gives up (keeps ``seg``) when that
    index runs past the output; the same happens here.
    """
    merged: list[list[str]] = []
    for i, (word, pos) in enumerate(seg):
        if 0 < i < len(seg) - 1 and word == "一" and seg[i - 1][0] == seg[i + 1][0] and seg[i - 1][1] == "v":
            if i - 1 >= len(merged):
                return seg
            merged[i - 1][0] = merged[i - 1][0] + "一" + merged[i - 1][0]
        elif i >= 2 and seg[i - 1][0] == "一" and seg[i - 2][0] == word and pos == "v":
            continue
        else:
            merged.append([word, pos])
    result: list[list[str]] = []
    for word, pos in merged:
        if result and result[-1][0] == "一":
            result[-1][0] += word
        else:
            result.append([word, pos])
    return [(word, pos) for word, pos in result]


def _merge_reduplication(seg: Segment) -> Segment:
    merged: list[list[str]] = []
    for word, pos in seg:
        if merged and word == merged[-1][0]:
            merged[-1][0] += word
        else:
            merged.append([word, pos])
    return [(word, pos) for word, pos in merged]


def _merge_third_tones(seg: Segment, whole_words: bool) -> Segment:
    """Join neighbours whose third tones meet: whole words all third tone (``whole_words``), or
    the last syllable of one and the first of the next; never past three syllables or after a
    reduplication (it needs its neutral tone)."""
    finals = [finals_tone3(word) for word, _ in seg]
    merged: list[list[str]] = []
    joined_previous = False
    for i, (word, pos) in enumerate(seg):
        prev_word = seg[i - 1][0] if i else ""
        if whole_words:
            meet = i > 0 and _all_third(finals[i - 1]) and _all_third(finals[i])
        else:
            meet = i > 0 and _tone(finals[i - 1][-1]) == "3" and _tone(finals[i][0]) == "3"
        reduplication = len(prev_word) == 2 and prev_word[0] == prev_word[1]
        if meet and not joined_previous and not reduplication and len(prev_word) + len(word) <= 3:
            merged[-1][0] += word
            joined_previous = True
        else:
            merged.append([word, pos])
            joined_previous = False
    return [(word, pos) for word, pos in merged]


def _merge_er(seg: Segment) -> Segment:
    merged: list[list[str]] = []
    for i, (word, pos) in enumerate(seg):
        if i > 0 and word == "儿" and seg[i - 1][0] != "#":
            merged[-1][0] += word
        else:
            merged.append([word, pos])
    return [(word, pos) for word, pos in merged]


def merge_words(seg: Segment) -> Segment:
    """Regroup a jieba POS segmentation for the sandhi rules (``pre_merge_for_modify``)."""
    seg = _merge_bu(seg)
    seg = _merge_yi(seg)
    seg = _merge_reduplication(seg)
    seg = _merge_third_tones(seg, whole_words=True)
    seg = _merge_third_tones(seg, whole_words=False)
    return _merge_er(seg)
