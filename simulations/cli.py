"""``fedvox-sim``: simulate a federation of synthetic speakers on one machine.

Each command imports its implementation when it runs, so ``--help`` stays fast and the
speaker generator's worker processes never pull in torch or Flower.
"""

from __future__ import annotations

from pathlib import Path

import typer

from shared.cli import run_cli, setup_logging

app = typer.Typer(
    name="fedvox-sim",
    help="Generate synthetic speakers and simulate a federation of them on this machine.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _options(verbose: bool = typer.Option(False, "--verbose", help="Show debug messages.")) -> None:
    setup_logging(verbose)


@app.command()
def speakers(
    n: int = typer.Option(8, "--n", help="Speakers that become federated clients."),
    utterances: int = typer.Option(
        20, "--utterances", help="Training utterances per client (the mean with --zipf)."),
    out: Path = typer.Option(
        ..., "--out", help="Output folder: new, empty, or an earlier speakers output."),
    lang: str = typer.Option("mix", "--lang", help="en, zh, or mix (half the speakers each)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same files (on one espeak-ng version)."),
    zipf: float = typer.Option(
        0.0, "--zipf", help="Zipf exponent for unequal amounts per client (0 = equal)."),
    heldout_utterances: int = typer.Option(
        2, "--heldout-utterances", help="Held-out utterances per client and per unseen speaker."),
    unseen_speakers: int = typer.Option(
        2, "--unseen-speakers", help="Extra speakers with held-out utterances only."),
    engine: str = typer.Option(
        "auto", "--engine", help="auto (espeak-ng, else pseudo-speech), espeak-ng or pseudo-speech."),
    workers: int | None = typer.Option(None, "--workers", help="Processes (default: all usable CPUs)."),
) -> None:
    """Generate distinct synthetic speakers: 32 kHz WAVs, GPT-SoVITS lists and a manifest."""
    from simulations.speakers import SpeakersConfig, generate_speakers

    config = SpeakersConfig(n_speakers=n, utterances=utterances, language=lang, seed=seed, zipf=zipf,
                            heldout_utterances=heldout_utterances, unseen_speakers=unseen_speakers,
                            engine=engine, workers=workers)
    manifest = generate_speakers(out, config)
    totals, check = manifest["totals"], manifest["speaker_check"]
    engine_name = manifest["engine"]["name"] + (" (FALLBACK)" if manifest["engine"]["fallback"] else "")
    accuracy = f"{check['accuracy']:.0%} (chance {check['chance']:.0%})" if "accuracy" in check else "n/a"
    typer.echo(
        f"{totals['clients']} clients + {totals['unseen_speakers']} unseen speakers, "
        f"{totals['utterances']} utterances, {totals['seconds'] / 60:.1f} min, "
        f"{totals['bytes'] / 1e6:.1f} MB, engine {engine_name}\n"
        f"speaker-ID check: {accuracy}\n"
        f"manifest: {Path(out) / 'manifest.json'}"
    )


def main() -> None:
    """Console-script entry point."""
    run_cli(app)
