"""The privacy ledger: an append-only SQLite record of every privacy release.

One row per release (a client's DP-SGD round, a server's DP-FedAvg round). The ledger *is* the
accountant's state: a row's ``epsilon`` is recomputed from all earlier rows of the same client
and unit plus the new mechanism, so a client that trains three rounds in three processes records
exactly what one process would. Robustness, layer by layer:

- SQLite triggers refuse UPDATE and DELETE; rows can only be appended.
- Each row stores the SHA-256 of the previous row and of itself (a hash chain), so an edit or a
  deletion made behind the triggers' back is detectable (:mod:`shared.privacy.audit`).
- ``(run_id, round, client_id, stage, unit)`` is unique: a resumed run that appends the same
  release again gets the existing row back and is not charged twice.
- Appends run in ``BEGIN IMMEDIATE`` transactions (one writer at a time, across processes), in
  WAL mode with full fsync, and re-check the budget under that lock.

The ledger also keeps its owner's decisions (:class:`OwnerBudget`, table ``budgets``, append-only
too): the epsilon budget and the delta a client's releases are accounted at. They are set on the
device (``prepare``/``enroll``), never taken from a server's plan.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, astuple, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path

from fedvox.shared.errors import ConfigError, LedgerIntegrityError, PrivacyError
from fedvox.shared.privacy.accounting import (
    DEFAULT_ACCOUNTANT,
    Mechanism,
    accountant_version,
    epsilon,
    shared_batch_noise_multiplier,
)
from fedvox.shared.privacy.budget import Budget

log = logging.getLogger(__name__)

LEDGER_FILENAME = "privacy_ledger.sqlite"
SCHEMA_VERSION = 1
GENESIS_HASH = "0" * 64
"""``prev_hash`` of the first row."""

UNITS = ("utterance", "speaker")
"""utterance: one recording of a client (DP-SGD on the client); speaker: everything one speaker
contributes (DP-FedAvg on the server)."""

POISSON_GAUSSIAN = "poisson_gaussian"
POISSON_GAUSSIAN_SHARED_BATCH = "poisson_gaussian_shared_batch"
MECHANISMS = (POISSON_GAUSSIAN, POISSON_GAUSSIAN_SHARED_BATCH)

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS releases (
        id                 INTEGER PRIMARY KEY,
        created_at         TEXT    NOT NULL,
        run_id             TEXT    NOT NULL,
        round              INTEGER NOT NULL,
        client_id          TEXT    NOT NULL,
        stage              TEXT    NOT NULL,
        unit               TEXT    NOT NULL,
        mechanism          TEXT    NOT NULL,
        noise_multiplier   REAL    NOT NULL,
        sample_rate        REAL    NOT NULL,
        steps              INTEGER NOT NULL,
        clip_norm          REAL,
        components         TEXT    NOT NULL,
        delta              REAL    NOT NULL,
        accountant         TEXT    NOT NULL,
        accountant_version TEXT    NOT NULL,
        epsilon            REAL    NOT NULL,
        budget_epsilon     REAL,
        code_version       TEXT    NOT NULL,
        prev_hash          TEXT    NOT NULL,
        row_hash           TEXT    NOT NULL UNIQUE,
        UNIQUE (run_id, round, client_id, stage, unit)
    )""",
    # Every append reads one client's rows at one unit: a server ledger holds every speaker's.
    "CREATE INDEX IF NOT EXISTS releases_account ON releases (client_id, unit, id)",
    # The owner's budget decisions, newest last (an owner may change the epsilon, never the delta).
    """CREATE TABLE IF NOT EXISTS budgets (
        id        INTEGER PRIMARY KEY,
        set_at    TEXT    NOT NULL,
        client_id TEXT    NOT NULL,
        epsilon   REAL    NOT NULL,
        delta     REAL    NOT NULL
    )""",
    """CREATE TRIGGER IF NOT EXISTS budgets_append_only_update BEFORE UPDATE ON budgets
    BEGIN SELECT RAISE(ABORT, 'the owner budget log is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS budgets_append_only_delete BEFORE DELETE ON budgets
    BEGIN SELECT RAISE(ABORT, 'the owner budget log is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS releases_append_only_update BEFORE UPDATE ON releases
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only: rows cannot be updated'); END""",
    """CREATE TRIGGER IF NOT EXISTS releases_append_only_delete BEFORE DELETE ON releases
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only: rows cannot be deleted'); END""",
)

TRIGGERS = ("releases_append_only_update", "releases_append_only_delete")
"""The triggers the audit checks (the ``budgets`` table has its own pair)."""


