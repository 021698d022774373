"""The GPU figures of one ``bench/gpu.sh`` run, gathered into one JSON and one table.

    python -m bench.gpu_report runs/bench/gpu

Reads what ``bench/gpu.sh`` wrote (``dp_step-*.json``, ``profile_fit-*.json``, ``train.json``) and
writes ``gpu.json`` beside them: the host, each figure-1 row's step times and ratios to the
non-private step, each figure-2 profile's peak against its cap, and the training run's speed,
with the targets of docs/performance.md beside them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from bench.common import table, write_json
from fedvox.shared.cli import run_cli

app = typer.Typer(add_completion=False)
TARGETS = {"dp_over_plain_bf16": 1.3, "s1_v2_b16_official_ms": 89.0, "s2_v2_b8_official_ms": 333.0}
"""docs/performance.md: fedvox's DP step at most 1.3x the non-private bf16 step, and faster than
the official non-private GPT-SoVITS step on an H100 (s1 batch 16: 89 ms; s2 batch 8: 333 ms)."""


def gather(folder: Path) -> dict[str, Any]:
    """Every result file of one run, as one record."""
    steps = [json.loads(p.read_text()) for p in sorted(folder.glob("dp_step-*.json"))]
    fits = [json.loads(p.read_text()) for p in sorted(folder.glob("profile_fit-*.json"))]
    train = folder / "train.json"
    noise = folder / "secure_noise.json"
    if not steps:
        raise SystemExit(f"no dp_step-*.json in {folder}: run bench/gpu.sh first")
    return {
        "figure": "gpu",
        "host": steps[0]["host"],
        "targets": TARGETS,
        "dp_step": [
            {**s["setting"], **{f"{name}_{k}": v for name, row in s["variants"].items() for k, v in row.items()}}
            for s in steps
        ],
        "profile_fit": [row for f in fits for row in f["rows"]],
        "secure_noise": json.loads(noise.read_text()) if noise.is_file() else None,
        "train": json.loads(train.read_text()) if train.is_file() else None,
    }


def rows(report: dict[str, Any]) -> list[tuple[object, ...]]:
    """One table row per measured setting: what ran, its time, and its ratio or memory share."""
    out: list[tuple[object, ...]] = []
    for s in report["dp_step"]:
        timing = s["timing"]
        for variant in ("plain", "opacus", "fedvox", "secure"):
            if f"{variant}_{timing}_median" in s:
                out.append(
                    (
                        f"DP step {s['stage']} {s['config']} b{s['batch']} {s['precision']}",
                        variant,
                        f"{s[f'{variant}_{timing}_median'] * 1e3:.1f} ms",
                        s[f"{variant}_ratio_to_plain"],
                    )
                )
    for r in report["profile_fit"]:
        out.append(
            (
                f"memory {r['device']} ({r['profile']})",
                f"batch {r['physical_batch']}",
                f"{r['peak_max_bytes'] / 2**30:.2f} GiB",
                r["peak_over_allowance"],
            )
        )
    if noise := report["secure_noise"]:
        for r in noise["results"]:
            same = "same as the CPU's" if r["same_as_cpu"] else "DIFFERS from the CPU's"
            seconds = r["chacha20"][noise["timing"]]
            out.append((f"secure noise, {r['params']:,} values", same, f"{seconds * 1e3:.1f} ms", ""))
    if train := report["train"]:
        out.append(("DP training run s1", f"{train['steps']} steps", f"{train['wall_s']} s", ""))
    return out


@app.command()
def main(folder: Path = typer.Argument(..., help="The results folder of bench/gpu.sh.")) -> None:
    report = gather(folder)
    path = write_json(report, folder / "gpu.json", "gpu")
    host = report["host"]
    print(f"{host.get('gpu') or host['cpu']}, torch {host['torch']}, {host['date']}; {path}")
    print(table(("setting", "variant", "time / peak", "x plain / share of cap"), rows(report)))


if __name__ == "__main__":
    run_cli(app)
