"""What the baselines cost a default ``fedvox-sim run``: the same run with and without them.

    python -m bench.baselines_cost                       # 8 generated speakers, the defaults
    python -m bench.baselines_cost --speakers-dir data/speakers --rounds 2

Generates (or takes) one speaker set, then runs ``fedvox-sim run`` on it twice, each in a fresh
process into its own folder: once with the default local-only and central baselines (they train
alongside the federation, ``simulations.runner.run_one``) and once with none. The baselines'
cost is the extra wall time, as a share of the run with them; the issue's target is at most
30 %. The speech-quality scoring runs in both (it scores every model the run has), so its own
share (the wall-clock span of its jobs, which overlap the baselines and the federation) is
printed too. Wall time on a shared machine: read the load averages recorded beside it.
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

import typer

from bench.common import host, load_average, table, write_json
from fedvox.shared.cli import run_cli

app = typer.Typer(add_completion=False)
FEDVOX_SIM = str(Path(sys.executable).parent / "fedvox-sim")
TARGET_SHARE = 0.30
"""Issue 13's target: the baselines cost at most 30 % of a default run."""


def simulate(speakers_dir: Path, out: Path, extra: list[str]) -> dict[str, Any]:
    """One ``fedvox-sim run`` in a fresh process; its wall time and the phases it recorded."""
    env = {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    load = load_average()
    started = time.perf_counter()
    subprocess.run(
        [FEDVOX_SIM, "run", "--speakers-dir", str(speakers_dir), "--out", str(out), *extra], check=True, env=env
    )
    wall = time.perf_counter() - started
    run = json.loads((out / "runs" / "run" / "run.json").read_text())
    return {
        "wall-s": wall,
        "phases-s": run["timings-s"],
        "load-average-start": load,
        "load-average-end": load_average(),
        "host-load": run.get("host-load", {}),
    }


@app.command()
def main(
    speakers_dir: Path | None = typer.Option(None, help="A `fedvox-sim speakers` folder (default: generate 8)."),
    rounds: int = typer.Option(3, help="Federated rounds (the default run's 3)."),
    out: Path | None = typer.Option(None, help="JSON result path (default runs/bench/baselines_cost.json)."),
) -> None:
    """Time a default simulation with and without its baselines."""
    with tempfile.TemporaryDirectory(prefix="fedvox-bench-") as tmp:
        root = Path(tmp)
        if speakers_dir is None:
            speakers_dir = root / "speakers"
            subprocess.run([FEDVOX_SIM, "speakers", "--out", str(speakers_dir)], check=True)
        common = ["--rounds", str(rounds)]
        without = simulate(speakers_dir, root / "without", [*common, "--local-baselines", "0", "--no-central-baseline"])
        with_ = simulate(speakers_dir, root / "with", common)
    share = (with_["wall-s"] - without["wall-s"]) / with_["wall-s"]
    quality = with_["phases-s"].get("speech-quality", 0.0) / with_["wall-s"]
    result = {
        "host": host(__import__("torch").device("cpu")),
        "rounds": rounds,
        "with-baselines": with_,
        "without-baselines": without,
        "baselines-share": share,
        "target-share": TARGET_SHARE,
        "speech-quality-share": quality,
    }
    path = write_json(result, out, "baselines_cost")
    rows = [
        [
            name,
            r["wall-s"],
            f"{r['load-average-start']:.1f}, {r['load-average-end']:.1f}",
            ", ".join(f"{k} {v:.0f}" for k, v in r["phases-s"].items()),
        ]
        for name, r in (("without baselines", without), ("with baselines", with_))
    ]
    print(table(["run", "wall s", "load avg (start, end)", "phases s"], rows))
    print(
        f"baselines: {share:.0%} of the run with them (target at most {TARGET_SHARE:.0%}); speech-quality scoring "
        f"{quality:.0%}; {path}"
    )


if __name__ == "__main__":
    run_cli(app)
