"""Issue 17, figure 2: where a deployment round's time goes, and how long a finished server takes to stop.

    python -m bench.deploy_round                    # 2 devices, 3 rounds of tiny s1 (the e2e setting)
    python -m bench.deploy_round --rounds 4 --work /tmp/deploy-bench

A real local deployment, as ``tests/test_deploy_e2e.py`` runs it: ``fedvox-server start`` (SuperLink,
gateway, TLS, device authentication) and two ``fedvox-client enroll`` devices (keys registered
before the start), each with its own copy of a generated speaker's prepared recordings, tiny s1,
two DP steps per round, no evaluation. Each round's wall time (the server's ``round-time-s``)
is split by the run's own records:

``server``      the strategy's own time (``server-s`` in ``metrics.jsonl``): selection,
                screening, aggregation, checkpoint;
``process``     ClientApp process start: from the launch of the command that answers a message
                to the fedvox handler's start (Python and torch imports, FAB install, pulling the
                message), from the device's ``clientapp-times.jsonl`` (:mod:`client.message_times`);
                the JSON also gives its ``handoff`` (launcher to the ClientApp host's fork);
``set-up``      the rest of the handler: data, model, accountant, encoding the update, ledger;
``training``    the handler's DP steps;
``transport``   what is left: Flower's polling (SuperNode, SuperExec, the ServerApp's reply
                poll), the transfers, waiting for devices.

The device columns are the round's critical path: the device whose train reply ended last (its
query too in round 1). ``outside training`` is the round's wall time minus ``training``. The
shutdown is the time from the last round's metrics line to the ``fedvox-server start`` process's
exit (the run ends, the model is exported, the SuperLink and the rest stop). Prints a table
last and writes JSON (host, versions, load average).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import typer

from bench.common import host, load_average, table, write_json
from fedvox.shared.cli import run_cli

app = typer.Typer(add_completion=False)
BIN = Path(sys.executable).parent
DEVICES = ("alice", "bob")
TARGET_OVERHEAD_S = 10.0
TARGET_SHUTDOWN_S = 10.0
RUN_CONFIG: dict[str, Any] = {  # tests/test_deploy_e2e.py's federation
    "model-config": "tiny",
    "pretrained": "",
    "local-steps": 2,
    "logical-batch": 4,
    "evaluate": False,
    "client-budget-epsilon": 100.0,
    "round-timeout": 600.0,
    "dp.noise-multiplier": 0.8,
    "dp.sample-rate": 0.4,
}


def prepare(work: Path, utterances: int) -> list[Path]:
    """Two generated speakers' prepared training caches (reused if ``work`` has them)."""
    from fedvox.simulations.features import prepare_speakers
    from fedvox.simulations.speakers import SpeakersConfig, generate_speakers

    speakers = work / "speakers"
    if not (speakers / "manifest.json").is_file():
        generate_speakers(speakers, SpeakersConfig(n_speakers=len(DEVICES), utterances=utterances))
    return list(prepare_speakers(speakers, len(DEVICES), work / "features", "v2").client_caches)


def deploy(work: Path, caches: list[Path], rounds: int, timeout: float) -> dict[str, Any]:
    """Run the federation; returns the server's exit status, its timings and where everything is."""
    from fedvox.client.enroll import DeviceHome, device_key
    from fedvox.server.deploy.home import init_home, write_run_config
    from fedvox.shared.cli import OFFLINE_ENV
    from fedvox.shared.processes import free_port
    from fedvox.shared.runconfig import RunConfig

    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **OFFLINE_ENV, "PYTHONUNBUFFERED": "1"}
    home = init_home(work / "server", ["127.0.0.1"], host="127.0.0.1", port=free_port())
    write_run_config(home, RunConfig().with_overrides({**RUN_CONFIG, "num-server-rounds": rounds}))
    devices = {}
    for name, cache in zip(DEVICES, caches, strict=True):
        device_home = DeviceHome.at(work / name)
        device_key(device_home)
        _run([str(BIN / "fedvox-server"), "register", str(home.root), str(device_home.public_key), "--name", name], env)
        data = work / f"{name}-data"
        shutil.copytree(cache, data)
        devices[name] = (device_home, data)

    processes: list[subprocess.Popen] = []
    started = time.time()
    try:
        server = _spawn([str(BIN / "fedvox-server"), "start", str(home.root)], work / "server.out", env)
        processes.append(server)
        for name, (device_home, data) in devices.items():
            args = [str(BIN / "fedvox-client"), "enroll", "--server", f"127.0.0.1:{home.settings().port}"]
            args += ["--root-cert", str(home.ca_cert), "--data", str(data), "--home", str(device_home.root.parent)]
            args += ["--threads", "1", "--budget-epsilon", "100", "--name", name]
            processes.append(_spawn(args, work / f"{name}.out", env))
        code = server.wait(timeout=timeout)
        stopped = time.time()
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    metrics = home.run_dir / "metrics.jsonl"
    out = (work / "server.out").read_text(errors="replace")
    stop = re.search(r"server stopped in ([0-9.]+) s", out)
    return {
        "exit_status": code,
        "wall_s": stopped - started,
        "rounds": [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()],
        "last_round_at": metrics.stat().st_mtime,
        "stopped_at": stopped,
        "stop_processes_s": float(stop.group(1)) if stop else None,
        "devices": {name: device_home.logs for name, (device_home, _) in devices.items()},
    }


