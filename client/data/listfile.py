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
        raise DataError(f"list file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"cannot read list file {path}: {exc.strerror}") from None
    return [
        parse_line(raw, number)
        for number, raw in enumerate(text.splitlines(), start=1)
        if raw.strip()
    ]


def parse_line(raw: str, line: int) -> Entry | Rejection:
    """One ``audio_path|speaker|language|text`` line; the text may itself contain ``|``."""
    fields = raw.rstrip("\r\n").split("|", 3)
    if len(fields) != 4:
        return Rejection(
            line, "", Reason.MALFORMED_LINE,
            f"line {line}: expected 4 fields audio_path|speaker|language|text, found {len(fields)}",
        )
    audio_path, speaker, language, text = (field.strip() for field in fields)
    if not audio_path or not language:
        missing = "audio path" if not audio_path else "language"
        message = f"line {line}: the {missing} field is empty"
        return Rejection(line, audio_path, Reason.MALFORMED_LINE, message)
    return Entry(line, audio_path, speaker, normalize_language(language), text)


def resolve_audio(entry: Entry, list_dir: Path, data_root: Path) -> Path:
    """The recording's real path (symlinks resolved); it must lie inside ``data_root``."""
    candidate = Path(entry.audio_path).expanduser()
    if not candidate.is_absolute():
        candidate = list_dir / candidate
    real = Path(os.path.realpath(candidate))
    root = Path(os.path.realpath(data_root))
    if not real.is_relative_to(root):
        raise Rejected(
            Reason.PATH_OUTSIDE_ROOT,
            f"line {entry.line}: {entry.audio_path} resolves to {real}, outside the data root {root}",
        )
    return real
