"""The fedvox ClientApp with the real DP trainer and tiny s1, on prepared recordings.

The server side runs in process (``LocalGrid``), so the ClientApp's handlers see real Flower
messages without a Ray start-up; ``tests/test_federation_simulation.py`` covers the engine.
"""

import json
import shutil

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedvox.client.app import app as client_app
from fedvox.client.identity import client_identity
from fedvox.client.owner import owner_budget
from fedvox.server.app import serve
from fedvox.server.model import initial_subset
from fedvox.shared.privacy.ledger import Ledger
from fedvox.shared.protocol import ARRAYS, CONFIG, STATUS, ClientStatus, Plan
from fedvox.shared.runconfig import RunConfig
from fedvox.shared.wire import PACKED, from_wire, read_update, to_wire, validate_update
from tests.federation_kit import LocalGrid
from tests.prepared import prepared_cache
from tests.tiny import TINY

NO_DATA = 2


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("client-app")
    cache = prepared_cache(root / "prepared")
    for partition in range(NO_DATA):  # client-2 has no prepared recordings
        folder = root / "data" / f"client-{partition}"
        shutil.copytree(cache, folder)
        index = json.loads((folder / "index.json").read_text())  # each client its own recordings:
        index["items"] = index["items"][partition:]  # one set of recordings has one ledger
        (folder / "index.json").write_text(json.dumps(index))
        with Ledger(folder) as ledger:  # what the owner sets at prepare/enroll
            owner_budget(ledger, client_identity(folder), num_examples=10, epsilon=100.0)
    return root / "data"


def _config(data_root, tmp_path, **overrides):
    flat = {
        **TINY,
        "checkpoint-dir": str(tmp_path / "run"),
        "data-root": str(data_root),
        "num-server-rounds": 2,
        "local-steps": 2,
        "logical-batch": 4,
        "learning-rate": 0.01,
        "min-clients": 2,
        "client-budget-epsilon": 100.0,
        "dp.noise-multiplier": 0.8,
        "dp.sample-rate": 0.4,
        "evaluate": True,
        "dp.loss-noise-multiplier": 2.0,
    }
    return RunConfig.from_flat({**flat, **overrides})


def test_a_federation_of_real_clients_trains_charges_and_evaluates(data_root, tmp_path):
    config = _config(data_root, tmp_path)
    grid = LocalGrid(client_app, num_nodes=3)
    run = serve(grid, config, seed=0)

    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["participants"] == 2 and m["rejects"] == {} and m["ineligible"] == {"data": 1}
        assert "val-loss" in m and len(m["val-clients"]) == 2 and "train-loss" not in m
    for partition in range(NO_DATA):
        folder = data_root / f"client-{partition}"
        with Ledger(folder) as ledger:  # the data folder's ledger, charged to its identity
            rows = ledger.rows(client_id=client_identity(folder), unit="utterance")
        # Each round: one training release and one validation-loss release, under the device's ids.
        assert [r.round for r in rows] == [1, 1, 2, 2] and all(r.run_id.startswith(f"{run.run_id}/r-") for r in rows)
        assert [r.sample_rate for r in rows] == [0.4, 1.0, 0.4, 1.0]
        assert rows[2].epsilon == max(m["epsilon-utterance-max"] for m in metrics)
    trained = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert {m.metadata.dst_node_id for m in trained} == set(grid.node_ids[:NO_DATA])
    assert (tmp_path / "run" / "export" / "gpt-sovits" / "s1.ckpt").is_file()


def _train(grid, config, arrays, run_id):
    plan = Plan(config, server_round=1, run_id=run_id, attempt="a").to_record()
    message = Message(
        RecordDict({ARRAYS: arrays, CONFIG: plan}), dst_node_id=grid.node_ids[0], message_type=MessageType.TRAIN
    )
    (reply,) = grid.send_and_receive([message])
    return reply, ClientStatus.from_record(reply.content.config_records[STATUS])


def test_a_client_refuses_a_model_it_does_not_hold_and_charges_nothing(data_root, tmp_path):
    config = _config(data_root, tmp_path)
    grid = LocalGrid(client_app, num_nodes=1)
    wrong = to_wire(initial_subset(config.with_overrides({"lora-rank": 4})), "fp16")

    reply, status = _train(grid, config, wrong, run_id="wrong-model")
    assert (status.outcome, status.reason) == ("refused", "model") and "lora" in status.detail
    assert ARRAYS not in reply.content.array_records
    with Ledger(data_root / "client-0") as ledger:
        assert not [r for r in ledger.rows() if r.run_id.startswith("wrong-model")]


def test_a_client_refuses_a_round_its_budget_cannot_cover(data_root, tmp_path):
    config = _config(data_root, tmp_path, **{"client-budget-epsilon": 0.5})
    folder = data_root / "client-0"
    with Ledger(folder) as ledger:  # the owner lowers the budget
        owner_budget(ledger, client_identity(folder), num_examples=10, epsilon=0.5)
    grid = LocalGrid(client_app, num_nodes=1)
    try:
        _, status = _train(grid, config, to_wire(initial_subset(config), "fp16"), run_id="poor")
    finally:
        with Ledger(folder) as ledger:
            owner_budget(ledger, client_identity(folder), num_examples=10, epsilon=100.0)
    assert (status.outcome, status.reason) == ("refused", "budget")
    assert status.epsilon_next > status.epsilon_budget == 0.5
    with Ledger(data_root / "client-0") as ledger:
        assert not [r for r in ledger.rows() if r.run_id.startswith("poor")]


def test_a_client_replies_with_its_quantised_delta_and_its_round_metrics(data_root, tmp_path):
    config = _config(data_root, tmp_path)
    assert config.update_encoding == "int4"  # the run default
    grid = LocalGrid(client_app, num_nodes=1)
    sent = initial_subset(config)
    received = from_wire(to_wire(sent, "fp16"))

    reply, status = _train(grid, config, to_wire(sent, "fp16"), run_id="int4")
    assert status.ok and status.epsilon_spent > 0 and status.profile
    arrays = reply.content.array_records[ARRAYS]
    assert [(a.stype, a.dtype) for a in arrays.values()] == [(PACKED, "int4")]  # one array a message
    metrics = reply.content.metric_records["metrics"]
    assert set(metrics) == {"bytes-down", "bytes-up"} and metrics["bytes-up"] < 0.35 * metrics["bytes-down"]
    assert isinstance(reply.content.config_records[STATUS], ConfigRecord)
    update = read_update(arrays)  # as the server screens it: a delta against what it sent
    assert set(update) == set(sent) and update.relative and validate_update(received, update) > 0
