"""``fedvox-server``: what an operator runs beside ``flwr run`` (inspect a run, export its model).

A run itself starts with ``flwr run .`` (simulation or a SuperLink deployment, docs/federation.md);
re-running it with the same ``checkpoint-dir`` resumes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from shared.cli import console, run_cli, setup_logging

app = typer.Typer(
    name="fedvox-server",
    help="Inspect a federated run's checkpoints, metrics and speaker-level ledger; export its model.",
    no_args_is_help=True,
    add_completion=False,
)

RUN_DIR = typer.Argument(..., help="The run directory (the run's checkpoint-dir).", exists=True, file_okay=False)


@app.command()
def status(
    run_dir: Path = RUN_DIR,
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Committed rounds, the newest round's metrics, the best round and speaker-level epsilons."""
    summary = run_summary(run_dir)
    if json_output:
        typer.echo(json.dumps(summary, indent=1, sort_keys=True))
        return
    latest = summary["latest"]
    console.print(f"run {summary['run-id']} in {run_dir}", highlight=False)
    console.print(
        f"round {latest['round']} of {summary['num-server-rounds']} committed; checkpoints kept: "
        f"{summary['kept']}; best round {summary['best-round']}",
        highlight=False,
    )
    for key in ("train-loss", "val-loss", "participants", "rejects", "epsilon-utterance-max", "epsilon-speaker-max"):
        if key in latest["metrics"]:
            console.print(f"  {key}: {latest['metrics'][key]}", highlight=False)
    if summary["speakers"]:
        worst = max(summary["speakers"].values())
        console.print(f"speaker-level epsilon: {len(summary['speakers'])} speakers, max {worst:.3f}", highlight=False)


@app.command()
def export(
    run_dir: Path = RUN_DIR,
    round_: int | None = typer.Option(None, "--round", help="Round to export (default: the best, else the newest)."),
    out: Path | None = typer.Option(None, help="Output folder (default: RUN_DIR/export)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logging."),
) -> None:
    """Write a committed round's global model, LoRA merged: fedvox safetensors, and GPT-SoVITS's
    own formats when the architecture is official."""
    from server.checkpoints import CheckpointStore
    from server.model import export_model
    from shared.errors import CheckpointError
    from shared.runconfig import RunConfig

    setup_logging(verbose)
    store = CheckpointStore(run_dir / "checkpoints", keep=1)
    chosen = round_ if round_ is not None else (store.best_round() or (store.rounds() or [None])[-1])
    if chosen is None or chosen not in store.rounds():
        raise CheckpointError(f"{run_dir} has no committed round {chosen}; committed: {store.rounds()}")
    checkpoint = store.load(chosen)
    config = RunConfig.from_flat(checkpoint.meta["run-config"])
    for path in export_model(config, checkpoint.state, out or run_dir / "export"):
        console.print(f"wrote {path} (round {chosen})", highlight=False)


def run_summary(run_dir: Path) -> dict[str, Any]:
    """What ``status`` shows, as a dict."""
    from server.checkpoints import CheckpointStore
    from shared.errors import CheckpointError
    from shared.privacy.ledger import LEDGER_FILENAME, read_rows

    store = CheckpointStore(run_dir / "checkpoints", keep=1)
    rounds = store.rounds()
    if not rounds:
        raise CheckpointError(f"{run_dir} holds no committed round (no checkpoints/round-*.json)")
    latest = store.load(rounds[-1]).meta
    speakers: dict[str, float] = {}
    if (run_dir / LEDGER_FILENAME).is_file():
        for row in read_rows(run_dir):
            if row.unit == "speaker":
                speakers[row.client_id] = row.epsilon
    return {
        "run-id": latest["run-id"],
        "kept": rounds,
        "num-server-rounds": latest["run-config"]["num-server-rounds"],
        "best-round": store.best_round(),
        "latest": {"round": rounds[-1], "metrics": latest["metrics"]},
        "speakers": speakers,
    }


def main() -> None:
    run_cli(app)


__all__ = ["app", "main", "run_summary"]
