"""The device's own record of what it released: release ids, cached replies, secret noise keys.

A server message is a *question*; its digest (:func:`message_digest`: the message type and every
record's content, not Flower's message id) names it. The first time a question is asked, the
device records a fresh release id for it *before* it trains (:meth:`ReleaseBook.begin`), derives
that release's noise and sampling seeds from a secret key that never leaves this folder
and its secure noise key (:meth:`ReleaseBook.seeds`), charges the ledger under the release id, and stores the reply's
bytes before sending them (:meth:`ReleaseBook.finish`). Asked again:

- answered before: the stored bytes go back unchanged: no new noise, no new charge;
- begun but never answered (the process died): the same release id, hence the same seeds and the
  same ledger key, so the redone release is the one already charged; its first result never left;
- forgotten (the cache keeps the last :data:`KEEP_REPLIES` answers): a new release id, trained and
  charged again.

So for every release id at most one output leaves the device, and every output is in the ledger.

Layout, beside the ledger (the device's private state; never beside an export)::

    releases/release.key          32 secret bytes (0600)
    releases/<digest>.json        release id, kind, the plan's run id and round
    releases/<digest>.reply       the reply's bytes (Flower's RecordDict protobuf)
    releases/lock                 one message at a time on this device
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611

from fedvox.shared.atomic import atomic_path, atomic_write_text
from fedvox.shared.errors import PrivacyError
from fedvox.shared.privacy.ledger import LedgerRow

FOLDER = "releases"
KEY_FILE = "release.key"
KEEP_REPLIES = 8
"""Answers kept for replays (a LoRA subset is a few MB each); older questions are trained again."""
_RELEASE_RUN_ID = re.compile(r"/r-[0-9a-f]{16}\Z")
"""The end of a ledger run id that a server's message made: ``<plan run id>/<release id>``."""


@dataclass(frozen=True)
class Entry:
    """One question this device took on: the release it made (or is making) for it."""

    release_id: str
    kind: str  # "train" or "evaluate"
    run_id: str
    server_round: int


def message_digest(message: Message) -> str:
    """SHA-256 of the message type and content: the same question gives the same digest whatever
    Flower's message id, group or time-to-live."""
    digest = hashlib.sha256(message.metadata.message_type.encode())
    for name, record in sorted(message.content.items()):
        digest.update(f"\0{name}\0{type(record).__name__}\0".encode())
        if isinstance(record, ArrayRecord):
            for key, array in record.items():
                digest.update(f"{key}\0{array.dtype}\0{array.shape}\0".encode())
                digest.update(array.data)
        elif isinstance(record, (ConfigRecord, MetricRecord)):
            digest.update(json.dumps(dict(record), sort_keys=True, default=repr).encode())
        else:
            raise PrivacyError(f"cannot identify a message holding a {type(record).__name__} record")
    return digest.hexdigest()


def answers_a_server(row: LedgerRow) -> bool:
    """Whether a ledger row is a release this device made for a server's message (train or
    evaluate), as opposed to its owner's local training (``local-...``, accounted at ``q = B/N``).

    These rows are the *federation account*: every parameter of theirs is the plan's or a public
    constant, so the epsilon they compose to depends on no private value (docs/privacy.md). The
    release id is the device's, so no plan run id makes a local row look like one or back.
    """
    return _RELEASE_RUN_ID.search(row.run_id) is not None


@dataclass(frozen=True)
class ReleaseSeeds:
    """A release's randomness: torch generator seeds (sampling, noise where no key is used, and
    the stochastic rounding of its update on the wire) and the 32-byte key of its secure noise stream."""

    noise: int
    sample: int
    noise_key: bytes
    rounding: int


