"""``fedvox-client``: what a device owner runs."""

from __future__ import annotations

import typer

from shared.cli import run_cli

app = typer.Typer(
    name="fedvox-client",
    help="Probe this device, prepare private recordings, train locally and join a federation.",
    no_args_is_help=True,
    add_completion=False,
)


def main() -> None:
    """Console-script entry point."""
    run_cli(app)
