"""Why an utterance was rejected: one machine-readable reason code per rejected list entry.

The codes appear in ``report.json`` and the summary; ``docs/data.md`` lists each with its fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from fedvox.shared.errors import DataError


class Reason(StrEnum):
    """A rejected entry's reason code."""

    MALFORMED_LINE = "malformed_line"
    PATH_OUTSIDE_ROOT = "path_outside_root"
    MISSING_FILE = "missing_file"
    UNREADABLE_FILE = "unreadable_file"
    DUPLICATE_ENTRY = "duplicate_entry"
    EMPTY_TEXT = "empty_text"
    UNSUPPORTED_LANGUAGE = "unsupported_language"
    UNPHONEMIZABLE_TEXT = "unphonemizable_text"
    UNDECODABLE_AUDIO = "undecodable_audio"
    EMPTY_AUDIO = "empty_audio"
    NON_FINITE_SAMPLES = "non_finite_samples"
    TOO_SHORT = "too_short"
    TOO_LONG = "too_long"
    SILENT_AUDIO = "silent_audio"
    CLIPPED_AUDIO = "clipped_audio"
    FEATURE_ERROR = "feature_error"
    MISSING_FEATURES = "missing_features"  # --from-gpt-sovits: a file of the experiment folder is absent
    MISMATCHED_FEATURES = "mismatched_features"  # --from-gpt-sovits: its files disagree with each other
    BAD_SEGMENT = "bad_segment"  # --slice: path#START-END outside the recording


FIXES: dict[Reason, str] = {
    Reason.MALFORMED_LINE: "write the line as audio_path|speaker|language|text",
    Reason.PATH_OUTSIDE_ROOT: "move the recording under the data root, or pass --data-root",
    Reason.MISSING_FILE: "fix the path (relative paths start at the list file's folder)",
    Reason.UNREADABLE_FILE: "check the file's permissions",
    Reason.DUPLICATE_ENTRY: "list each recording once",
    Reason.EMPTY_TEXT: "add the transcript after the last '|'",
    Reason.UNSUPPORTED_LANGUAGE: (
        "use a supported language code (zh, en, ja, ko, yue; auto or auto_yue for mixed-language text) "
        "and install its extra"
    ),
    Reason.UNPHONEMIZABLE_TEXT: "check the transcript matches the language column",
    Reason.UNDECODABLE_AUDIO: "convert the recording to wav, flac or ogg",
    Reason.EMPTY_AUDIO: "re-export the recording; it holds no samples",
    Reason.NON_FINITE_SAMPLES: "re-export the recording; it holds NaN or infinite samples",
    Reason.TOO_SHORT: "use utterances of 0.6 s or longer (merge short clips)",
    Reason.TOO_LONG: "slice recordings into utterances shorter than 54 s",
    Reason.SILENT_AUDIO: "check the microphone; the recording is silent",
    Reason.CLIPPED_AUDIO: "record with a lower input gain; the recording is clipped",
    Reason.FEATURE_ERROR: "report this as a bug with the log (run with --verbose)",
    Reason.MISSING_FEATURES: "run GPT-SoVITS's 1A preparation for this utterance, or drop it from the list",
    Reason.MISMATCHED_FEATURES: "pass the s2G and --config the experiment was prepared with, or prepare it again",
    Reason.BAD_SEGMENT: "give START-END in seconds inside the recording (fedvox-client slice writes them)",
}


class Rejected(DataError):
    """Raised by a check: this entry cannot be used; ``reason`` is its code, the message says why."""

    def __init__(self, reason: Reason, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # crosses process boundaries intact
        return type(self), (self.reason, str(self))


@dataclass(frozen=True)
class Rejection:
    """A rejected entry as the report lists it."""

    line: int
    source: str  # the audio path as written in the list ("" for a malformed line)
    reason: Reason
    message: str
