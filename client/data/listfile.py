"""GPT-SoVITS list files: one utterance per line, ``audio_path|speaker|language|text``.

Paths are relative to the list file's folder or absolute. Language codes follow GPT-SoVITS v2
(``zh``, ``en``, ``ja``, ``ko``, ``yue``); its v1 upper-case codes (``ZH``, ``EN``, ``JP``) are
mapped as ``1-get-text.py`` maps them. The speaker column is kept for reports; GPT-SoVITS
never trains on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fedvox.client.data.reasons import Reason, Rejected, Rejection
from fedvox.shared.errors import DataError
from fedvox.shared.text import normalize_language


@dataclass(frozen=True)
class Entry:
    """One utterance as the list states it (nothing checked yet beyond the line's shape)."""

    line: int  # 1-based line number in the list file
    audio_path: str  # as written
    speaker: str
    language: str  # normalised code
    text: str


def read_list(path: str | os.PathLike[str]) -> list[Entry | Rejection]:
    """Parse every non-blank line of a list file; a malformed line becomes a :class:`Rejection`.

    Raises :class:`DataError` when the file itself cannot be read as UTF-8 text.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"list file {path} does not exist; pass the path of your .list file") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder; pass the .list file inside it") from None
    except UnicodeDecodeError as exc:
        encoding = "UTF-16 text" if path.read_bytes()[:2] in (b"\xff\xfe", b"\xfe\xff") else "not UTF-8 text"
        raise DataError(
            f"list file {path} is {encoding} ({exc.reason} at byte {exc.start}); save it as UTF-8 (in an editor's "
            f"'Save as' encoding, or: iconv -t UTF-8 {path} > fixed.list) and pass that"
        ) from None
    except OSError as exc:
        raise DataError(f"cannot read list file {path}: {exc.strerror}") from None
    return [parse_line(raw, number) for number, raw in enumerate(text.splitlines(), start=1) if raw.strip()]


def parse_line(raw: str, line: int) -> Entry | Rejection:
    """One ``audio_path|speaker|language|text`` line; the text may itself contain ``|``."""
    fields = raw.rstrip("\r\n").split("|", 3)
    if len(fields) != 4:
        return Rejection(
            line,
            "",
            Reason.MALFORMED_LINE,
            f"line {line}: expected 4 fields audio_path|speaker|language|text, found {len(fields)}",
        )
    audio_path, speaker, language, text = (field.strip() for field in fields)
    if not audio_path or not language:
        missing = "audio path" if not audio_path else "language"
        message = f"line {line}: the {missing} field is empty"
        return Rejection(line, audio_path, Reason.MALFORMED_LINE, message)
    return Entry(line, audio_path, speaker, normalize_language(language), text)


LIST_SUFFIXES = (".list",)
LIST_SEARCH_DEPTH = 3
"""A recording's list file sits in its folder or up to two folders above (GPT-SoVITS keeps
``wavs/`` next to the ``.list``)."""


def listing(path: str | os.PathLike[str]) -> Path | None:
    """The list file near ``path`` that names it as a recording, if any (so nothing writes over it)."""
    target = Path(os.path.realpath(Path(path).expanduser()))
    for folder in [target.parent, *target.parent.parents][:LIST_SEARCH_DEPTH]:
        for list_file in sorted(p for p in folder.glob("*") if p.suffix in LIST_SUFFIXES and p.is_file()):
            try:
                entries = read_list(list_file)
            except DataError:
                continue
            for entry in entries:
                if isinstance(entry, Entry) and _real(entry.audio_path, list_file.parent) == target:
                    return list_file
    return None


def _real(audio_path: str, list_dir: Path) -> Path:
    candidate = Path(audio_path).expanduser()
    return Path(os.path.realpath(candidate if candidate.is_absolute() else list_dir / candidate))


def resolve_audio(entry: Entry, list_dir: Path, data_root: Path) -> Path:
    """The recording's real path (symlinks resolved); it must lie inside ``data_root``."""
    real = _real(entry.audio_path, list_dir)
    root = Path(os.path.realpath(data_root))
    if not real.is_relative_to(root):
        raise Rejected(
            Reason.PATH_OUTSIDE_ROOT,
            f"line {entry.line}: {entry.audio_path} resolves to {real}, outside the data root {root}",
        )
    return real
