"""Resident memory over a long local run: does ``fedvox-client train`` hold its memory flat?

    python -m bench.train_rss                       # tiny s1, logical batch 2, 500 steps
    python -m bench.train_rss --stage s2 --steps 200

Prepares 12 pseudo-speech utterances (``simulations.pseudo_speech``, no system dependency) and
runs the product's own local training (``client.local.train_local``: Opacus, ledger,
checkpoints, validation, TensorBoard and JSON logs) with one thread. Every step's record in
``logs/metrics.jsonl`` carries the process's current resident set (``rss_mib``); the figure is
the growth from the end of the first segment (after warm-up: allocator pools, kernels, the first
checkpoint) to the last step. Flat means within 5 %. Linux only (``/proc/self/statm``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import soundfile as sf
import torch
import typer

from bench.common import host, load_average, table, write_json
from fedvox.shared.cli import run_cli

app = typer.Typer(add_completion=False)
FLAT = 0.05


def recordings(folder: Path, count: int = 12) -> Path:
    """``count`` English pseudo-speech utterances and their list file."""
    from fedvox.simulations.pseudo_speech import SAMPLE_RATE, PseudoVoice, synthesize

    texts = [
        "The birch canoe slid on the planks.",
        "Glue the sheet to the dark blue background.",
        "It is easy to tell the depth of a well.",
        "These days a chicken leg is a rare dish.",
    ]
    lines = []
    for i in range(count):
        text = texts[i % len(texts)]
        sf.write(folder / f"u{i:02d}.wav", synthesize(text, "en", PseudoVoice.from_seed(i), i), SAMPLE_RATE)
        lines.append(f"u{i:02d}.wav|bench|en|{text}")
    (folder / "bench.list").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "bench.list"


@app.command()
def main(
    stage: str = typer.Option("s1", help="s1 or s2."),
    model_config: str = typer.Option("tiny", "--model-config", help="Model config."),
    steps: int = typer.Option(500, min=2, help="DP steps."),
    logical_batch: int = typer.Option(2, "--logical-batch", min=1, help="Expected Poisson batch."),
    checkpoint_every: int = typer.Option(50, min=1, help="Steps per segment (checkpoint, validation)."),
    out: Path | None = typer.Option(None, help="JSON result file (default runs/bench/train_rss.json)."),
) -> None:
    from fedvox.client.data.prepare import prepare
    from fedvox.client.device import probe
    from fedvox.client.dp import PrivacyPlan
    from fedvox.client.local import LocalTrainingSpec, train_local
    from fedvox.client.profiles import ProfileOverrides, select_profile
    from fedvox.shared.semantic import tokenizer_spec

    torch.set_num_threads(1)
    facts = host(torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="fedvox-bench-rss-") as tmp:
        root = Path(tmp)
        (root / "wavs").mkdir()
        prepare(
            recordings(root / "wavs"),
            root / "data",
            tokenizer=tokenizer_spec(),
            symbols_version="v2",
            workers=1,
            show_progress=False,
        )
        spec = LocalTrainingSpec(
            stage=stage,
            model_config=model_config,
            steps=steps,
            logical_batch=logical_batch,
            checkpoint_every=checkpoint_every,
            privacy=PrivacyPlan(noise_multiplier=1.0, budget_epsilon=1e6),
        )
        overrides = ProfileOverrides(device="cpu", precision="fp32", physical_batch=logical_batch, threads=1)
        profile = select_profile(probe(), stage, model_config, spec.subset_spec, overrides, logical_batch=logical_batch)
        train_local(root / "data", root / "run", spec, profile, seed=0, show_progress=False)
        records = [json.loads(line) for line in (root / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    rss = {r["step"]: r["rss_mib"] for r in records if r["kind"] == "train" and "rss_mib" in r}
    start, end = rss[min(checkpoint_every, steps)], rss[steps]
    growth = (end - start) / start
    result = {
        "host": facts,
        "load_average_end": load_average(),
        "stage": stage,
        "model_config": model_config,
        "steps": steps,
        "logical_batch": logical_batch,
        "rss_mib": {str(step): round(value, 1) for step, value in sorted(rss.items())},
        "start_step": min(checkpoint_every, steps),
        "start_mib": start,
        "end_mib": end,
        "growth": growth,
        "flat": abs(growth) <= FLAT,
    }
    path = write_json(result, out, "train_rss")
    print(
        table(
            ["stage", "steps", f"RSS at step {result['start_step']} (MiB)", "at the end (MiB)", "growth", "flat"],
            [[stage, steps, f"{start:.0f}", f"{end:.0f}", f"{growth:+.1%}", "yes" if result["flat"] else "no"]],
        )
    )
    print(
        f"wrote {path}; load average {facts['load_average_start']:.1f} at the start, "
        f"{result['load_average_end']:.1f} at the end"
    )


if __name__ == "__main__":
    run_cli(app)
