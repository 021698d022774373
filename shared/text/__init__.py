"""Text frontend: transcripts -> GPT-SoVITS phoneme ids (zh, en, yue, ja, ko), offline.

``phonemize(text, language, symbols_version)`` is the entry point; see docs/text.md.
"""

from fedvox.shared.text.phonemize import (
    GPT_SOVITS_LANGUAGES,
    SUPPORTED_LANGUAGES,
    Phonemes,
    normalize_language,
    phonemize,
)
from fedvox.shared.text.symbols import SYMBOLS_VERSIONS, phones_to_ids, symbol_to_id, symbols

__all__ = [
    "GPT_SOVITS_LANGUAGES",
    "SUPPORTED_LANGUAGES",
    "SYMBOLS_VERSIONS",
    "Phonemes",
    "normalize_language",
    "phonemize",
    "phones_to_ids",
    "symbol_to_id",
    "symbols",
]
