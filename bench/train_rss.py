"""Resident memory over a long local run: does ``fedvox-client train`` hold its memory flat?

    .venv/bin/python -m bench.train_rss                       # tiny s1, logical batch 2, 500 steps
    .venv/bin/python -m bench.train_rss --stage s2 --steps 200
    .venv/bin/python -m bench.train_rss --epsilon 4 --steps 150 --checkpoint-every 10   # calibrated noise

Prepares 12 pseudo-speech utterances (``simulations.pseudo_speech``, no system dependency), then
runs ``fedvox-client train`` in its own process as an owner would (a release and checkpoint every
20 steps, the command's default; validation, TensorBoard and JSON logs; one thread, fixed seeds).
Every step's record in ``logs/metrics.jsonl`` carries that process's resident set after the step,
whole (``rss_mib``) and anonymous (``rss_anon_mib``: heap and tensors, what a leak grows; the
libraries' file-backed pages, which the kernel drops and reloads under memory pressure, left out;
Linux ``/proc/self/statm``). The first ``--warmup`` steps fill the allocator's pools, oneDNN's
kernel cache and the first checkpoint; the *start* is the median over the next ``--window``
steps. Flat means every later step's anonymous resident set stays within 5 % of the start; the
growth is the last window's median over the start's. The whole resident set is judged alike and
reported beside it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import soundfile as sf
import torch
import typer

from bench.common import host, load_average, table, write_json
from fedvox.shared.cli import run_cli

app = typer.Typer(add_completion=False)
FLAT = 0.05
CLIENT = Path(sys.executable).with_name("fedvox-client")


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


def verdict(rss: dict[int, float], warmup: int, window: int) -> dict[str, float | int | bool]:
    """Steady-state growth of a run's per-step resident set (MiB by step)."""
    steps = sorted(step for step in rss if step > warmup)
    if len(steps) < 2 * window:
        raise typer.BadParameter(f"{len(steps)} steps after the warm-up: fewer than two windows of {window}")
    start = statistics.median(rss[s] for s in steps[:window])
    end = statistics.median(rss[s] for s in steps[-window:])
    highest = max(rss[s] for s in steps)
    return {
        "warmup_steps": warmup,
        "window_steps": window,
        "start_mib": start,
        "end_mib": end,
        "max_mib": highest,
        "growth": end / start - 1,
        "max_over_start": highest / start - 1,
        "flat": highest <= start * (1 + FLAT) and end >= start * (1 - FLAT),
    }


@app.command()
def main(
    stage: str = typer.Option("s1", help="s1 or s2."),
    model_config: str = typer.Option("tiny", "--model-config", help="Model config."),
    steps: int = typer.Option(500, min=2, help="DP steps."),
    logical_batch: int = typer.Option(2, "--logical-batch", min=1, help="Expected Poisson batch."),
    checkpoint_every: int = typer.Option(20, min=1, help="Steps per release and checkpoint (the CLI's default)."),
    epsilon: float | None = typer.Option(
        None, "--epsilon", help="Target epsilon: calibrate the noise as the README does (default: noise multiplier 1)."
    ),
    warmup: int = typer.Option(50, min=0, help="Steps before the steady state."),
    window: int = typer.Option(50, min=1, help="Steps per median window (start and end)."),
    out: Path | None = typer.Option(None, help="JSON result file (default runs/bench/train_rss.json)."),
) -> None:
    from fedvox.client.data.prepare import prepare
    from fedvox.shared.semantic import tokenizer_spec

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
        command = [
            str(CLIENT), "train", "--data", str(root / "data"), "--out", str(root / "run"),
            "--stage", stage, "--model-config", model_config, "--steps", str(steps),
            "--logical-batch", str(logical_batch), "--checkpoint-every", str(checkpoint_every),
            *(["--epsilon", str(epsilon)] if epsilon else ["--noise-multiplier", "1.0"]),
            "--budget-epsilon", "1000000", "--seed", "0",
            "--device", "cpu", "--precision", "fp32", "--physical-batch", str(logical_batch), "--threads", "1",
        ]  # fmt: skip
        env = {
            **os.environ,
            "FEDVOX_HOME": str(root / "home"),  # the recordings' ledger binding stays in the temporary folder
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }
        run = subprocess.run(command, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"fedvox-client train exited {run.returncode}:\n{run.stderr[-4000:]}")
        records = [json.loads(line) for line in (root / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    readings = {key: {r["step"]: r[key] for r in train if key in r} for key in ("rss_anon_mib", "rss_mib")}
    if not all(readings.values()):
        raise typer.BadParameter("the run recorded no resident set (Linux only: /proc/self/statm)")
    judged = {key: verdict(values, warmup, window) for key, values in readings.items()}
    result = {
        "host": facts,
        "load_average_end": load_average(),
        "stage": stage,
        "model_config": model_config,
        "steps": steps,
        "logical_batch": logical_batch,
        "checkpoint_every": checkpoint_every,
        "target_epsilon": epsilon,
        "flat": judged["rss_anon_mib"]["flat"],
        "anonymous": judged["rss_anon_mib"],
        "whole": judged["rss_mib"],
        "peak_rss_mib": max(r["peak_rss_mib"] for r in train),
        **{key: {str(step): round(mib, 1) for step, mib in sorted(values.items())} for key, values in readings.items()},
    }
    path = write_json(result, out, "train_rss")
    print(
        table(
            ["resident set", "steps", f"steps {warmup + 1}-{warmup + window} (MiB)", "last window", "max", "flat"],
            [
                [
                    name,
                    steps,
                    f"{v['start_mib']:.0f}",
                    f"{v['end_mib']:.0f} ({v['growth']:+.1%})",
                    f"{v['max_mib']:.0f} ({v['max_over_start']:+.1%})",
                    "yes" if v["flat"] else "no",
                ]
                for name, v in (("anonymous", result["anonymous"]), ("whole", result["whole"]))
            ],
        )
    )
    print(
        f"{stage} {model_config}; peak {result['peak_rss_mib']:.0f} MiB; wrote {path}; load average "
        f"{facts['load_average_start']:.1f} at the start, "
        f"{result['load_average_end']:.1f} at the end"
    )


if __name__ == "__main__":
    run_cli(app)
