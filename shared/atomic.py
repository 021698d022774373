"""Crash-safe file writes.

A checkpoint, ledger export or feature file is written to a temporary file in the same folder,
flushed to disk and renamed over the target, so a killed process leaves either the old file or
the new one, never a half-written one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fedvox.shared.errors import ConfigError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def refuse_overwrite(path: str | os.PathLike[str], *, force: bool, flag: str = "--out") -> None:
    """Raise :class:`ConfigError` if ``path`` exists and ``force`` is not given (a folder: always)."""
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{flag} {target} is a folder; name a file")
    if target.exists() and not force:
        raise ConfigError(f"{flag} {target} exists; choose a new file, or pass --force to replace it")


def claim_folder(path: str | os.PathLike[str], markers: tuple[str, ...], flag: str = "--out") -> Path:
    """``path`` if fedvox may write into it: new, empty, or holding one of ``markers`` (what fedvox
    wrote there before); a folder of other files is refused, so nothing of the user's is replaced."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {folder} is a file; choose a folder")
    if folder.is_dir() and any(folder.iterdir()) and not any((folder / name).exists() for name in markers):
        raise ConfigError(
            f"{flag} {folder} holds other files; choose a new or empty folder (fedvox never writes among your files)"
        )
    return folder


def writable_folder(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """Make ``path`` (and its parents) if needed and check it can be written; one clear error if not."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fedvox-write-check."):
            pass
    except FileExistsError:
        raise ConfigError(f"{flag} {folder} is a file; choose a folder") from None
    except OSError as exc:
        raise ConfigError(
            f"cannot write to {flag} {folder} ({exc.strerror}); choose a folder you can write to"
        ) from None
    return folder


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
