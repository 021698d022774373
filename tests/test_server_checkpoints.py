"""Per-round checkpoints: the JSON is the commit mark, last k and the best are kept, tampering is caught."""

import json

import pytest
import torch

from fedvox.server.checkpoints import RoundCheckpoints
from fedvox.server.metrics import RoundLog
from fedvox.shared.errors import CheckpointError


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"layer.lora_A": torch.full((2, 3), value), "layer.lora_B": torch.zeros(3, 2)}


EVALUATORS = ["client-a", "client-b"]


def _save(
    store: RoundCheckpoints,
    server_round: int,
    val_loss: float | None,
    *,
    aggregated: bool = True,
    evaluators: list[str] = EVALUATORS,
) -> None:
    metrics = {} if val_loss is None else {"val-loss": val_loss, "aggregated": aggregated, "val-clients": evaluators}
    store.save(server_round, _state(server_round), {"metrics": metrics}, {"m_t/layer.lora_A": torch.ones(2, 3)})


def test_the_last_k_rounds_and_the_best_by_validation_loss_are_kept(tmp_path):
    store = RoundCheckpoints(tmp_path, keep=2)
    for server_round, loss in [(0, None), (1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, 2.2)]:
        _save(store, server_round, loss)

    assert store.rounds() == [2, 4, 5]
    assert store.best_round() == 2
    assert sorted(p.name for p in tmp_path.glob("round-*")) == [
        f"round-0000{r}.{ext}" for r in (2, 4, 5) for ext in ("json", "safetensors")
    ]
    latest = store.latest()
    assert latest.round == 5 and latest.meta["metrics"]["val-loss"] == 2.2
    torch.testing.assert_close(latest.state["layer.lora_A"], torch.full((2, 3), 5.0))
    torch.testing.assert_close(latest.strategy_state["m_t/layer.lora_A"], torch.ones(2, 3))


def test_the_best_round_aggregated_and_is_compared_only_with_rounds_the_same_devices_evaluated(tmp_path):
    store = RoundCheckpoints(tmp_path, keep=20)
    _save(store, 0, None)
    _save(store, 1, 3.0)
    _save(store, 2, 2.5)
    # The deployment that exported a stale model: round 3's aggregation failed (model unchanged)
    # and its loss came from one device's few examples; it must never be the best.
    _save(store, 3, 0.4, aggregated=False, evaluators=["client-a"])
    assert store.best_round() == 2
    assert store.export_choice() == (
        2,
        "lowest validation loss (2.5) of the aggregated rounds from round 1 on, all evaluated by the same 2 device(s)",
    )
    # A third device evaluates from round 4 on: its losses cannot be compared with rounds 1-2.
    _save(store, 4, 2.9, evaluators=[*EVALUATORS, "client-c"])
    _save(store, 5, 2.7, evaluators=[*EVALUATORS, "client-c"])
    _save(store, 6, 2.8, evaluators=[*EVALUATORS, "client-c"])
    round_, why = store.export_choice()
    assert round_ == 5 and "from round 4 on, all evaluated by the same 3 device(s)" in why


def test_without_a_comparable_loss_the_newest_aggregated_round_is_exported(tmp_path):
    store = RoundCheckpoints(tmp_path, keep=5)
    _save(store, 0, None)
    store.save(1, _state(1), {"metrics": {"aggregated": True}})
    store.save(2, _state(2), {"metrics": {"aggregated": False}})
    assert store.best_round() is None
    assert store.export_choice() == (
        1,
        "newest round whose aggregation changed the model (no comparable validation loss)",
    )


def test_tensors_without_their_json_are_not_a_committed_round(tmp_path):
    store = RoundCheckpoints(tmp_path, keep=3)
    _save(store, 1, 1.0)
    _save(store, 2, 1.0)
    store.meta_path(2).unlink()  # a crash between the tensors and the commit mark

    assert store.rounds() == [1]
    assert store.latest().round == 1


def test_a_changed_tensor_file_is_refused_with_the_round_named(tmp_path):
    store = RoundCheckpoints(tmp_path, keep=3)
    _save(store, 1, 1.0)
    path = store.tensors_path(1)
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")

    with pytest.raises(CheckpointError, match=r"round-00001.safetensors does not match the SHA-256"):
        store.latest()


def test_the_metrics_log_catches_up_a_round_lost_to_a_crash_and_never_duplicates(tmp_path):
    log = RoundLog(tmp_path)
    log.write(1, {"train-loss": 2.0, "rejects": {"norm": 1}})
    log.catch_up(1, {"train-loss": 2.0})
    log.catch_up(2, {"train-loss": 1.5})
    log.close()

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["rejects"] == {"norm": 1}
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
