"""What every fedvox command-line tool shares: one-line errors, logging and progress.

Every console script runs through :func:`run_cli`: a user's mistake (a :class:`FedvoxError` or
an operating-system error such as an unwritable folder) is one line and exit status 2; anything
else is a bug, reported in one line without its message (it may quote private data). Tracebacks
appear only with ``--debug`` (anywhere on the command line) or ``FEDVOX_DEBUG=1``, and never
with local variables: those hold transcripts and speaker names.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from types import TracebackType

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from fedvox.shared.errors import FedvoxError, Interrupted

console = Console(stderr=True)

DEBUG_FLAG = "--debug"
DEBUG_ENV = "FEDVOX_DEBUG"
EXIT_USER_ERROR = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130

# Flower and Ray call home by default; nothing fedvox starts may do so.
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def set_offline_env() -> None:
    """Switch off Flower telemetry, update checks and runtime installs, and Ray usage stats."""
    os.environ.update(OFFLINE_ENV)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"fedvox {importlib.metadata.version('fedvox')}")
        raise typer.Exit()


VERSION_OPTION = typer.Option(
    False, "--version", callback=_print_version, is_eager=True, help="Print fedvox's version and exit."
)
"""``--version`` for every command group's callback."""


def command_group(name: str, help: str) -> typer.Typer:
    """A fedvox command group: typer's rich tracebacks (which print local variables) off, help
    text as rich renders it (write a literal ``[`` as ``\\[``)."""
    return typer.Typer(
        name=name,
        help=help,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        pretty_exceptions_show_locals=False,
        epilog=f"Errors are one line; add {DEBUG_FLAG} (or set {DEBUG_ENV}=1) for a traceback.",
    )


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr, ``verbose`` showing DEBUG messages: through rich on a terminal, as plain
    unwrapped time-stamped lines when stderr is a file or pipe (a log stays greppable)."""
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)


def progress() -> Progress:
    """A progress bar for long work (transient-free, written to stderr)."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    )


class StepProgress:
    """Progress of a long loop: a bar on a terminal; when stderr is a file or pipe (a log, a
    service), a line every ``every_s`` seconds with done/total, the measured rate and an ETA.

    The rate counts only what this process did (a resumed run's earlier steps do not inflate it).
    """

    def __init__(self, what: str, total: int, done: int = 0, *, visible: bool = True, every_s: float = 30.0) -> None:
        self.what, self.total, self.visible, self.every_s = what, total, visible, every_s
        self.lines = not console.is_terminal
        self._first = done
        self._start = self._last = time.monotonic()
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> StepProgress:
        if self.visible and not self.lines:
            self._bar = progress()
            self._bar.__enter__()
            self._task = self._bar.add_task(self.what, total=self.total, completed=self._first)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(kind, error, trace)

    def update(self, done: int, *_: object) -> str | None:
        """Record ``done`` units; returns the line printed, if one was due."""
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=done)
            return None
        now = time.monotonic()
        if not self.visible or (now - self._last < self.every_s and done < self.total):
            return None
        self._last = now
        line = f"{self.what}: {done}/{self.total}{eta(done - self._first, self.total - done, now - self._start)}"
        console.print(line, markup=False, highlight=False, soft_wrap=True)
        return line


def eta(done: int, left: int, elapsed_s: float) -> str:
    """``", 1.2/s, 3 min left"`` from the rate measured so far (empty before the first unit)."""
    if done <= 0 or elapsed_s <= 0:
        return ""
    rate = done / elapsed_s
    return f", {rate:.2f}/s, {duration(left / rate)} left"


def duration(seconds: float) -> str:
    """A duration for people: ``42 s``, ``7 min``, ``2 h 05 min``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def run_cli(
    app: typer.Typer,
    args: Sequence[str] | None = None,
    prog_name: str | None = None,
    renamed: Mapping[str, Mapping[str, str]] | None = None,
) -> None:
    """Run a command group (``args`` default to the command line) and turn failures into one line.

    ``--debug`` may appear anywhere among ``args``; it is taken out before the group parses them.
    ``renamed`` maps a command to its options' old names and new ones (hidden aliases).
    """
    set_offline_env()
    args = list(sys.argv[1:] if args is None else args)
    debug = DEBUG_FLAG in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    args = rename_options([arg for arg in args if arg != DEBUG_FLAG], renamed or {})
    try:
        status = app(args=args, prog_name=prog_name, standalone_mode=False)
    except SystemExit:
        raise
    except BaseException as exc:
        if debug:
            raise
        line, code = describe(exc)
        console.print(line, markup=False, highlight=False, soft_wrap=True)
        sys.exit(code)
    if isinstance(status, int) and status:  # typer.Exit(code) returns its code without standalone mode
        sys.exit(status)


def rename_options(args: list[str], renamed: Mapping[str, Mapping[str, str]]) -> list[str]:
    """Old option names keep working for one release, hidden from ``--help``: each becomes its
    new name, with a note saying so."""
    command = next((arg for arg in args if not arg.startswith("-")), None)
    table = renamed.get(command or "", {})
    out = []
    for arg in args:
        name, equals, value = arg.partition("=")
        if name in table:
            console.print(
                f"note: {name} is now {table[name]}; the old name goes away in the next release",
                markup=False,
                highlight=False,
            )
            arg = table[name] + equals + value
        out.append(arg)
    return out


def describe(exc: BaseException) -> tuple[str, int]:
    """The one line a user sees for ``exc`` and the exit status."""
    import click

    if isinstance(exc, Interrupted):
        return f"interrupted: {exc}", EXIT_INTERRUPTED
    if isinstance(exc, (KeyboardInterrupt, click.exceptions.Abort)):
        return "interrupted", EXIT_INTERRUPTED
    if isinstance(exc, click.exceptions.Exit):
        sys.exit(exc.exit_code)
    if isinstance(exc, click.exceptions.ClickException):
        exc.show()
        sys.exit(exc.exit_code)
    if isinstance(exc, FedvoxError):
        return f"error: {exc}", EXIT_USER_ERROR
    if isinstance(exc, OSError) and exc.strerror:
        return f"error: {os_error(exc)}", EXIT_USER_ERROR
    if isinstance(exc, MemoryError) or "out of memory" in str(exc):
        return (
            "error: out of memory; pin a smaller --physical-batch, or another --device or --precision "
            "(`fedvox-client probe` shows what fits)",
            EXIT_USER_ERROR,
        )
    # Its message may quote private data (a transcript, a speaker): the type says enough to report it.
    return (
        f"error: internal error ({type(exc).__name__}); this is a fedvox bug: run the command again with "
        f"{DEBUG_FLAG} and report the traceback (it may show your file names: check before sharing)",
        EXIT_BUG,
    )


def os_error(exc: OSError) -> str:
    """What, where and how to fix, for an operating-system error."""
    where = f" {exc.filename}" if exc.filename else ""
    fixes = {
        PermissionError: "check its permissions or choose a folder you can write to",
        FileNotFoundError: "check the path",
        IsADirectoryError: "pass a file, not a folder",
        NotADirectoryError: "a part of the path is a file, not a folder; check the path",
        FileExistsError: "choose another path",
    }
    fix = next((text for kind, text in fixes.items() if isinstance(exc, kind)), None)
    if fix is None and exc.errno == 28:
        fix = "free some disk space"
    if fix is None and exc.errno == 30:
        fix = "choose a folder on a writable disk"
    return f"cannot use{where}: {exc.strerror}" + (f"; {fix}" if fix else "")
