"""A deterministic held-out split: validation utterances that training never sees."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from fedvox.client.data.cache import CachedItem
from fedvox.shared.errors import ConfigError

HELD_OUT_FRACTION = 0.1
"""Share of a client's utterances held out for validation (never trained on), wherever it trains."""


def holdout_split(
    items: Sequence[CachedItem], fraction: float = HELD_OUT_FRACTION, seed: int = 0
) -> tuple[list[CachedItem], list[CachedItem]]:
    """Split ``items`` into ``(train, validation)``, disjoint, both in their original order.

    Items are ranked by a hash of ``seed`` and their cache id (which hashes the recording), and
    the first ``round(fraction * n)`` go to validation: the same cache and seed always give the
    same split on any machine, whatever order the list file had. With two or more items and
    ``fraction > 0`` both sides get at least one item.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"validation fraction must be in [0, 1), got {fraction}")
    count = len(items)
    n_val = min(max(round(fraction * count), 1), count - 1) if fraction > 0 and count >= 2 else 0
    ranked = sorted(items, key=lambda item: hashlib.sha256(f"{seed}:{item.id}".encode()).hexdigest())
    chosen = {item.id for item in ranked[:n_val]}
    return (
        [item for item in items if item.id not in chosen],
        [item for item in items if item.id in chosen],
    )
