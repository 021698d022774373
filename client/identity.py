"""A client's privacy identity, bound to its recordings, and the one ledger it is charged in.

The identity is what ledger rows are charged to. It is derived from the recordings themselves:
``recordings`` is the SHA-256 of the sorted content hashes of the prepared waveforms (the cached
32 kHz audio, independent of the tokenizer or symbol settings), and a folder prepared afresh
from the same recordings gets the same identity. The client id is ``client-`` and the first 24
hex digits of that digest (it names the recordings' set, not the person).

One identity, one ledger: :func:`bind_ledger` records, in the owner's fedvox home
(``<home>/ledgers/<recordings>.json``), which ledger folder the identity is charged in. A second
ledger for the same recordings (``enroll --ledger OTHER``, a copied or re-prepared data folder
with its default ledger) is refused with the ledger to use; :func:`move_ledger` is the explicit
way to move it (``fedvox-client ledger-move``).

A changed set of recordings (one added or removed) is a new identity with its own budget: the
ledger protects the recordings it has charged, and those stay charged where they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors import safe_open

from fedvox.client.data.cache import FeatureCache
from fedvox.shared.atomic import atomic_write_text
from fedvox.shared.errors import DataError, PrivacyError
from fedvox.shared.privacy.ledger import LEDGER_FILENAME

IDENTITY_FILE = "identity.json"
REGISTRY = "ledgers"


@dataclass(frozen=True)
class Identity:
    """Who a data folder's releases are charged to."""

    client_id: str
    recordings: str  # SHA-256 of the sorted waveform hashes
    index_sha256: str  # of the index.json it was computed from (recomputed when that changes)


def identity(data_dir: str | Path) -> Identity:
    """The folder's identity, computed from its recordings (and kept in ``identity.json``)."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; pass the --out folder of `fedvox-client prepare`")
    cache = FeatureCache(folder)
    index = cache.read_index()
    index_sha = hashlib.sha256(cache.index_path.read_bytes()).hexdigest()
    path = folder / IDENTITY_FILE
    saved = _saved(path)
    if saved is not None and saved.index_sha256 == index_sha:
        return saved
    recordings = hashlib.sha256(
        "".join(sorted(_wave_hash(cache, item.id) for item in index.items)).encode()
    ).hexdigest()
    # A folder identified before identities were bound to recordings keeps its id: its ledger uses it.
    keep = saved is not None and saved.recordings in ("", recordings)
    client_id = saved.client_id if keep else f"client-{recordings[:24]}"
    result = Identity(client_id, recordings, index_sha)
    atomic_write_text(path, json.dumps(asdict(result)) + "\n")
    return result


def client_identity(data_dir: str | Path) -> str:
    """The client id the folder's releases are charged to."""
    return identity(data_dir).client_id


def fedvox_home(home: str | Path | None = None) -> Path:
    """``home``, else ``$FEDVOX_HOME``, else ``~/.fedvox``."""
    return Path(home or os.environ.get("FEDVOX_HOME", Path.home() / ".fedvox")).expanduser().resolve()


def bind_ledger(data_dir: str | Path, ledger_dir: str | Path, home: str | Path | None = None) -> str:
    """The folder's client id, once ``ledger_dir`` is known to be its identity's one ledger.

    The first use records the binding; later uses must name the same ledger folder. Raises
    :class:`PrivacyError` naming the ledger to use otherwise.
    """
    ident = identity(data_dir)
    ledger = Path(ledger_dir).expanduser().resolve()
    registry = fedvox_home(home) / REGISTRY
    path = registry / f"{ident.recordings}.json"
    if not path.is_file():
        registry.mkdir(parents=True, exist_ok=True)
        candidate = registry / f".{path.name}.{secrets.token_hex(4)}"
        atomic_write_text(candidate, json.dumps({"client_id": ident.client_id, "ledger": str(ledger)}) + "\n")
        try:
            os.link(candidate, path)  # another process's binding wins
        except FileExistsError:
            pass
        finally:
            candidate.unlink(missing_ok=True)
        created = True
    else:
        created = False
    bound = json.loads(path.read_text())
    if not created and not (Path(bound["ledger"]) / LEDGER_FILENAME).is_file():
        raise PrivacyError(
            f"the ledger of these recordings is missing from {bound['ledger']} (recorded in {path}); restore it "
            f"there, or if you moved it, record its place with `fedvox-client ledger-move --data {data_dir} --to DIR`"
        )
    if bound["ledger"] != str(ledger) or bound["client_id"] != ident.client_id:
        raise PrivacyError(
            f"these recordings are already charged to {bound['client_id']} in the ledger in {bound['ledger']} "
            f"(recorded in {path}); one set of recordings has one ledger and one budget. Use that ledger "
            f"(--ledger {bound['ledger']}), or move it with `fedvox-client ledger-move --data {data_dir} --to DIR`"
        )
    return ident.client_id


def bound_ledger(data_dir: str | Path, home: str | Path | None = None) -> Path | None:
    """The ledger folder the folder's recordings are charged in, or ``None`` if none is recorded yet."""
    path = fedvox_home(home) / REGISTRY / f"{identity(data_dir).recordings}.json"
    return Path(json.loads(path.read_text())["ledger"]) if path.is_file() else None


def move_ledger(data_dir: str | Path, target: str | Path, home: str | Path | None = None) -> Path:
    """Move the identity's ledger (and its release book) to ``target`` and record the new place
    (only record it, if the owner already moved the ledger there)."""
    ident = identity(data_dir)
    path = fedvox_home(home) / REGISTRY / f"{ident.recordings}.json"
    if not path.is_file():
        raise PrivacyError(f"no ledger is recorded for the recordings in {data_dir}; nothing to move")
    source = Path(json.loads(path.read_text())["ledger"])
    target = Path(target).expanduser().resolve()
    if target == source:
        return target
    here, there = (source / LEDGER_FILENAME).is_file(), (target / LEDGER_FILENAME).is_file()
    if here and there:
        raise PrivacyError(f"{target} already holds a privacy ledger; choose an empty folder")
    if not here and not there:
        raise PrivacyError(f"no privacy ledger in {source} or {target}: restore the ledger of these recordings first")
    if here:
        target.mkdir(parents=True, exist_ok=True)
        for name in (LEDGER_FILENAME, f"{LEDGER_FILENAME}-wal", f"{LEDGER_FILENAME}-shm", "releases"):
            if (source / name).exists():
                shutil.move(str(source / name), str(target / name))
    # else: the owner moved it by hand; only its place is recorded
    atomic_write_text(path, json.dumps({"client_id": ident.client_id, "ledger": str(target)}) + "\n")
    return target


def _saved(path: Path) -> Identity | None:
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text())
        return Identity(
            str(values["client_id"]), str(values.get("recordings", "")), str(values.get("index_sha256", ""))
        )
    except (ValueError, KeyError) as exc:
        raise DataError(
            f"{path} is damaged ({exc}); restore it from a backup: the privacy ledger refers to it"
        ) from exc


def _wave_hash(cache: FeatureCache, item: str) -> str:
    try:
        with safe_open(str(cache.item_path(item)), framework="pt") as fh:
            wave = fh.get_tensor("wave")
    except Exception as exc:  # any unreadable item: the cache must be prepared again
        raise DataError(f"{cache.root}: item {item} is unreadable ({type(exc).__name__}); run prepare again") from None
    return hashlib.sha256(wave.numpy().tobytes()).hexdigest()


__all__ = ["Identity", "bind_ledger", "bound_ledger", "client_identity", "fedvox_home", "identity", "move_ledger"]
