"""What every fedvox command-line tool shares: one-line errors, logging and progress bars."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
from collections.abc import Callable

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fedvox.shared.errors import FedvoxError

console = Console(stderr=True)

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


def setup_logging(verbose: bool = False) -> None:
    """Log through rich to stderr; ``verbose`` shows DEBUG messages."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
        force=True,
    )


def progress() -> Progress:
    """A progress bar for long work (transient-free, written to stderr)."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def run_cli(app: Callable[[], object]) -> None:
    """Run a command group; a :class:`FedvoxError` becomes one red line and exit status 2."""
    set_offline_env()
    try:
        app()
    except FedvoxError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
