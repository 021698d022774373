"""``fedvox-client``: what a device owner runs."""

from __future__ import annotations

from pathlib import Path

import typer

from shared.cli import console, run_cli, setup_logging

app = typer.Typer(
    name="fedvox-client",
    help="Probe this device, prepare private recordings, train locally and join a federation.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _group() -> None:
    """Keep ``fedvox-client COMMAND`` a command group even while only one command is registered."""


@app.command()
def prepare(
    list_file: Path = typer.Argument(..., help="GPT-SoVITS list file: audio_path|speaker|language|text per line."),
    out: Path = typer.Option(..., "--out", help="Feature cache folder (created; run again to resume or update)."),
    config: str = typer.Option("v2", help="Model config whose phoneme symbol table to use: tiny, v1, v2, v2Pro, v2ProPlus."),
    hubert: Path | None = typer.Option(None, help="chinese-hubert-base folder (Hugging Face format) for GPT-SoVITS's semantic tokens."),
    s2: Path | None = typer.Option(None, help="GPT-SoVITS s2G .pth whose ssl_proj and codebook turn HuBERT features into tokens."),
    device: str | None = typer.Option(None, help="Where HuBERT runs: cpu, cuda, cuda:1 (default: cuda if available)."),
    data_root: Path | None = typer.Option(None, help="Recordings must lie under this folder (default: the list file's folder)."),
    workers: int | None = typer.Option(None, min=1, help="Processes for featurising (default: all cores for 400+ utterances, else 1)."),
    max_clipped: float = typer.Option(0.001, min=0.0, max=1.0, help="Reject a recording with more than this fraction of full-scale samples."),
    json_output: bool = typer.Option(False, "--json", help="Print report.json to stdout."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logging."),
) -> None:
    """Check every recording of LIST, featurise the good ones into --out, and explain each rejection.

    Recordings are only read, never modified or sent anywhere. Without --hubert/--s2, semantic
    tokens come from fedvox's offline fallback tokenizer (see docs/data.md).
    """
    from client.data.checks import AudioLimits
    from client.data.prepare import prepare as run_prepare
    from shared.errors import DataError
    from shared.models.config import s1_config
    from shared.semantic import tokenizer_spec

    setup_logging(verbose)
    report = run_prepare(
        list_file, out,
        tokenizer=tokenizer_spec(hubert, s2, device),
        symbols_version=s1_config(config).symbols_version,
        data_root=data_root,
        limits=AudioLimits(max_clipped_fraction=max_clipped),
        workers=workers,
    )
    console.print(report.summary(), markup=False, highlight=False, soft_wrap=True)
    if json_output:
        typer.echo(report.to_json(), nl=False)
    if report.accepted == 0:
        reasons = ", ".join(f"{reason} {count}" for reason, count in report.reasons.items())
        raise DataError(
            f"none of the {len(report.rejected)} entries of {list_file} was accepted ({reasons}); "
            f"see {out / 'report.txt'} for each entry and its fix"
        )


def main() -> None:
    """Console-script entry point."""
    run_cli(app)
