"""bench.server_aggregate: the strategy's one-update-at-a-time mean equals Flower's in-memory one."""

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from bench.server_aggregate import BenchGrid, run_config, strategy_for, train_replies, updates
from fedvox.shared.models.factory import build_model
from fedvox.shared.models.subsets import SubsetSpec, trainable_state_dict
from fedvox.shared.protocol import ARRAYS, METRICS
from fedvox.shared.wire import from_record, from_wire, to_record, to_wire


def test_streamed_fedavg_equals_flowers_uniform_mean_of_rebased_updates():
    state = trainable_state_dict(build_model("s1", "tiny", SubsetSpec(kind="full"), seed=0))
    global_record = to_record(state, "fp32")
    strategy = strategy_for(run_config("s1", "tiny", "full", "fp16", "fedavg", speaker_dp=False))
    messages = list(strategy.configure_train(1, global_record, ConfigRecord(), BenchGrid(5)))
    sent = from_wire(to_wire(state, "fp16"))
    replies = train_replies(messages, updates(sent, 3, "fp16"))

    # Flower's rule on every update re-based onto the fp32 global model, all held at once.
    rebased = [
        RecordDict(
            {
                ARRAYS: to_record(
                    {n: state[n] + (t.float() - sent[n]) for n, t in from_wire(r.content[ARRAYS]).items()}, "fp32"
                ),
                METRICS: MetricRecord({"weight": 1.0}),  # devices send no example count: uniform weights
            }
        )
        for r in replies
    ]
    expected = from_record(aggregate_arrayrecords(rebased, "weight"))

    arrays, metrics = strategy.aggregate_train(1, replies)
    got = from_record(arrays)
    assert set(got) == set(expected) and len(strategy.current.participants) == 5
    assert metrics["updates"] == 5
    for name, value in got.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)
