"""Figure 2, memory per profile: DP steps at each profile's physical batch fit the profile's device.

    python -m bench.profile_fit                                      # CPU: x86-avx2 and raspberry-pi5, s1 v2 lora
    python -m bench.profile_fit --device graviton3 --stage s1 --config v2 --subset full
    python -m bench.profile_fit --device rtx3070 --device rtx2060 --device t4 --subset full   # on a GPU

For each reference device (``client.device.REFERENCE_DEVICES``) the profile is chosen as a
client chooses it (``client.profiles.select_profile`` with the run's default logical batch), and,
in a fresh process, the client's own task (``client.stages.build_task``: the profile's
precision and checkpointing) runs DP steps (``client.dp.engine.make_private`` and
``run_logical_step``) of one physical batch at the profile's size, on synthetic utterances of the
planning length (``client.profiles.PLANNING_SECONDS``). Recorded: the resident memory before the
steps (interpreter, torch, model, optimizer state) and the peak during them (VmHWM, reset before
each step), against the profile's estimate (model, optimizer state and activations; not the
interpreter and libraries), its budget (what training may add) and the process's allowance
(on a CPU the share of the RAM a profile plans for, runtime included; on a GPU the budget). glibc returns every
block of 64 KiB or more on free (``MALLOC_MMAP_THRESHOLD_``),
so the peak is that of live memory. Linux only.

A GPU profile runs on this machine's GPU with the process capped to the reference GPU's memory
(``torch.cuda.set_per_process_memory_fraction``); its peak is ``max_memory_allocated``, and an
out-of-memory error is recorded as such (the trainer would halve the physical batch). Prints a
table last and writes JSON.
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
from fedvox.shared.cli import run_cli

app = typer.Typer(add_completion=False)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
GIB = 2**30


def measure(device_name: str, stage: str, config: str, subset: str, steps: int) -> dict[str, Any]:
    """DP steps of the profile ``device_name`` gets for ``stage``/``config``/``subset``, in this process."""
    import torch

    from bench.dp_step import step_variant, synthetic_dataset
    from fedvox.client.device import reference_device
    from fedvox.client.profiles import CPU_RAM_FRACTION, PHONEMES_PER_SECOND, PLANNING_SECONDS, select_profile
    from fedvox.client.stages import build_task
    from fedvox.shared.audio import SEMANTIC_RATE
    from fedvox.shared.models.factory import build_model
    from fedvox.shared.models.subsets import SubsetSpec
    from fedvox.shared.runconfig import RunConfig

    torch.set_num_threads(1)  # memory does not depend on threads; the shared host stays usable
    facts = reference_device(device_name)
    profile = select_profile(facts, stage, config, subset, logical_batch=RunConfig().logical_batch)
    device = torch.device(profile.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"{device_name}'s profile trains on {device}, and this machine has no CUDA GPU")
        fraction = facts.total_memory / torch.cuda.get_device_properties(device).total_memory
        if fraction > 1:
            raise SystemExit(f"{device_name} has more memory than this GPU: it cannot be emulated here")
        torch.cuda.set_per_process_memory_fraction(fraction, device)
    batch = profile.physical_batch
    phonemes, tokens = round(PLANNING_SECONDS * PHONEMES_PER_SECOND), round(PLANNING_SECONDS * SEMANTIC_RATE)
    dataset = synthetic_dataset(stage, batch, phonemes, tokens)
    task = build_task(stage, build_model(stage, config, SubsetSpec(kind=subset), seed=0), dataset, profile)
    step = step_variant("fedvox", task, batch, batch, device)
    resident = _rss() if device.type == "cpu" else torch.cuda.memory_allocated(device)
    peaks, error = [], None
    for _ in range(steps):
        if device.type == "cpu":
            reset_peak_rss()
            step()
            peaks.append(peak_rss_bytes())
            continue
        torch.cuda.reset_peak_memory_stats(device)
        try:
            step()
        except torch.cuda.OutOfMemoryError as exc:
            error = f"out of memory: {str(exc).splitlines()[0]}"
            peaks.append(torch.cuda.max_memory_allocated(device))
            break
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device))
    estimate = profile.memory.fixed + profile.memory.per_sample * batch
    # The whole process's share: on a CPU the budget is what training may add to the runtime.
    allowance = int(facts.ram * CPU_RAM_FRACTION) if device.type == "cpu" else profile.memory.budget
    return {
        "device": device_name,
        "stage": stage,
        "config": config,
        "subset": subset,
        "profile": profile.name,
        "physical_batch": batch,
        "precision": profile.precision,
        "checkpointing": profile.checkpointing,
        "phonemes": phonemes,
        "semantic_tokens": tokens,
        "resident_before_bytes": resident,
        "peak_bytes": peaks,
        "peak_max_bytes": max(peaks),
        "estimate_bytes": estimate,
        "budget_bytes": profile.memory.budget,
        "allowance_bytes": allowance,
        "peak_over_allowance": max(peaks) / allowance,
        "device_memory_bytes": facts.ram if device.type == "cpu" else facts.total_memory,
        "error": error,
    }


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status: this benchmark needs Linux")


@app.command()
def main(
    device: list[str] = typer.Option(["x86-avx2", "raspberry-pi5"], help="reference devices (client.device)"),
    stage: str = typer.Option("s1", help="s1 or s2"),
    config: str = typer.Option("v2", help="model config"),
    subset: str = typer.Option("lora", help="trainable subset (the run default is lora)"),
    steps: int = typer.Option(2, help="DP steps measured (the first includes the optimizer's first allocation)"),
    out: Path = typer.Option(None, help="JSON path (default runs/bench/profile_fit-<stage>-<config>-<subset>.json)"),
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
            [
                sys.executable,
                "-m",
                "bench.profile_fit",
                "--one",
                name,
                "--stage",
                stage,
                "--config",
                config,
                "--subset",
                subset,
                "--steps",
                str(steps),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, **MALLOC_ENV},
        )
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-4000:])
            raise SystemExit(f"the {name} measurement failed (exit {done.returncode}); its log is above")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {
        "figure": "profile_fit",
        "host": {**facts, "load_average_end": load_average()},
        "setting": {"stage": stage, "config": config, "subset": subset, "steps": steps, "threads": 1},
        "rows": rows,
    }
    path = write_json(result, out, f"profile_fit-{stage}-{config}-{subset}")
    print(
        f"{stage} {config} {subset}, DP steps at each profile's physical batch, {rows[0]['phonemes']} phonemes + "
        f"{rows[0]['semantic_tokens']} tokens per utterance; {facts['cpu']}, load "
        f"{facts['load_average_start']:.1f} -> {load_average():.1f}; {path}"
    )
    print(
        table(
            (
                "device",
                "profile",
                "batch",
                "resident GiB",
                "peak GiB",
                "peak - resident",
                "estimate GiB",
                "budget GiB",
                "allowance GiB",
                "peak / allowance",
                "error",
            ),
            [
                (
                    r["device"],
                    r["profile"],
                    r["physical_batch"],
                    r["resident_before_bytes"] / GIB,
                    r["peak_max_bytes"] / GIB,
                    (r["peak_max_bytes"] - r["resident_before_bytes"]) / GIB,
                    r["estimate_bytes"] / GIB,
                    r["budget_bytes"] / GIB,
                    r["allowance_bytes"] / GIB,
                    r["peak_over_allowance"],
                    r["error"] or "",
                )
                for r in rows
            ],
        )
    )


if __name__ == "__main__":
    run_cli(app)
