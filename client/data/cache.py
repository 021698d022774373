"""The on-device feature cache: one safetensors file per accepted utterance, plus an index.

Layout of ``DIR``::

    items/<id>.safetensors   wave (int16, 32 kHz), semantic_ids, phoneme_ids (+ metadata);
                             bert [X, 1024] (zh with --bert) and sv [20480] (with --sv) when made
    index.json               settings and the accepted items, in list order (datasets read this)
    report.json, report.txt  what ``prepare`` accepted and rejected, and why

An item's id hashes the recording's bytes, its language and transcript, and every setting that
changes features (tokenizer, symbol table, cache format). A changed recording or setting gets a
new id and is featurised again; an unchanged one is found and skipped, which is also how a
killed run resumes. Every file is written atomically, so a kill leaves only whole files (and
perhaps a stray ``.tmp``, removed on the next run). ``index.json`` names exactly one tokenizer:
its items were all made by it, and items of earlier settings are deleted once a new index is in
place.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from fedvox.client.data.features import Features
from fedvox.client.data.listfile import Entry
from fedvox.shared.atomic import atomic_write_text
from fedvox.shared.errors import CheckpointError, DataError
from fedvox.shared.models.interop import load_safetensors, save_safetensors

CACHE_FORMAT = 1
ITEM_SUFFIX = ".safetensors"
REQUIRED_TENSORS = frozenset({"wave", "semantic_ids", "phoneme_ids"})
OPTIONAL_TENSORS = frozenset({"bert", "sv"})
_OPTIONAL_SETTINGS = OPTIONAL_TENSORS | {"langdetect", "g2pw"}


@dataclass(frozen=True)
class FeatureSettings:
    """Everything besides the recording and its transcript that decides an item's features."""

    tokenizer: str
    symbols_version: str
    format: int = CACHE_FORMAT
    bert: str = ""  # the BERT weights' name ("" none: zh reads zeros)
    sv: str = ""  # the speaker-verification weights' name ("" none)
    langdetect: str = ""  # the language-identification model auto lines are cut with ("" the wheel's)
    g2pw: str = ""  # the g2pW model zh polyphones were read with ("" pypinyin)

    def identity(self) -> dict[str, Any]:
        """What item ids hash: unset optional settings are left out, so caches made before they
        existed keep their ids."""
        return {key: value for key, value in asdict(self).items() if value != "" or key not in _OPTIONAL_SETTINGS}


@dataclass(frozen=True)
class CachedItem:
    """One accepted utterance as ``index.json`` lists it."""

    id: str
    source: str  # the audio path as the list file writes it
    line: int
    speaker: str
    language: str
    duration_s: float  # of the recording as submitted
    semantic_tokens: int
    phonemes: int

    @classmethod
    def of(cls, entry: Entry, item: str, duration_s: float, semantic_tokens: int, phonemes: int) -> CachedItem:
        """The index row of list-file ``entry``, accepted and cached as ``item``."""
        return cls(
            id=item,
            source=entry.audio_path,
            line=entry.line,
            speaker=entry.speaker,
            language=entry.language,
            duration_s=duration_s,
            semantic_tokens=semantic_tokens,
            phonemes=phonemes,
        )


@dataclass(frozen=True)
class CacheIndex:
    settings: FeatureSettings
    items: tuple[CachedItem, ...]


def item_id(audio_sha256: str, language: str, text: str, settings: FeatureSettings) -> str:
    """The cache key of an utterance under ``settings``."""
    payload = json.dumps([audio_sha256, language, text, settings.identity()], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


class FeatureCache:
    """Reads and writes the feature cache under ``root``."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.items_dir = self.root / "items"
        self.index_path = self.root / "index.json"

    def item_path(self, item: str) -> Path:
        return self.items_dir / f"{item}{ITEM_SUFFIX}"

    # ------------------------------------------------------------ items

    def write_item(self, item: str, features: Features, metadata: dict[str, Any]) -> None:
        tensors = {
            "wave": features.wave,
            "semantic_ids": features.semantic_ids,
            "phoneme_ids": features.phoneme_ids,
        }
        tensors |= {
            name: tensor for name, tensor in (("bert", features.bert), ("sv", features.sv)) if tensor is not None
        }
        try:  # one metadata entry: safetensors writes several in a random order, one is reproducible
            save_safetensors(tensors, self.item_path(item), {"item": {"id": item, **metadata}})
        except OSError as exc:
            raise DataError(
                f"cannot write the feature cache under {self.root}: {exc.strerror}; free disk "
                "space or choose another --out (finished items are kept; run prepare again)"
            ) from None

    def item_header(self, item: str) -> dict[str, Any] | None:
        """An item's metadata and tensor lengths without reading its tensors; None if unusable."""
        path = self.item_path(item)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = json.loads((fh.metadata() or {})["item"])
                names = fh.keys()  # a safe_open handle is not iterable: `for name in fh` raises
                lengths = {name: fh.get_slice(name).get_shape()[0] for name in names}
        except Exception:  # a file we cannot parse is re-made, whatever the parser's complaint
            return None
        if meta.get("id") != item or not REQUIRED_TENSORS <= set(lengths) <= REQUIRED_TENSORS | OPTIONAL_TENSORS:
            return None
        return {**meta, "lengths": lengths}

    def load_item(self, item: str) -> dict[str, torch.Tensor]:
        try:
            tensors, _ = load_safetensors(self.item_path(item))
        except CheckpointError as exc:
            raise DataError(f"feature cache {self.root} is damaged ({exc}); run prepare again") from None
        return tensors

    # ------------------------------------------------------------ index

    def write_index(self, settings: FeatureSettings, items: Sequence[CachedItem]) -> None:
        index = {"settings": asdict(settings), "items": [asdict(item) for item in items]}
        atomic_write_text(self.index_path, json.dumps(index, indent=1, ensure_ascii=False) + "\n")

    def read_index(self) -> CacheIndex:
        """The prepared utterances; raises :class:`DataError` if ``prepare`` has not completed here."""
        if self.root.is_file():
            raise DataError(
                f"{self.root} is a file, not a prepared data folder; pass the folder that "
                f"`fedvox-client prepare {self.root.name} --out DIR` wrote (DIR)"
            )
        try:
            raw = json.loads(self.index_path.read_text(encoding="utf-8"))
            settings = FeatureSettings(**raw["settings"])
            items = tuple(CachedItem(**item) for item in raw["items"])
        except FileNotFoundError:
            raise DataError(
                f"no feature cache at {self.root} (index.json missing); run "
                f"`fedvox-client prepare LIST --out {self.root}` first"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{self.index_path} is damaged ({exc}); run prepare again") from None
        if settings.format != CACHE_FORMAT:
            raise DataError(
                f"feature cache {self.root} has format {settings.format}, this fedvox reads "
                f"{CACHE_FORMAT}; run prepare again with a new --out folder"
            )
        return CacheIndex(settings, items)

    # ------------------------------------------------------------ housekeeping

    def prune(self, keep: set[str]) -> int:
        """Delete item files not in ``keep``; returns how many. Also removes the temporary files
        a killed run may have left (here and in ``items/``)."""
        for path in [*self.root.glob(".*.tmp"), *self.items_dir.glob(".*.tmp")]:
            path.unlink(missing_ok=True)
        stale = [path for path in self.items_dir.glob(f"*{ITEM_SUFFIX}") if path.name[: -len(ITEM_SUFFIX)] not in keep]
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the cache for writing; a second ``prepare`` on the same folder is refused."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DataError(
                    f"another prepare is writing {self.root}; wait for it or choose another --out"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
