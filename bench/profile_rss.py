"""Figure 2 (CPU rows), memory per profile: peak RSS of DP steps at each CPU profile's physical batch.

    python -m bench.profile_rss                                      # x86-avx2 and raspberry-pi5, s1 v2 lora
    python -m bench.profile_rss --device graviton3 --stage s1 --config v2 --subset full

For each reference CPU device (``client.device.REFERENCE_DEVICES``) the profile is chosen as a
client chooses it (``client.profiles.select_profile`` with the run's default logical batch), and,
in a fresh process, the client's own task (``client.trainer.local.build_task``: the profile's
precision and checkpointing) runs DP steps (``client.trainer.engine.make_private`` and
``run_logical_step``) of one physical batch at the profile's size, on synthetic utterances of the
planning length (``client.profiles.PLANNING_SECONDS``). Recorded: the resident memory before the
steps (interpreter, torch, model, optimizer state) and the peak during them (VmHWM, reset before
each step), against the profile's estimate (model, optimizer state and activations; not the
interpreter and libraries) and its budget (the share of the device's RAM it
plans to use). glibc returns every block of 64 KiB or more on free (``MALLOC_MMAP_THRESHOLD_``),
so the peak is that of live memory. Linux only. Prints a table last and writes JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import typer

from bench.common import host, load_average, peak_rss_bytes, reset_peak_rss, table, write_json
from shared.cli import run_cli

app = typer.Typer(add_completion=False)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
GIB = 2**30


def measure(device_name: str, stage: str, config: str, subset: str, steps: int) -> dict[str, Any]:
    """DP steps of the profile ``device_name`` gets for ``stage``/``config``/``subset``, in this process."""
    import torch

    from bench.dp_step import step_variant, synthetic_dataset
    from client.device import reference_device
    from client.profiles import PHONEMES_PER_SECOND, PLANNING_SECONDS, select_profile
    from client.trainer.local import build_task
    from shared.audio import SEMANTIC_RATE
    from shared.models.factory import build_model
    from shared.models.subsets import SubsetSpec
    from shared.runconfig import RunConfig

    torch.set_num_threads(1)  # memory does not depend on threads; the shared host stays usable
    profile = select_profile(reference_device(device_name), stage, config, subset,
                             logical_batch=RunConfig().logical_batch)
    batch = profile.physical_batch
    phonemes, tokens = round(PLANNING_SECONDS * PHONEMES_PER_SECOND), round(PLANNING_SECONDS * SEMANTIC_RATE)
    dataset = synthetic_dataset(stage, batch, phonemes, tokens)
    task = build_task(stage, build_model(stage, config, SubsetSpec(kind=subset), seed=0), dataset, profile)
    step = step_variant("fedvox", task, batch, batch, torch.device("cpu"))
    resident = _rss()
    peaks = []
    for _ in range(steps):
        reset_peak_rss()
        step()
        peaks.append(peak_rss_bytes())
    estimate = profile.memory.fixed + profile.memory.per_sample * batch
    return {
        "device": device_name, "stage": stage, "config": config, "subset": subset, "profile": profile.name,
        "physical_batch": batch, "precision": profile.precision, "checkpointing": profile.checkpointing,
        "phonemes": phonemes, "semantic_tokens": tokens, "resident_before_bytes": resident,
        "peak_bytes": peaks, "peak_max_bytes": max(peaks), "estimate_bytes": estimate,
        "budget_bytes": profile.memory.budget, "peak_over_budget": max(peaks) / profile.memory.budget,
    }


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status: this benchmark needs Linux")


@app.command()
def main(
    device: list[str] = typer.Option(["x86-avx2", "raspberry-pi5"], help="reference CPU devices"),
    stage: str = typer.Option("s1", help="s1 or s2"),
    config: str = typer.Option("v2", help="model config"),
    subset: str = typer.Option("lora", help="trainable subset (the run default is lora)"),
    steps: int = typer.Option(2, help="DP steps measured (the first includes the optimizer's first allocation)"),
    out: Path = typer.Option(None, help="JSON path (default runs/bench/profile_rss-<stage>-<config>-<subset>.json)"),
    one: str = typer.Option(None, hidden=True, help="measure one device in this process (internal)"),
) -> None:
    if one:
        print(json.dumps(measure(one, stage, config, subset, steps)), flush=True)
        return
    import torch

    facts = host(torch.device("cpu"))
    rows = []
    for name in device:
        done = subprocess.run(
            [sys.executable, "-m", "bench.profile_rss", "--one", name, "--stage", stage, "--config", config,
             "--subset", subset, "--steps", str(steps)],
            capture_output=True, text=True, env={**os.environ, **MALLOC_ENV},
        )
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-4000:])
            raise SystemExit(f"the {name} measurement failed (exit {done.returncode}); its log is above")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {"figure": "profile_rss", "host": {**facts, "load_average_end": load_average()},
              "setting": {"stage": stage, "config": config, "subset": subset, "steps": steps, "threads": 1},
              "rows": rows}
    path = write_json(result, out, f"profile_rss-{stage}-{config}-{subset}")
    print(f"{stage} {config} {subset}, DP steps at each profile's physical batch, {rows[0]['phonemes']} phonemes + "
          f"{rows[0]['semantic_tokens']} tokens per utterance; {facts['cpu']}, load "
          f"{facts['load_average_start']:.1f} -> {load_average():.1f}; {path}")
    print(table(
        ("device", "profile", "batch", "resident GiB", "peak GiB", "peak - resident", "estimate GiB", "budget GiB",
         "peak / budget"),
        [(r["device"], r["profile"], r["physical_batch"], r["resident_before_bytes"] / GIB, r["peak_max_bytes"] / GIB,
          (r["peak_max_bytes"] - r["resident_before_bytes"]) / GIB, r["estimate_bytes"] / GIB, r["budget_bytes"] / GIB,
          r["peak_over_budget"]) for r in rows],
    ))


if __name__ == "__main__":
    run_cli(app)
