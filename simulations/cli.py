"""``fedvox-sim``: simulate a federation of synthetic speakers on one machine.

Each command imports its implementation when it runs, so ``--help`` stays fast and the
speaker generator's worker processes never pull in torch or Flower.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import click
import typer

from fedvox.shared.cli import VERSION_OPTION, command_group, run_cli, setup_logging

app = command_group(
    "fedvox-sim",
    "Generate synthetic speakers and simulate a federation of them on this machine.",
)


@app.callback()
def _options(
    verbose: bool = typer.Option(False, "--verbose", help="Show debug messages."), version: bool = VERSION_OPTION
) -> None:
    setup_logging(verbose)


@app.command()
def speakers(
    n: int = typer.Option(8, "--n", help="Speakers that become federated clients."),
    utterances: int = typer.Option(20, "--utterances", help="Training utterances per client (the mean with --zipf)."),
    out: Path = typer.Option(..., "--out", help="Output folder: new, empty, or an earlier speakers output."),
    lang: str = typer.Option("mix", "--lang", help="en, zh, or mix (half the speakers each)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same files (on one espeak-ng version)."),
    zipf: float = typer.Option(0.0, "--zipf", help="Zipf exponent for unequal amounts per client (0 = equal)."),
    heldout_utterances: int = typer.Option(
        2, "--heldout-utterances", help="Held-out utterances per client and per unseen speaker."
    ),
    unseen_speakers: int = typer.Option(2, "--unseen-speakers", help="Extra speakers with held-out utterances only."),
    engine: str = typer.Option(
        "auto", "--engine", help="auto (espeak-ng, else pseudo-speech), espeak-ng or pseudo-speech."
    ),
    workers: int | None = typer.Option(None, "--workers", help="Processes (default: all usable CPUs)."),
) -> None:
    """Generate distinct synthetic speakers: 32 kHz WAVs, GPT-SoVITS lists and a manifest."""
    from fedvox.shared.settings import parse
    from fedvox.simulations.speakers import SpeakersConfig, generate_speakers

    options = {
        "n": n,
        "utterances": utterances,
        "lang": lang,
        "seed": seed,
        "zipf": zipf,
        "heldout-utterances": heldout_utterances,
        "unseen-speakers": unseen_speakers,
        "engine": engine,
        "workers": workers,
    }
    config = parse(SpeakersConfig, options, prefix="--")  # a bad value is named as its option
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


@app.command()
def run(
    out: Path = typer.Option(..., "--out", help="Output folder: new, empty, or an earlier run's (to continue it)."),
    speakers: int | None = typer.Option(None, "--speakers", help="Synthetic speakers, one client each (default: 8)."),
    rounds: int | None = typer.Option(None, "--rounds", help="Federated rounds (default: 3)."),
    stage: str | None = typer.Option(None, "--stage", help="s1 (GPT) or s2 (SoVITS) (default: s1)."),
    fleet: str | None = typer.Option(
        None, "--fleet", help="Device fleet: mixed, uniform-cpu, or a fleet .toml file (default: mixed)."
    ),
    epsilon: float | None = typer.Option(
        None,
        "--epsilon",
        help="Target utterance-level epsilon per client over the run; 0: use dp.noise-multiplier (default: 8).",
    ),
    speaker_dp: bool | None = typer.Option(
        None, "--speaker-dp/--no-speaker-dp", help="Speaker-level DP-FedAvg on the server (default: off)."
    ),
    clients_per_round: int | None = typer.Option(
        None, "--clients-per-round", help="At most this many clients train a round; 0: all (default: 10)."
    ),
    utterances: int | None = typer.Option(None, "--utterances", help="Training utterances per speaker (default: 20)."),
    lang: str | None = typer.Option(None, "--lang", help="en, zh or mix (default: mix)."),
    zipf: float | None = typer.Option(
        None, "--zipf", help="Zipf exponent of the clients' utterance counts (0 = equal; default: 0)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Speakers, fleet, dropouts and sampling (default: 0)."),
    local_baselines: int | None = typer.Option(
        None, "--local-baselines", help="Clients that also train alone, as a baseline (default: 8)."
    ),
    central_baseline: bool | None = typer.Option(
        None, "--central-baseline/--no-central-baseline", help="Also train a non-private central model (default: on)."
    ),
    quality_sentences: int | None = typer.Option(
        None,
        "--quality-sentences",
        help="Held-out sentences per speaker every model speaks for the speech-quality "
        "comparison; 0: none (default: 2).",
    ),
    scenario: Path | None = typer.Option(
        None, "--scenario", help="Scenario TOML: the speakers and one or more runs (simulations/scenarios/)."
    ),
    run_config: list[str] = typer.Option(
        [], "--run-config", help='Run-configuration overrides, as for flwr run: "local-steps=3 logical-batch=4".'
    ),
    speakers_dir: Path | None = typer.Option(
        None, "--speakers-dir", help="Use these `fedvox-sim speakers` speakers instead of generating them."
    ),
    workers: int | None = typer.Option(
        None, "--workers", min=1, help="ClientApps training at once on this machine (default: usable CPUs)."
    ),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="Run the clients on this Ray cluster (e.g. auto) instead of a local one."
    ),
    dashboard: bool = typer.Option(
        False,
        "--dashboard",
        help="Serve fedvox-server's dashboard of OUT on 127.0.0.1 (URL printed) while the "
        "simulation runs and after it, until Ctrl-C.",
    ),
) -> None:
    """Simulate a federation of synthetic speakers on a device fleet and write OUT/report.md."""
    from fedvox.simulations.runner import simulate
    from fedvox.simulations.scenario import build_scenario

    config = _parse_run_config(run_config)
    plan = build_scenario(
        scenario,
        speakers={"n_speakers": speakers, "utterances": utterances, "language": lang, "seed": seed, "zipf": zipf},
        run={
            "rounds": rounds,
            "stage": stage,
            "fleet": fleet,
            "epsilon": epsilon,
            "speaker_dp": speaker_dp,
            "clients_per_round": clients_per_round,
            "seed": seed,
            "local_baselines": local_baselines,
            "central_baseline": central_baseline,
            "quality_sentences": quality_sentences,
            "config": config or None,
        },
    )
    if speakers_dir is not None and speakers is None and scenario is None:
        from fedvox.simulations.features import client_speakers, read_manifest

        plan = _with_speakers(plan, len(client_speakers(read_manifest(speakers_dir))))
    served = _dashboard_when_ready(out) if dashboard else None
    report = simulate(plan, out, speakers_dir=speakers_dir, workers=workers, ray_address=ray_address)
    typer.echo(f"report: {report}")
    if served is not None:
        typer.echo("the dashboard keeps serving OUT; Ctrl-C ends it")
        with contextlib.suppress(KeyboardInterrupt):
            served.join()


def _dashboard_when_ready(out: Path) -> threading.Thread:
    """A thread that serves the dashboard of ``out`` once its first run folder exists (the
    dashboard then follows the run's metrics as they are written)."""

    def serve() -> None:
        from fedvox.server.dashboard import serve_dashboard
        from fedvox.server.dashboard.view import open_source

        while not any((out / "runs").glob("*/server")):
            time.sleep(2.0)
        server, url = serve_dashboard(open_source(out))
        typer.echo(f"dashboard of {out}: {url}")
        server.thread.join()

    thread = threading.Thread(target=serve, name="dashboard", daemon=True)
    thread.start()
    return thread


@app.command()
def pretrain(
    out: Path = typer.Option(..., "--out", help="State folder (outside the repository); re-run to continue."),
    stages: str = typer.Option("s1,s2", "--stages", help="Stages to train, in order: s1, s2 or s1,s2."),
    model_config: str = typer.Option("base", "--config", help="Model config of both stages (base, tiny, ...)."),
    utterances: int = typer.Option(60, "--utterances", help="Corpus utterances per voice."),
    valid_utterances: int = typer.Option(2, "--valid-utterances", help="Of which held out for validation."),
    corpus_lang: str = typer.Option("en,zh", "--corpus-lang", help="Corpus languages: en, zh or en,zh."),
    seed: int = typer.Option(0, "--seed", help="Corpus texts, initialisation and batch order."),
    s1_steps: int = typer.Option(3000, "--s1-steps", help="s1 optimizer steps (a re-run may raise it)."),
    s2_steps: int = typer.Option(3000, "--s2-steps", help="s2 optimizer steps (a re-run may raise it)."),
    s1_batch: int = typer.Option(16, "--s1-batch", help="s1 utterances per step."),
    s2_batch: int = typer.Option(8, "--s2-batch", help="s2 utterances per step."),
    s1_lr: float = typer.Option(1e-3, "--s1-lr", help="s1 peak learning rate."),
    s1_prompt_pairs: int = typer.Option(
        2,
        "--s1-prompt-pairs",
        min=0,
        help="s1: also train each utterance N times prompted by another of its speaker, as inference prompts it "
        "(0: single utterances only; such a base ends its prompted sentences early).",
    ),
    s2_lr: float = typer.Option(5e-4, "--s2-lr", help="s2 peak learning rate."),
    disc_start: int = typer.Option(
        1000, "--disc-start", help="s2 steps on mel and KL alone before the discriminator joins."
    ),
    eval_every: int = typer.Option(100, "--eval-every", help="Steps between validations and checkpoints."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="Torch CPU threads (default: torch's)."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: cuda when present)."),
) -> None:
    """Pretrain the shipped base non-privately on a public synthetic corpus (resumable)."""
    from fedvox.client.host import prepare_training_process
    from fedvox.shared.errors import ConfigError
    from fedvox.simulations.pretrain.corpus import CorpusConfig
    from fedvox.simulations.pretrain.pipeline import pretrain as run_pretrain
    from fedvox.simulations.pretrain.train import StagePlan

    prepare_training_process(threads)
    chosen = [s.strip() for s in stages.split(",") if s.strip()]
    if not chosen or not set(chosen) <= {"s1", "s2"}:
        raise ConfigError(f"--stages must list s1 and/or s2, got {stages!r}")
    common = {"model_config": model_config, "eval_every": eval_every, "seed": seed}
    plans = {
        "s1": StagePlan(
            "s1", steps=s1_steps, batch_size=s1_batch, learning_rate=s1_lr, prompt_pairs=s1_prompt_pairs, **common
        ),
        "s2": StagePlan(
            "s2", steps=s2_steps, batch_size=s2_batch, learning_rate=s2_lr, disc_start=disc_start, **common
        ),
    }
    corpus = CorpusConfig(
        utterances=utterances,
        valid=valid_utterances,
        seed=seed,
        languages=tuple(x.strip() for x in corpus_lang.split(",")),
    )
    provenance = run_pretrain(out, corpus, [plans[s] for s in chosen], device=device)
    for stage in chosen:
        record = provenance["stages"][stage]
        typer.echo(
            f"{stage}: {record['steps_done']} steps in {record['train_seconds'] / 60:.1f} min, "
            f"best valid loss {record['best']['valid_loss']:.4f} at step {record['best']['step']}"
        )
    typer.echo(f"provenance: {Path(out) / 'provenance.json'}")


@app.command("pretrain-export")
def pretrain_export(
    source: Path = typer.Option(..., "--from", help="A `fedvox-sim pretrain` state folder."),
    target: Path | None = typer.Option(
        None, "--to", help="Where the base goes (default: the shipped base in this installation, shared/models/base)."
    ),
    stages: str = typer.Option("s1,s2", "--stages", help="Stages to export: s1, s2 or s1,s2."),
    evaluate: int = typer.Option(6, "--evaluate", min=0, help="English validation utterances to transcribe (0: none)."),
) -> None:
    """Ship the pretrained base: best weights as fp16 safetensors, provenance with hashes and WER."""
    from fedvox.shared.models.factory import BASE_DIR
    from fedvox.simulations.pretrain.export import export_base

    folder = target or BASE_DIR
    chosen = tuple(s.strip() for s in stages.split(",") if s.strip())
    shipped = export_base(source, folder, chosen, evaluate=evaluate)
    for name, entry in shipped["weights"].items():
        typer.echo(f"{name}: step {entry['step']}, {entry['bytes'] / 2**20:.1f} MiB, sha256 {entry['sha256'][:16]}")
    if "evaluation" in shipped:
        typer.echo(f"evaluation: {shipped['evaluation']['mean']}")
    typer.echo(f"provenance: {folder / 'provenance.json'}")


@app.command()
def report(out: Path = typer.Argument(..., help="A `fedvox-sim run` output folder.")) -> None:
    """Rebuild OUT/report.md and its plots from a simulation's files."""
    from fedvox.simulations.report import write_report

    typer.echo(f"report: {write_report(out)}")


def _parse_run_config(values: list[str]) -> dict:
    from flwr.common.config import parse_config_args

    from fedvox.shared.errors import ConfigError

    try:
        return parse_config_args(values) if values else {}
    except (ValueError, click.ClickException) as exc:
        raise ConfigError(f"--run-config {' '.join(values)!r}: {getattr(exc, 'message', exc)}") from None


def _with_speakers(plan, n: int):
    from dataclasses import replace

    return replace(plan, speakers=replace(plan.speakers, n_speakers=n))


def main() -> None:
    """Console-script entry point."""
    run_cli(app)
