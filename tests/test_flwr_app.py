"""The App behind ``flwr run .``: bare, it makes the default speakers and trains; a run that trains
no round fails with the reason."""

from __future__ import annotations

import json
import logging

import pytest
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fedvox.client.app import app as client_app
from fedvox.shared.errors import FederationError
from fedvox.shared.runconfig import RunConfig
from fedvox.simulations.app import run_app, warn_small_batches
from tests.federation_kit import LocalGrid, make_client_app
from tests.tiny import TINY


def test_a_run_that_trains_no_round_fails_with_the_reason(tmp_path):
    config = RunConfig.from_flat(
        {**TINY, "checkpoint-dir": str(tmp_path / "run"), "min-clients": 2, "round-timeout": 1.0}
    )
    with pytest.raises(FederationError, match=r"the run trained no round: only 1 client\(s\) connected"):
        run_app(LocalGrid(make_client_app(tmp_path / "clients"), num_nodes=1), config)


@pytest.mark.slow  # generates two speakers and starts Ray
def test_without_a_data_root_a_local_simulation_trains_on_the_default_speakers(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDVOX_HOME", str(tmp_path))
    config = RunConfig.from_flat({**TINY, "num-server-rounds": 1, "local-steps": 1, "logical-batch": 2})
    assert config.data_root == ""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:  # what `flwr run .` does with these overrides
        run_app(grid, config)

    run_simulation(
        server_app,
        client_app,
        num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
    manifest = json.loads((tmp_path / "simulation" / "default-2" / "speakers" / "manifest.json").read_text())
    assert manifest["complete"] and [s["role"] for s in manifest["speakers"]].count("client") == 2
    (run,) = (tmp_path / "runs").iterdir()
    assert sorted(p.name for p in (run / "clients").glob("client-*")) == ["client-0", "client-1"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1] and metrics[0]["participants"] == 2
    assert (run / "export" / "fedvox" / "s1.safetensors").is_file()


def test_a_bare_run_says_when_its_sample_rate_leaves_the_smallest_client_a_batch_of_one(caplog):
    config = RunConfig()  # dp.sample-rate 0.05, logical batch 8: made for devices with thousands of utterances
    with caplog.at_level(logging.WARNING, logger="fedvox.simulations.app"):
        warn_small_batches(config, 18)  # the default speakers' training utterances
    assert "expected batch of 0.9" in caplog.text and "dp.sample-rate=0.444 dp.target-epsilon=8" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedvox.simulations.app"):
        warn_small_batches(config, 2000)
    assert caplog.text == ""
