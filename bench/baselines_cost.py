"""What the baselines cost a default ``fedvox-sim run``: the same run with and without them.

    python -m bench.baselines_cost                       # 8 generated speakers, the defaults
    python -m bench.baselines_cost --speakers-dir data/speakers --rounds 2

Generates (or takes) one speaker set, then runs ``fedvox-sim`` on it in two fresh processes,
each into its own folder: once with no baselines, once with the default local-only and central
baselines (they train alongside the federation, ``simulations.sidework``), as a scenario of two
identical default runs: the second (``again``) reuses the first's baselines and scores
(``simulations.reuse``). The baselines' cost is the extra wall time of a run (its ``run.json``),
as a share of the run with them, for a first run and for a run on speakers whose baselines were
made before; the issue's target is at most 30 %. The speech-quality scoring runs in every run
(it scores every model the run has), so its share is printed too. Each process's CPU seconds
are the sum over its process tree (Ray's workers included), sampled every half second. Wall
time on a shared machine: read the load averages recorded beside it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import typer

from bench.common import host, load_average, table, write_json
from fedvox.shared.cli import run_cli

app = typer.Typer(add_completion=False)
FEDVOX_SIM = str(Path(sys.executable).parent / "fedvox-sim")
TARGET_SHARE = 0.30
"""Issue 13's target: the baselines cost at most 30 % of a default run."""
TWICE = """name = "twice"
description = "The default run twice on the same speakers: the second reuses the first's baselines and scores."
[[runs]]
name = "run"
[[runs]]
name = "again"
"""


def tree_cpu_seconds(process: subprocess.Popen) -> float:
    """Wait for ``process``; the CPU seconds its process tree used (each process's last sample)."""
    seen: dict[int, float] = {}
    root = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for proc in tree:
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            seen[proc.pid] = times.user + times.system
        time.sleep(0.5)
    return sum(seen.values())


def simulate(speakers_dir: Path, out: Path, extra: list[str]) -> dict[str, Any]:
    """One ``fedvox-sim run`` in a fresh process; its wall time, CPU seconds and each run's phases."""
    env = {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    load = load_average()
    started = time.perf_counter()
    process = subprocess.Popen(
        [FEDVOX_SIM, "run", "--speakers-dir", str(speakers_dir), "--out", str(out), *extra], env=env
    )
    cpu = tree_cpu_seconds(process)
    if process.wait() != 0:
        raise subprocess.CalledProcessError(process.returncode, "fedvox-sim run")
    wall = time.perf_counter() - started
    runs = {}
    for folder in sorted((out / "runs").iterdir()):
        run = json.loads((folder / "run.json").read_text())
        runs[folder.name] = {"wall-s": run["timings-s"]["wall"], "phases-s": run["timings-s"]}
    return {
        "process-wall-s": wall,
        "process-cpu-s": cpu,
        "runs": runs,
        "load-average-start": load,
        "load-average-end": load_average(),
    }


@app.command()
def main(
    speakers_dir: Path | None = typer.Option(None, help="A `fedvox-sim speakers` folder (default: generate 8)."),
    rounds: int = typer.Option(3, help="Federated rounds (the default run's 3)."),
    out: Path | None = typer.Option(None, help="JSON result path (default runs/bench/baselines_cost.json)."),
) -> None:
    """Time a default simulation with and without its baselines, and again with them reused."""
    with tempfile.TemporaryDirectory(prefix="fedvox-bench-") as tmp:
        root = Path(tmp)
        if speakers_dir is None:
            speakers_dir = root / "speakers"
            subprocess.run([FEDVOX_SIM, "speakers", "--out", str(speakers_dir)], check=True)
        common = ["--rounds", str(rounds)]
        without = simulate(speakers_dir, root / "without", [*common, "--local-baselines", "0", "--no-central-baseline"])
        twice = root / "twice.toml"
        twice.write_text(TWICE)
        with_ = simulate(speakers_dir, root / "with", [*common, "--scenario", str(twice)])
    bare = without["runs"]["run"]
    first, again = with_["runs"]["run"], with_["runs"]["again"]
    share = (first["wall-s"] - bare["wall-s"]) / first["wall-s"]
    reused = (again["wall-s"] - bare["wall-s"]) / again["wall-s"]
    quality = first["phases-s"].get("speech-quality", 0.0) / first["wall-s"]
    result = {
        "host": host(__import__("torch").device("cpu")),
        "rounds": rounds,
        "with-baselines": with_,
        "without-baselines": without,
        "baselines-share": share,
        "baselines-share-reused": reused,
        "target-share": TARGET_SHARE,
        "speech-quality-share": quality,
    }
    path = write_json(result, out, "baselines_cost")
    rows = [
        [
            name,
            r["wall-s"],
            ", ".join(f"{k} {v:.0f}" for k, v in r["phases-s"].items() if k != "wall"),
        ]
        for name, r in (("without baselines", bare), ("with baselines", first), ("with them reused", again))
    ]
    print(table(["run", "wall s", "phases s"], rows))
    for name, r in (("without", without), ("with, then again", with_)):
        print(
            f"{name}: process {r['process-wall-s']:.0f} s, {r['process-cpu-s']:.0f} CPU s, load "
            f"{r['load-average-start']:.1f} -> {r['load-average-end']:.1f}"
        )
    print(
        f"baselines: {share:.0%} of a first run with them, {reused:.0%} reused (target at most {TARGET_SHARE:.0%}); "
        f"speech-quality scoring {quality:.0%}; {path}"
    )


if __name__ == "__main__":
    run_cli(app)
