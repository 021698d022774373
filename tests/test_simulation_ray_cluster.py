"""``fedvox-sim run --ray-address``: a real two-node Ray cluster on 127.0.0.1.

A head node and a second node (``ray start``, one CPU each, their own temporary folder) form
the cluster; a small simulation runs through it and its events must show clients on both nodes.
The cluster's processes are found by that temporary folder and stopped by pid (``ray stop``
would stop every Ray on the machine).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
from typer.testing import CliRunner

from fedvox.simulations.cli import app
from fedvox.simulations.fleet_app import read_events

pytestmark = pytest.mark.slow  # starts a Ray cluster and a federation

FLEET = """
deadline-factor = 0.0
[devices.steady]
reference = "x86-avx2"
share = 1
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str, env: dict) -> None:
    subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", *args],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=180,
    )


def _stop(temp_dir: str) -> None:
    """End the processes of this test's cluster only (their command lines name its folder)."""
    mine = []
    for process in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in process.info["cmdline"] or []):
            mine.append(process)
    for process in mine:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(mine, timeout=15)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            continue


@pytest.fixture
def cluster():
    temp_dir = tempfile.mkdtemp(prefix="/tmp/fvray-")  # short: Ray's socket paths have a length limit
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "FLWR_TELEMETRY_ENABLED": "0"}
    common = [
        "--num-cpus=1",
        "--num-gpus=0",
        "--node-ip-address=127.0.0.1",
        "--object-store-memory=100000000",
        "--disable-usage-stats",
    ]
    try:
        _ray(
            "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}", "--include-dashboard=false", *common, env=env
        )
        _ray("start", f"--address=127.0.0.1:{port}", *common, env=env)
        time.sleep(2)
        yield f"127.0.0.1:{port}"
    finally:
        _stop(temp_dir)


def test_a_simulation_on_a_two_node_ray_cluster_runs_clients_on_both_nodes(cluster, tmp_path):
    fleet = tmp_path / "steady.toml"
    fleet.write_text(FLEET)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "run",
            "--speakers",
            "2",
            "--utterances",
            "5",
            "--rounds",
            "2",
            "--lang",
            "en",
            "--fleet",
            str(fleet),
            "--local-baselines",
            "0",
            "--no-central-baseline",
            "--quality-sentences",
            "0",
            "--workers",
            "2",
            "--ray-address",
            cluster,
            "--out",
            str(out),
            "--run-config",
            "local-steps=1 logical-batch=2 model-config='tiny' pretrained=''",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    folder = out / "runs" / "run"
    events = read_events(folder / "events")
    assert [e["outcome"] for e in events] == ["ok"] * 4
    assert len({e["node"] for e in events}) == 2  # one actor per one-CPU node: both nodes trained
    fleet_json = json.loads((folder / "fleet.json").read_text())
    assert fleet_json["host"]["ray-address"] == cluster
    assert "on 2 node(s)" in (out / "report.md").read_text()