def release_seeds(key: bytes, release_id: str) -> ReleaseSeeds:
    """A release's seeds: HMAC-SHA256 of its id under ``key``.

    Unpredictable to anyone without the key, and the same for a release redone after a crash, so
    that redo is the release already charged. Tests pass a known key to get reproducible noise.
    """

    def derive(purpose: str) -> bytes:
        return hmac.new(key, f"{purpose}:{release_id}".encode(), hashlib.sha256).digest()

    noise, sample, rounding = (int.from_bytes(derive(p)[:8], "big") >> 1 for p in ("noise", "sample", "rounding"))
    return ReleaseSeeds(noise, sample, derive("noise-key"), rounding)


class ReleaseBook:
    """The release ids and replies of one ledger folder (module docstring)."""

    def __init__(self, ledger_folder: str | os.PathLike[str]) -> None:
        self.root = Path(ledger_folder) / FOLDER
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    @contextmanager
    def locked(self) -> Iterator[ReleaseBook]:
        """Hold the device's message lock (two processes never make one release twice)."""
        with open(self.root / "lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield self
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ questions
    def entry(self, digest: str) -> Entry | None:
        path = self.root / f"{digest}.json"
        if not path.is_file():
            return None
        try:
            return Entry(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise PrivacyError(
                f"{path} is damaged ({exc}); move it away to answer that message as a new release"
            ) from exc

    def reply(self, digest: str) -> RecordDict | None:
        """The stored answer to ``digest``, exactly as it was sent, or ``None``."""
        path = self.root / f"{digest}.reply"
        if not path.is_file():
            return None
        proto = ProtoRecordDict()
        proto.ParseFromString(path.read_bytes())
        return recorddict_from_proto(proto)

    def begin(self, digest: str, kind: str, run_id: str, server_round: int) -> Entry:
        """The release for ``digest``: the one begun before (a crash), or a new one, recorded now."""
        entry = self.entry(digest)
        if entry is None:
            entry = Entry(f"r-{secrets.token_hex(8)}", kind, run_id, server_round)  # see _RELEASE_RUN_ID
            atomic_write_text(self.root / f"{digest}.json", json.dumps(asdict(entry)) + "\n")
        return entry

    def finish(self, digest: str, content: RecordDict) -> None:
        """Store the answer before it is sent; forget the oldest answers past :data:`KEEP_REPLIES`."""
        with atomic_path(self.root / f"{digest}.reply") as tmp:
            tmp.write_bytes(recorddict_to_proto(content).SerializeToString(deterministic=True))
        answered = sorted(self.root.glob("*.reply"), key=lambda p: p.stat().st_mtime_ns)
        for old in answered[:-KEEP_REPLIES]:
            old.with_suffix(".json").unlink(missing_ok=True)  # the question first: never a reply without it
            old.unlink(missing_ok=True)

    def answered(self, kind: str, run_id: str, server_round: int) -> int:
        """How many distinct questions of ``kind`` this device took on for one run and round."""
        count = 0
        for path in self.root.glob("*.json"):
            entry = self.entry(path.stem)
            if entry is not None and (entry.kind, entry.run_id, entry.server_round) == (kind, run_id, server_round):
                count += 1
        return count

    # ------------------------------------------------------------------ secret randomness
    def seeds(self, release_id: str) -> ReleaseSeeds:
        """A release's seeds under this device's secret key (:func:`release_seeds`)."""
        return release_seeds(self._key(), release_id)

    def _key(self) -> bytes:
        path = self.root / KEY_FILE
        if not path.is_file():
            candidate = self.root / f".{KEY_FILE}.{secrets.token_hex(4)}"
            with atomic_path(candidate) as tmp:  # mkstemp: 0600 from the start
                tmp.write_bytes(secrets.token_bytes(32))
            try:
                os.link(candidate, path)  # another process's key wins
            except FileExistsError:
                pass
            finally:
                candidate.unlink(missing_ok=True)
        if path.stat().st_mode & 0o077:
            raise PrivacyError(f"{path} is readable by other users; run `chmod 600 {path}`")
        return path.read_bytes()


__all__ = [
    "KEEP_REPLIES",
    "Entry",
    "ReleaseBook",
    "ReleaseSeeds",
    "answers_a_server",
    "message_digest",
    "release_seeds",
]
