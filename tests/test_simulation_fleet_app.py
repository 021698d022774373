"""The fleet mod in a real federation loop (in-process grid, the federation kit's fast ClientApp).

A dropped client answers at once and is not charged; a straggler trained (and is charged) but its
update is discarded; the rounds go on with the others, and the simulated clock charges the
deadline. No Ray here: ``tests/test_simulation_run.py`` runs the real engine once.
"""

import json
import os
import time
from dataclasses import replace

import pytest

from fedvox.client.device import reference_device
from fedvox.server.run import FederatedRun
from fedvox.shared.privacy.ledger import Ledger
from fedvox.shared.runconfig import RunConfig
from fedvox.simulations.fleet_app import FleetMod, fleet_client_app, read_events
from fedvox.simulations.fleets import DeviceClass, Fleet, VirtualClient
from fedvox.simulations.report import outcome_counts, simulated_round_times
from tests.federation_kit import LocalGrid, initial_state, make_client_app
from tests.tiny import TINY

HOST = reference_device("x86-avx2")
STEADY = DeviceClass("steady", HOST, 3, speed=1.0)
FLAKY = DeviceClass("flaky", HOST, 1, dropout=1.0)
SLOW = DeviceClass("slow", HOST, 1, speed=1e-6)  # always far past a deadline of 2x the median
DEVICES = [STEADY, STEADY, STEADY, FLAKY, SLOW]
PROFILE = {"profile.threads": 1}


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    fleet = Fleet("test", {d.name: d for d in (STEADY, FLAKY, SLOW)}, deadline_factor=2.0)
    clients = [
        VirtualClient(p, d, f"{d.name}-fp32", 4, "fp32", False, 2**20, dict(PROFILE)) for p, d in enumerate(DEVICES)
    ]
    app = fleet_client_app(
        FleetMod(fleet, clients, seed=5, events_dir=root / "events"), make_client_app(root / "clients")
    )
    config = RunConfig.from_flat(
        {
            **TINY,
            "checkpoint-dir": str(root / "run"),
            "num-server-rounds": 2,
            "min-clients": 2,
            "local-steps": 2,
            "learning-rate": 0.05,
            "client-budget-epsilon": 50.0,
            "round-timeout": 60.0,
        }
    )
    grid = LocalGrid(app, num_nodes=len(DEVICES))
    FederatedRun(config, initial_state(), seed=3).execute(grid)
    metrics = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return root, grid, metrics, read_events(root / "events")


def test_dropped_and_late_clients_do_not_stall_the_rounds(federation):
    _, _, metrics, _ = federation
    assert [m["round"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["aggregated"] and m["selected"] == 5 and m["participants"] == 3
        assert m["rejects"] == {"error": 2}


def test_events_record_each_outcome_with_measured_and_simulated_times(federation):
    _, _, _, events = federation
    assert outcome_counts(events) == {
        1: {"ok": 3, "dropout": 1, "straggler": 1},
        2: {"ok": 3, "dropout": 1, "straggler": 1},
    }
    by = {(e["round"], e["partition"]): e for e in events}
    assert by[(1, 3)]["outcome"] == "dropout" and "host-s" not in by[(1, 3)]  # never trained
    late, ok = by[(1, 4)], by[(1, 0)]
    assert late["outcome"] == "straggler" and late["simulated-s"] > late["deadline-s"]
    assert ok["simulated-s"] <= ok["deadline-s"] and ok["step-time-s"] > 0 and ok["steps"] == 2
    assert ok["worker"] == os.getpid()  # the in-process grid: this process ran every message
    assert by[(1, 0)]["started"] + by[(1, 0)]["host-s"] <= by[(2, 0)]["started"] <= time.time()
    times = simulated_round_times(events, round_timeout=60.0)
    # a late or missing client makes the server wait until the deadline
    assert times[1] == pytest.approx(max(e["deadline-s"] for e in events if e["round"] == 1 and "deadline-s" in e))


def test_only_clients_that_trained_are_charged(federation):
    root, _, _, _ = federation
    rounds = {}
    for p in range(len(DEVICES)):
        with Ledger(root / "clients" / f"client-{p}") as ledger:
            rounds[p] = [r.round for r in ledger.rows(unit="utterance")]
    assert rounds == {0: [1, 2], 1: [1, 2], 2: [1, 2], 3: [], 4: [1, 2]}


def test_the_mod_hands_each_node_its_profile_overrides(federation):
    _, grid, _, _ = federation
    for context in grid.contexts.values():
        assert context.node_config["profile.threads"] == 1
        assert "partition-id" in context.node_config


def test_without_a_deadline_a_dropout_holds_the_round_until_its_timeout():
    events = [
        {"round": 1, "partition": 0, "outcome": "ok", "simulated-s": 4.0, "deadline-s": None},
        {"round": 1, "partition": 1, "outcome": "dropout"},
        {"round": 2, "partition": 0, "outcome": "ok", "simulated-s": 5.0, "deadline-s": None},
        {"round": 2, "partition": 1, "outcome": "refused-budget"},
    ]
    assert simulated_round_times(events, round_timeout=300.0) == {1: 300.0, 2: 5.0}


def test_a_device_that_cannot_train_refuses_every_message_as_a_device_refusal(tmp_path):
    client = VirtualClient(
        0, replace(STEADY, name="tiny-gpu"), "none", 0, "", False, 0, refusal="does not fit in memory"
    )
    app = fleet_client_app(
        FleetMod(Fleet("f", {"steady": STEADY}), [client, client], 0, tmp_path / "events"),
        make_client_app(tmp_path / "clients"),
    )
    (tmp_path / "clients" / "client-0").mkdir(parents=True)
    config = RunConfig.from_flat(
        {
            **TINY,
            "checkpoint-dir": str(tmp_path / "run"),
            "num-server-rounds": 1,
            "min-clients": 1,
            "data-root": str(tmp_path / "clients"),
        }
    )
    FederatedRun(config, initial_state(), seed=1).execute(LocalGrid(app, num_nodes=1))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nobody eligible: the run stops cleanly
