"""A small prepared feature cache (fallback tokenizer) shared by the trainer and federation tests."""

from __future__ import annotations

from pathlib import Path

from fedvox.client.data.prepare import prepare
from fedvox.shared.semantic import tokenizer_spec
from tests.data_fixtures import write_good_set


def prepared_cache(folder: Path, repeat: int = 2, source: str = "espeak") -> Path:
    """Prepare ``6 * repeat`` utterances (en + zh) into ``folder/cache``; returns the cache folder."""
    list_file = write_good_set(folder / "recordings", source=source, repeat=repeat)
    cache = folder / "cache"
    prepare(list_file, cache, tokenizer=tokenizer_spec(), symbols_version="v2", workers=1, show_progress=False)
    return cache