DEFAULT_BUDGET_EPSILON = 10.0
"""The utterance-level budget a device gets when its owner chose none."""
MAX_DELTA = 1e-5


def default_delta(num_examples: int) -> float:
    """At most ``1e-5`` and at most ``1 / (10 N)``, rounded down to a power of ten.

    Rounding keeps the delta from naming ``N`` exactly (it stays on the device anyway).
    """
    if num_examples < 1:
        raise ConfigError("a default delta needs at least one training utterance")
    return min(MAX_DELTA, 10.0 ** math.floor(math.log10(1.0 / (10 * num_examples))))


@dataclass(frozen=True)
class OwnerBudget:
    """What the device's owner allows one client identity: epsilon at delta (utterance level)."""

    client_id: str
    epsilon: float
    delta: float
    set_at: str = ""

    def __post_init__(self) -> None:
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ConfigError(f"a privacy budget must be a finite epsilon > 0, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"the budget's delta must be in (0, 1), got {self.delta}")


@dataclass(frozen=True)
class Component:
    """One Gaussian release among several made on the same Poisson batch (s2: G and D)."""

    name: str
    noise_multiplier: float
    clip_norm: float


@dataclass(frozen=True)
class Release:
    """What a caller wants recorded: who released what, under which mechanism.

    A plain DP-SGD or DP-FedAvg round has one ``clip_norm``. A shared-batch release (s2's
    generator and discriminator on one Poisson batch) lists its ``components`` instead and is
    accounted with their effective noise multiplier; build it with :meth:`shared_batch`.
    """

    run_id: str
    round: int
    client_id: str
    stage: str
    unit: str
    mechanism: Mechanism
    delta: float
    clip_norm: float | None = None
    components: tuple[Component, ...] = ()

    def __post_init__(self) -> None:
        for name in ("run_id", "client_id", "stage"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"release {name} must be a non-empty string, got {getattr(self, name)!r}")
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            raise ConfigError(f"release round must be an integer >= 0, got {self.round!r}")
        if self.unit not in UNITS:
            raise ConfigError(f"release unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"release delta must be in (0, 1), got {self.delta}")
        if self.components:
            if self.clip_norm is not None:
                raise ConfigError("a shared-batch release keeps its clip norms in its components")
            effective = shared_batch_noise_multiplier([c.noise_multiplier for c in self.components])
            if not math.isclose(effective, self.mechanism.noise_multiplier, rel_tol=1e-12):
                raise ConfigError(
                    f"noise_multiplier {self.mechanism.noise_multiplier} is not the effective noise "
                    f"{effective} of the components; build the release with Release.shared_batch"
                )
        elif self.clip_norm is None or not self.clip_norm > 0:
            raise ConfigError(f"release clip_norm must be > 0, got {self.clip_norm}")

    @classmethod
    def shared_batch(
        cls,
        *,
        run_id: str,
        round: int,
        client_id: str,
        stage: str,
        unit: str,
        sample_rate: float,
        steps: int,
        delta: float,
        components: tuple[Component, ...],
    ) -> Release:
        """Several Gaussian releases per step on one Poisson batch, accounted as one mechanism."""
        components = tuple(components)
        sigma = shared_batch_noise_multiplier([c.noise_multiplier for c in components])
        return cls(run_id, round, client_id, stage, unit, Mechanism(sigma, sample_rate, steps), delta, None, components)

    @property
    def kind(self) -> str:
        return POISSON_GAUSSIAN_SHARED_BATCH if self.components else POISSON_GAUSSIAN


@dataclass(frozen=True)
class LedgerRow:
    """One ledger row, column for column (docs/privacy.md explains each)."""

    id: int
    created_at: str
    run_id: str
    round: int
    client_id: str
    stage: str
    unit: str
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float | None
    components: str
    delta: float
    accountant: str
    accountant_version: str
    epsilon: float
    budget_epsilon: float | None
    code_version: str
    prev_hash: str
    row_hash: str

    def to_mechanism(self) -> Mechanism:
        """The accounted mechanism; raises :class:`ConfigError` if the recorded values are invalid."""
        return Mechanism(self.noise_multiplier, self.sample_rate, self.steps)

    def compute_hash(self) -> str:
        """SHA-256 over every column but ``row_hash`` (``prev_hash`` included: the chain)."""
        content = {k: v for k, v in asdict(self).items() if k != "row_hash"}
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=True)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


COLUMNS = tuple(f.name for f in fields(LedgerRow))


def read_rows(path: str | os.PathLike[str]) -> list[LedgerRow]:
    """Every row of the ledger at ``path`` (a file or the folder holding it), opened read-only.

    Reads whatever is there, valid or not, so the audit can judge it. Raises
    :class:`LedgerIntegrityError` if the file is not a fedvox ledger at all.
    """
    file = ledger_file(path)
    with _read_only(file) as con:
        try:
            cursor = con.execute(f"SELECT {', '.join(COLUMNS)} FROM releases ORDER BY rowid")
            return [LedgerRow(*row) for row in cursor]
        except sqlite3.DatabaseError as exc:
            raise LedgerIntegrityError(f"{file} is not a readable fedvox privacy ledger: {exc}") from exc


_OWNER_BUDGET_QUERY = (
    "SELECT client_id, epsilon, delta, set_at FROM budgets WHERE client_id = ? ORDER BY id DESC LIMIT 1"
)


def read_owner_budget(path: str | os.PathLike[str], client_id: str) -> OwnerBudget | None:
    """The owner's latest budget for ``client_id`` in the ledger at ``path``, read without writing
    (``None`` when there is no ledger or no budget yet), so a refused run leaves nothing behind."""
    file = ledger_file(path)
    if not file.is_file():
        return None
    with _read_only(file) as con:
        try:
            row = con.execute(_OWNER_BUDGET_QUERY, (client_id,)).fetchone()
        except sqlite3.OperationalError:  # a ledger from before owner budgets: none recorded
            return None
    return OwnerBudget(*row) if row else None


def read_triggers(path: str | os.PathLike[str]) -> set[str]:
    """Names of the triggers present in the ledger (the audit checks the append-only ones)."""
    file = ledger_file(path)
    with _read_only(file) as con:
        return {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}


def ledger_file(path: str | os.PathLike[str]) -> Path:
    """The ledger file for ``path``: the path itself, or ``LEDGER_FILENAME`` inside a folder."""
    path = Path(path)
    return path / LEDGER_FILENAME if path.is_dir() else path


class Ledger:
    """The append-only privacy ledger in ``folder`` (created if missing)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"ledger folder {folder} is a file; pass the folder that holds {LEDGER_FILENAME}")
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / LEDGER_FILENAME
        self._con = sqlite3.connect(self.path, timeout=120.0, isolation_level=None)
        try:
            self._con.execute("PRAGMA journal_mode = WAL")
            self._con.execute("PRAGMA synchronous = FULL")
            with self._transaction():
                version = self._con.execute("PRAGMA user_version").fetchone()[0]
                if version not in (0, SCHEMA_VERSION):
                    raise LedgerIntegrityError(
                        f"{self.path} has ledger schema version {version}; this fedvox reads "
                        f"version {SCHEMA_VERSION}. Use the fedvox release that wrote it."
                    )
                table, *extras = _SCHEMA
                self._con.execute(table)
                columns = tuple(row[1] for row in self._con.execute("PRAGMA table_info(releases)"))
                if columns != COLUMNS:
                    raise LedgerIntegrityError(
                        f"{self.path} holds a 'releases' table with columns {columns}, not a fedvox "
                        "privacy ledger; choose another folder"
                    )
                for statement in extras:
                    self._con.execute(statement)
                self._con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            self._con.close()
            raise LedgerIntegrityError(f"{self.path} is not a usable SQLite ledger: {exc}") from exc
        except BaseException:
            self._con.close()
            raise

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
    def rows(self, client_id: str | None = None, unit: str | None = None) -> list[LedgerRow]:
        """Rows in append order, optionally of one client and unit."""
        return self._select(self._con, client_id, unit)

    def history(self, client_id: str, unit: str) -> list[Mechanism]:
        """The mechanisms one client has released at one unit: the accountant's state."""
        return [row.to_mechanism() for row in self.rows(client_id, unit)]

    def spent(self, client_id: str, unit: str) -> float:
        """Cumulative epsilon recorded for one client and unit (0 before its first release)."""
        rows = self.rows(client_id, unit)
        return rows[-1].epsilon if rows else 0.0

    def head(self) -> str:
        """Hash of the last row: keep it elsewhere to detect a later truncation of the ledger."""
        row = self._con.execute("SELECT row_hash FROM releases ORDER BY id DESC LIMIT 1").fetchone()
        return row[0] if row else GENESIS_HASH

    def owner_budget(self, client_id: str) -> OwnerBudget | None:
        """The owner's latest budget for ``client_id``, or ``None`` if none was set."""
        row = self._con.execute(_OWNER_BUDGET_QUERY, (client_id,)).fetchone()
        return OwnerBudget(*row) if row else None

    # ------------------------------------------------------------------ writing
    def set_owner_budget(self, budget: OwnerBudget) -> OwnerBudget:
        """Record the owner's budget (call it from ``prepare``/``enroll``/the owner's CLI only).

        The epsilon may change (the owner's decision); the delta may not once a release exists,
        since every epsilon of a client is accounted at one delta. Raises :class:`PrivacyError`.
        """
        with self._transaction():
            current = self.owner_budget(budget.client_id)
            if current is not None and (current.epsilon, current.delta) == (budget.epsilon, budget.delta):
                return current
            released = self._select(self._con, budget.client_id, "utterance")
            fixed = released[0].delta if released else None
            if fixed is not None and fixed != budget.delta:
                raise PrivacyError(
                    f"client {budget.client_id!r} has releases accounted at delta={fixed:g} in {self.path}; "
                    f"its delta cannot become {budget.delta:g}. Keep delta {fixed:g}"
                )
            now = datetime.now(UTC).isoformat(timespec="microseconds")
            self._con.execute(
                "INSERT INTO budgets (set_at, client_id, epsilon, delta) VALUES (?, ?, ?, ?)",
                (now, budget.client_id, float(budget.epsilon), float(budget.delta)),
            )
        log.info(
            "privacy ledger: owner budget of %s set to epsilon %g at delta %g",
            budget.client_id,
            budget.epsilon,
            budget.delta,
        )
        return replace(budget, set_at=now)

    def append(
        self,
        release: Release,
        *,
        accountant: str = DEFAULT_ACCOUNTANT,
        budget: Budget | None = None,
        code_version: str | None = None,
    ) -> LedgerRow:
        """Record ``release`` and return its row, with the cumulative epsilon after it.

        Idempotent: the same release appended again returns the row already there. Raises
        :class:`BudgetExceededError` (and records nothing) if ``budget`` would be exceeded, and
        :class:`PrivacyError` if the release conflicts with what the ledger holds.
        """
        with self._transaction():
            existing = self._con.execute(
                f"SELECT {', '.join(COLUMNS)} FROM releases WHERE run_id = ? AND round = ? "
                "AND client_id = ? AND stage = ? AND unit = ?",
                (release.run_id, release.round, release.client_id, release.stage, release.unit),
            ).fetchone()
            if existing is not None:
                return _same_release(LedgerRow(*existing), release, accountant)
            previous = self._select(self._con, release.client_id, release.unit)
            _check_consistent(previous, release, accountant)
            history = [row.to_mechanism() for row in previous]
            subject = f"client {release.client_id!r} ({release.unit} level)"
            if budget is not None:
                cumulative = budget.check(
                    history, release.mechanism, delta=release.delta, accountant=accountant, subject=subject
                )
            else:
                cumulative = epsilon((*history, release.mechanism), release.delta, accountant)
            last = self._con.execute(
                "SELECT id, created_at, row_hash FROM releases ORDER BY id DESC LIMIT 1"
            ).fetchone()
            last_id, last_time, last_hash = last if last else (0, "", GENESIS_HASH)
            now = datetime.now(UTC).isoformat(timespec="microseconds")
            row = LedgerRow(
                id=last_id + 1,
                created_at=max(now, last_time),  # a clock stepping back must not break the order
                run_id=release.run_id,
                round=release.round,
                client_id=release.client_id,
                stage=release.stage,
                unit=release.unit,
                mechanism=release.kind,
                noise_multiplier=float(release.mechanism.noise_multiplier),
                sample_rate=float(release.mechanism.sample_rate),
                steps=release.mechanism.steps,
                clip_norm=None if release.clip_norm is None else float(release.clip_norm),
                components=_components_json(release.components),
                delta=float(release.delta),
                accountant=accountant,
                accountant_version=accountant_version(),
                epsilon=cumulative,
                budget_epsilon=None if budget is None else float(budget.epsilon),
                code_version=code_version or _code_version(),
                prev_hash=last_hash,
                row_hash="",
            )
            row = replace(row, row_hash=row.compute_hash())
            self._con.execute(
                f"INSERT INTO releases ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                astuple(row),
            )
        log.info(
            "privacy ledger: %s %s round %d %s-level epsilon %.4f (delta %g, %s)",
            row.client_id,
            row.stage,
            row.round,
            row.unit,
            row.epsilon,
            row.delta,
            row.accountant,
        )
        return row

    # ------------------------------------------------------------------ internals
    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One writer at a time across processes: take the write lock before reading."""
        self._con.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._con.execute("ROLLBACK")
            raise
        self._con.execute("COMMIT")

    @staticmethod
    def _select(con: sqlite3.Connection, client_id: str | None, unit: str | None) -> list[LedgerRow]:
        query = f"SELECT {', '.join(COLUMNS)} FROM releases"
        where = [(name, value) for name, value in (("client_id", client_id), ("unit", unit)) if value is not None]
        if where:
            query += " WHERE " + " AND ".join(f"{name} = ?" for name, _ in where)
        cursor = con.execute(query + " ORDER BY id", [value for _, value in where])
        return [LedgerRow(*row) for row in cursor]


def _same_release(row: LedgerRow, release: Release, accountant: str) -> LedgerRow:
    """The existing row if it records exactly ``release``; a conflict otherwise."""
    recorded = (
        row.mechanism,
        row.noise_multiplier,
        row.sample_rate,
        row.steps,
        row.clip_norm,
        row.components,
        row.delta,
        row.accountant,
    )
    asked = (
        release.kind,
        release.mechanism.noise_multiplier,
        release.mechanism.sample_rate,
        release.mechanism.steps,
        release.clip_norm,
        _components_json(release.components),
        release.delta,
        accountant,
    )
    if recorded != asked:
        raise PrivacyError(
            f"release run {row.run_id!r} round {row.round} client {row.client_id!r} stage "
            f"{row.stage!r} ({row.unit}) is already in the ledger (row {row.id}) with different "
            f"parameters {recorded}, now {asked}. A resumed run must replay the recorded release; "
            "a new release needs a new run_id or round."
        )
    log.info("privacy ledger: release already recorded as row %d; not charged again", row.id)
    return row


def _check_consistent(previous: list[LedgerRow], release: Release, accountant: str) -> None:
    """One delta and one accountant per client and unit, so epsilons stay comparable."""
    if not previous:
        return
    first = previous[0]
    if first.delta != release.delta or first.accountant != accountant:
        raise PrivacyError(
            f"client {release.client_id!r} ({release.unit} level) is accounted at delta="
            f"{first.delta:g} with {first.accountant!r} in this ledger; this release asks for "
            f"delta={release.delta:g} with {accountant!r}. Keep the ledger's delta and accountant."
        )


def _components_json(components: tuple[Component, ...]) -> str:
    return json.dumps([asdict(c) for c in components], sort_keys=True, separators=(",", ":"))


@contextmanager
def _read_only(file: Path) -> Iterator[sqlite3.Connection]:
    if not file.is_file():
        raise LedgerIntegrityError(f"no privacy ledger at {file}")
    if os.access(file.parent, os.W_OK):
        with _connect_read_only(file) as con:
            yield con
        return
    # SQLite cannot read a WAL database without writing its -shm index next to it: read a copy
    # (with any -wal file, so rows not yet checkpointed are not missed).
    with tempfile.TemporaryDirectory(prefix="fedvox-ledger-") as folder:
        for part in (file, file.with_name(file.name + "-wal")):
            if part.is_file():
                shutil.copyfile(part, Path(folder) / part.name)
        with _connect_read_only(Path(folder) / file.name, shown=file) as con:
            yield con


@contextmanager
def _connect_read_only(file: Path, shown: Path | None = None) -> Iterator[sqlite3.Connection]:
    shown = shown or file
    try:
        con = sqlite3.connect(f"{file.resolve().as_uri()}?mode=ro", uri=True, timeout=60.0)
    except sqlite3.Error as exc:
        raise LedgerIntegrityError(f"cannot open privacy ledger {shown}: {exc}") from exc
    try:
        yield con
    except sqlite3.DatabaseError as exc:
        raise LedgerIntegrityError(f"{shown} is not a readable fedvox privacy ledger: {exc}") from exc
    finally:
        con.close()


@functools.cache
def _code_version() -> str:
    """fedvox's version plus the git commit when run from a checkout."""
    try:
        version = importlib.metadata.version("fedvox")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    root = Path(__file__).resolve().parents[2]
    if (root / ".git").exists():
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
        if commit:
            return f"fedvox {version}+g{commit}"
    return f"fedvox {version}"


__all__ = [
    "COLUMNS",
    "DEFAULT_BUDGET_EPSILON",
    "GENESIS_HASH",
    "LEDGER_FILENAME",
    "MECHANISMS",
    "UNITS",
    "Component",
    "Ledger",
    "LedgerRow",
    "OwnerBudget",
    "Release",
    "default_delta",
    "ledger_file",
    "read_owner_budget",
    "read_rows",
    "read_triggers",
]
