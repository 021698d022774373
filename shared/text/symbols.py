"""GPT-SoVITS phoneme symbol tables and phone -> id lookup.

The tables are data files (``data/symbols_v1.txt``, ``data/symbols_v2.txt``) holding GPT-SoVITS's
``symbols.py`` (322 symbols) and ``symbols2.py`` (732) in their exact order, so our phoneme ids
equal the ids of ``cleaned_text_to_sequence`` and pretrained embedding rows line up. The first
322 v2 symbols are the v1 table, so zh and en phones have the same id in both versions.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fedvox.shared.errors import ConfigError

SYMBOLS_VERSIONS = ("v1", "v2")
PUNCTUATION = ("!", "?", "…", ",", ".", "-")
"""Punctuation phones GPT-SoVITS keeps (``symbols.punctuation``): pauses, not sounds."""
CJK_PUNCTUATION_MAP = {"：": ",", "；": ",", "，": ",", "。": ".", "！": "!", "？": "?", "\n": ".", "·": ",", "、": ","}
"""The full-width marks every GPT-SoVITS CJK front end (``rep_map``) maps to punctuation phones;
each language extends it with its own. Interop data."""
UNK = "UNK"


def check_symbols_version(symbols_version: str) -> str:
    """Return ``symbols_version`` if it names a table, else raise :class:`ConfigError`."""
    if symbols_version not in SYMBOLS_VERSIONS:
        raise ConfigError(
            f"unknown symbols_version {symbols_version!r}: use 'v1' (GPT-SoVITS v1 models) "
            "or 'v2' (v2, v2Pro, v2ProPlus models)"
        )
    return symbols_version


@cache
def symbols(symbols_version: str = "v2") -> tuple[str, ...]:
    """The symbol table of ``symbols_version``; a symbol's index is its phoneme id."""
    check_symbols_version(symbols_version)
    text = resources.files("fedvox.shared.text.data").joinpath(f"symbols_{symbols_version}.txt").read_text("utf-8")
    return tuple(text.splitlines())


@cache
def symbol_to_id(symbols_version: str = "v2") -> dict[str, int]:
    return {symbol: index for index, symbol in enumerate(symbols(symbols_version))}


def phones_to_ids(phones: list[str], symbols_version: str = "v2") -> list[int]:
    """GPT-SoVITS's ``cleaned_text_to_sequence``: phones -> phoneme ids (phones must be in the table)."""
    table = symbol_to_id(symbols_version)
    try:
        return [table[phone] for phone in phones]
    except KeyError as exc:
        raise ValueError(f"phone {exc.args[0]!r} is not in the {symbols_version} symbol table") from None
