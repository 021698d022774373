"""Which s2 subset can move the clients' voices at all? Non-private fine-tuning, judged as speech.

    python -m bench.voice_subsets --sim out/sim                      # after `make sim`
    python -m bench.voice_subsets --sim out/sim --candidates full,decoder --steps 120

Each candidate subset of the shipped s2 is fine-tuned without clipping or noise on the union of
the simulation's clients' training utterances (the centralised baseline's loop,
``simulations.baselines.central_baseline``: ``--steps`` steps of ``--batch`` utterances), then
speaks the clients' held-out sentences as the report's scoring does. Each candidate's speaker
similarity, MCD and speech fraction are compared with the base's on the same items (paired,
bootstrap over speakers). A subset that does not move similarity here, with the data pooled and
no noise, will not move it under DP-SGD either: this bounds what a federated s2 run can show.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import typer

from bench.common import host, load_average, table, write_json
from fedvox.shared.cli import run_cli
from fedvox.shared.runconfig import RunConfig

app = typer.Typer(add_completion=False)

CANDIDATES: dict[str, dict[str, Any]] = {
    "lora": {"subset": "lora", "learning-rate": 1e-3},  # the s2 default: LoRA on the decoder's convs
    "full": {"subset": "full", "learning-rate": 1e-4},
    "decoder": {"subset": "groups", "groups": "decoder", "learning-rate": 1e-4},
    "ref_enc": {"subset": "groups", "groups": "ref_enc", "learning-rate": 1e-4},
    "flow": {"subset": "groups", "groups": "flow", "learning-rate": 1e-4},
    "text_encoder": {"subset": "groups", "groups": "text_encoder", "learning-rate": 1e-4},
}
"""Run-configuration overrides per candidate (an s2 run of the shipped base otherwise). LoRA's
factors start at zero and take the larger rate, as in the simulation's runs."""
METRICS = ("similarity", "mcd", "speech")


def candidate_config(name: str) -> RunConfig:
    """The s2 run configuration that trains candidate ``name``."""
    return RunConfig.from_flat({"stage": "s2", **CANDIDATES[name]})


def fine_tune(config: RunConfig, sim: Path, steps: int, batch: int, seed: int, out: Path) -> dict[str, Any]:
    """Train ``config``'s subset without privacy on every client's training split (the centralised baseline)."""
    from fedvox.simulations.baselines import CENTRAL_STATE, CentralJob, central_baseline

    features = sim / "features"
    job = CentralJob(
        caches=tuple(sorted(p for p in (features / "clients").iterdir() if p.is_dir())),
        out=out,
        config=config.with_overrides({"local-steps": steps}),
        rounds=1,
        examples_per_step=batch,
        threads=1,
        seen=features / "heldout-seen",
        unseen=features / "heldout-unseen" if (features / "heldout-unseen").is_dir() else None,
        seed=seed,
    )
    result = central_baseline(job)
    return {**result, "state": torch.load(out / CENTRAL_STATE, weights_only=True)}


@app.command()
def main(
    sim: Path = typer.Option(..., help="A `fedvox-sim run` output folder (e.g. out/sim: speakers/ and features/)."),
    candidates: str = typer.Option(",".join(CANDIDATES), help=f"Comma-separated, from {', '.join(CANDIDATES)}."),
    steps: int = typer.Option(60, min=1, help="Plain optimiser steps per candidate."),
    batch: int = typer.Option(8, min=1, help="Utterances per step."),
    sentences: int = typer.Option(2, min=1, help="Held-out sentences per client (the report's default 2)."),
    seed: int = typer.Option(0, help="Sampling and synthesis seed."),
    out: Path | None = typer.Option(None, help="JSON result path (default runs/bench/voice_subsets.json)."),
) -> None:
    """Speaker similarity, MCD and speech fraction of each fine-tuned subset against the base."""
    from fedvox.shared.models.subsets import trainable_state_dict
    from fedvox.simulations.quality import scoring
    from fedvox.simulations.quality.compare import Contender, speak
    from fedvox.simulations.quality.scoring import by_metric, cluster_bootstrap, paired_differences

    names = [n.strip() for n in candidates.split(",") if n.strip()]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise typer.BadParameter(f"unknown candidate(s) {unknown}; choose from {', '.join(CANDIDATES)}")
    torch.set_num_threads(1)
    load = load_average()
    clients = sim / "speakers" / "clients"
    items = [
        item
        for folder in sorted(p for p in clients.iterdir() if p.is_dir())
        for item in scoring.test_items(folder.name, folder, sentences)
    ]
    first = candidate_config(names[0])
    base = by_metric(speak(first, Contender("base", trainable_state_dict(first.build_model())), items, seed).items())
    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="fedvox-voice-subsets-") as scratch:
        for name in names:
            config = candidate_config(name)
            started = time.perf_counter()
            trained = fine_tune(config, sim, steps, batch, seed, Path(scratch) / name)
            state = trained.pop("state")  # every trainable tensor: what the candidate trains
            parameters = sum(t.numel() for t in state.values())
            spoken = by_metric(speak(config, Contender(name, state), items, seed).items())
            differences = {m: cluster_bootstrap(paired_differences(spoken[m], base[m])) for m in METRICS}
            results[name] = {
                "overrides": CANDIDATES[name],
                "trained-parameters": parameters,
                "train-loss": trained["train_loss"],
                "heldout-losses": trained["losses"],
                "scores": spoken,
                "minus-base": {m: asdict(e) if e else None for m, e in differences.items()},
                "seconds": time.perf_counter() - started,
            }
            rows.append(
                [name, f"{parameters:,}", CANDIDATES[name]["learning-rate"]]
                + [f"{e.mean:+.3f} ({e.low:+.3f} to {e.high:+.3f})" if e else "-" for e in differences.values()]
            )
    result = {
        "host": host(torch.device("cpu")),
        "load-average": [load, load_average()],
        "steps": steps,
        "batch": batch,
        "items": len(items),
        "base": base,
        "candidates": results,
    }
    path = write_json(result, out, "voice_subsets")
    print(
        table(
            ["subset", "trained", "lr", *(f"{m} - base (95 % CI)" for m in METRICS)],
            rows,
        )
    )
    print(f"{path}")


if __name__ == "__main__":
    run_cli(app)