def split_rounds(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Each round's wall time split into server, transport, process start, set-up and training."""
    from fedvox.client.message_times import read_times

    times = {name: read_times(logs) for name, logs in run["devices"].items()}
    out = []
    for row in run["rounds"]:
        r = row["round"]
        per_device = {}
        for name, messages in times.items():
            mine = [m for m in messages if m["round"] == r]
            trained = [m for m in mine if m["kind"] == "train"]
            if not trained:
                continue
            per_device[name] = {
                "ended": max(m["ended"] for m in trained),
                "messages": len(mine),
                "process_s": sum(m["started"] - m["launched"] for m in mine),
                "handoff_s": sum(m["forked"] - m["launched"] for m in mine if m.get("forked")),
                "setup_s": sum(m["ended"] - m["started"] - m["training_s"] for m in mine),
                "training_s": sum(m["training_s"] for m in mine),
            }
        critical = max(per_device.values(), key=lambda d: d["ended"]) if per_device else {}
        wall, server = row["round-time-s"], row.get("server-s", 0.0)
        parts = {k: critical.get(k, 0.0) for k in ("process_s", "setup_s", "training_s")}
        out.append(
            {
                "round": r,
                "wall_s": wall,
                "server_s": server,
                **parts,
                "transport_s": wall - server - sum(parts.values()),
                "outside_training_s": wall - parts["training_s"],
                "messages_per_device": max((d["messages"] for d in per_device.values()), default=0),
                "devices": per_device,
            }
        )
    return out


@app.command()
def main(
    rounds: int = typer.Option(3, help="federated rounds (round 1 also queries the devices)"),
    utterances: int = typer.Option(12, help="training utterances per generated speaker"),
    timeout: float = typer.Option(1500.0, help="seconds to wait for the server to finish"),
    work: Path = typer.Option(None, help="working folder (default: a new temporary one)"),
    out: Path = typer.Option(None, help="JSON path (default runs/bench/deploy_round.json)"),
) -> None:
    work = (work or Path(tempfile.mkdtemp(prefix="fedvox-deploy-bench-"))).absolute()
    work.mkdir(parents=True, exist_ok=True)
    caches = prepare(work, utterances)
    facts = host(torch.device("cpu"))
    run_dir = work / f"run-{time.strftime('%H%M%S')}"
    run = deploy(run_dir, caches, rounds, timeout)
    if run["exit_status"] != 0:
        raise SystemExit(f"the server exited with status {run['exit_status']}; see {run_dir / 'server.out'}")
    split = split_rounds(run)
    later = [r for r in split if r["round"] > 1] or split
    mean = {k: sum(r[k] for r in later) / len(later) for k in ("wall_s", "outside_training_s", "training_s")}
    shutdown = run["stopped_at"] - run["last_round_at"]
    result = {
        "host": {**facts, "load_average_end": load_average()},
        "run_config": {**RUN_CONFIG, "num-server-rounds": rounds},
        "devices": len(DEVICES),
        "work": str(run_dir),
        "wall_s": run["wall_s"],
        "rounds": split,
        "later_rounds_mean": mean,
        "shutdown_s": shutdown,
        "stop_processes_s": run["stop_processes_s"],
        "targets": {"outside_training_s": TARGET_OVERHEAD_S, "shutdown_s": TARGET_SHUTDOWN_S},
    }
    path = write_json(result, out, "deploy_round")
    print(f"wrote {path} (load average {facts['load_average_start']:.2f} -> {load_average():.2f})")
    rows = [
        (
            r["round"],
            r["messages_per_device"],
            r["wall_s"],
            r["server_s"],
            r["transport_s"],
            r["process_s"],
            r["setup_s"],
            r["training_s"],
            r["outside_training_s"],
        )
        for r in split
    ]
    rows.append(("stop", "", shutdown, "", "", "", "", "", shutdown))
    header = ["round", "msgs", "wall s", "server", "transport", "process", "set-up", "training", "outside training"]
    print(table(header, rows))


def _spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "ab") as fh:
        return subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _run(args: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed: {done.stdout}{done.stderr}")


if __name__ == "__main__":
    run_cli(app)
