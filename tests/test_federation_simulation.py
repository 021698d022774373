"""A real Flower simulation (Ray backend, real messages) of the fedvox ServerApp and a test ClientApp.

One simulation, five clients for three rounds, with speaker-level DP on: three good clients, one
that sends NaN, one whose budget cannot cover a round. Ray start-up costs 10-20 s on 2 cores,
so everything is checked on this one run.
"""

import json
import time

import pytest
from flwr.simulation import run_simulation

from fedvox.server.app import make_server_app
from fedvox.shared.privacy.ledger import Ledger
from fedvox.shared.runconfig import RunConfig
from tests.federation_kit import initial_state, make_client_app
from tests.tiny import TINY

NAN, POOR = 3, 4
pytestmark = pytest.mark.slow  # starts Ray worker processes


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("federation")
    config = RunConfig.from_flat(
        {
            **TINY,
            "checkpoint-dir": str(root / "run"),
            "num-server-rounds": 3,
            "min-clients": 3,
            "learning-rate": 0.05,
            "local-steps": 3,
            "client-budget-epsilon": 50.0,
            "speaker-dp.enabled": True,
            "speaker-dp.noise-multiplier": 0.3,
            "speaker-dp.clip-norm": 1.0,
            "round-timeout": 120.0,
            "evaluate": True,  # the kit's ClientApp releases its loss un-noised
        }
    )
    server_app = make_server_app(config, initial_state=initial_state(), seed=11, export=False)
    client_app = make_client_app(root / "clients", behaviours={NAN: "nan"}, budgets={POOR: 0.5})
    started = time.monotonic()
    run_simulation(
        server_app,
        client_app,
        num_supernodes=5,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
    print(f"simulation wall time {time.monotonic() - started:.1f} s")
    metrics = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return root, config, metrics


def test_every_round_commits_and_the_global_validation_loss_goes_down(federation):
    root, _, metrics = federation
    assert [m["round"] for m in metrics] == [1, 2, 3]
    losses = [m["val-loss"] for m in metrics]
    assert losses[2] < losses[1] < losses[0]
    assert sorted(p.name for p in (root / "run" / "checkpoints").glob("round-*.json"))[-1] == "round-00003.json"


def test_the_nan_update_is_rejected_and_the_poor_client_is_never_selected(federation):
    _, _, metrics = federation
    for m in metrics:
        assert m["rejects"] == {"nonfinite": 1}
        assert m["ineligible"] == {"budget": 1}
        assert (m["eligible"], m["selected"], m["participants"]) == (4, 4, 3)


def test_both_ledgers_hold_the_right_rows(federation):
    root, _config, metrics = federation
    with Ledger(root / "run") as ledger:
        speaker = ledger.rows(unit="speaker")
    # Every eligible speaker is charged every round (the NaN client too: it was eligible).
    assert sorted((r.round, r.client_id) for r in speaker) == [
        (n, f"speaker-{p}") for n in (1, 2, 3) for p in (0, 1, 2, NAN)
    ]
    assert [m["epsilon-speaker-max"] for m in metrics] == [
        max(r.epsilon for r in speaker if r.round == n) for n in (1, 2, 3)
    ]
    for partition in (0, 1, 2, NAN):
        with Ledger(root / "clients" / f"client-{partition}") as ledger:
            assert [r.round for r in ledger.rows(unit="utterance")] == [1, 2, 3]
    with Ledger(root / "clients" / f"client-{POOR}") as ledger:
        assert ledger.rows() == []
