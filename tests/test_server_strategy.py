"""The fedvox strategy end to end on an in-process grid: selection, screening, speaker-level DP."""

import json
import logging
import uuid

import pytest
import torch
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.serverapp import RdpAccountant
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod

from fedvox.server.aggregators import (
    FlowerRule,
    ServerAdam,
    ServerStep,
    SpeakerDPMean,
    WeightedMean,
    build_aggregator,
)
from fedvox.server.run import FederatedRun
from fedvox.server.speaker_dp import clip_factors, noised_mean
from fedvox.shared.errors import ConfigError
from fedvox.shared.privacy.accounting import Mechanism, epsilon
from fedvox.shared.privacy.ledger import Ledger
from fedvox.shared.runconfig import RunConfig
from fedvox.shared.wire import LEVELS
from tests.federation_kit import (
    LocalGrid,
    client_data,
    gradient_step,
    initial_state,
    make_client_app,
)
from tests.tiny import TINY


def _config(tmp_path, **overrides):
    flat = {
        **TINY,
        "checkpoint-dir": str(tmp_path / "run"),
        "num-server-rounds": 1,
        "learning-rate": 0.05,
        "local-steps": 3,
        "min-clients": 2,
        "wire-precision": "fp32",
        "update-encoding": "fp32",  # exact arithmetic; the int8 deltas have their own tests
        "keep-checkpoints": 2,
    }
    flat.update(overrides)
    return RunConfig.from_flat(flat)


def _run(config, grid, seed=0):
    run = FederatedRun(config, initial_state(), seed=seed)
    run.execute(grid)
    return run


def _metrics(config):
    path = f"{config.checkpoint_dir}/metrics.jsonl"
    return [json.loads(line) for line in open(path)]


def _local_model(partition, config):
    state = initial_state()
    x, y, _, _ = client_data(partition)
    for _ in range(config.local_steps):
        state = gradient_step(state, x, y, config.learning_rate)
    return state


@pytest.mark.parametrize("encoding", ["fp32", "int8", "int4"])
def test_malformed_updates_are_rejected_with_their_reason_and_the_round_completes(tmp_path, encoding):
    config = _config(tmp_path, **{"update-encoding": encoding})
    behaviours = {2: "nan", 3: "shape", 4: "huge"}
    run = _run(config, LocalGrid(make_client_app(tmp_path / "clients", behaviours), num_nodes=5))

    (row,) = _metrics(config)
    assert row["rejects"] == {"nonfinite": 1, "shape": 1, "norm": 1}
    assert row["participants"] == 2 and row["aggregated"] is True
    # FedAvg of the two good clients only (equal example counts), applied to the fp32 global;
    # quantised deltas are each within one rounding step (their tensor's absmax / levels) of the exact ones.
    good = [_local_model(p, config) for p in (0, 1)]
    final = run.store.latest()
    assert final.round == 1
    exact = {name: (good[0][name] + good[1][name]) / 2 for name in final.state}
    for name, value in final.state.items():
        step = max(float((g[name] - initial_state()[name]).abs().max()) for g in good) / LEVELS.get(encoding, 1e6)
        torch.testing.assert_close(value, exact[name], rtol=0, atol=max(step, 1e-6))
    rounded = any(not torch.equal(value, exact[name]) for name, value in final.state.items())
    assert rounded == (encoding in LEVELS)  # a quantised update really went through the rounding


def test_too_few_valid_updates_leave_the_global_model_unchanged(tmp_path):
    config = _config(tmp_path, **{"min-clients": 2})
    run = _run(config, LocalGrid(make_client_app(tmp_path / "clients", {1: "nan", 2: "crash"}), num_nodes=3))

    (row,) = _metrics(config)
    assert row["aggregated"] is False and row["participants"] == 1
    assert row["rejects"] == {"nonfinite": 1, "error": 1}
    for name, value in run.store.latest().state.items():
        torch.testing.assert_close(value, initial_state()[name])


def test_a_client_over_budget_is_neither_selected_nor_charged(tmp_path):
    config = _config(tmp_path, **{"num-server-rounds": 2, "client-budget-epsilon": 50.0})
    grid = LocalGrid(make_client_app(tmp_path / "clients", budgets={2: 0.5}), num_nodes=3)
    _run(config, grid)

    over_budget = grid.node_ids[2]
    trained = [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "train"]
    assert over_budget not in trained and len(trained) == 4
    with Ledger(tmp_path / "clients" / "client-2") as ledger:
        assert ledger.rows() == []
    for partition in (0, 1):
        with Ledger(tmp_path / "clients" / f"client-{partition}") as ledger:
            assert [r.round for r in ledger.rows(unit="utterance")] == [1, 2]
    assert [row["ineligible"] for row in _metrics(config)] == [{"budget": 1}, {"budget": 1}]


def test_speaker_level_dp_noise_has_the_calibrated_scale_and_clipping_bounds_each_speaker():
    like = {"w": torch.zeros(200_000)}
    big = {"w": torch.full((200_000,), 10.0)}  # norm ~4472, clipped to 2
    small = {"w": torch.full((200_000,), 1e-4)}  # norm ~0.045, kept
    generator = torch.Generator().manual_seed(0)
    norms = [float(big["w"].norm()), float(small["w"].norm())]
    factors = clip_factors(norms, clip_norm=2.0)
    assert factors == [pytest.approx(2.0 / norms[0]), 1.0]
    clipped_sum = {"w": like["w"] + factors[0] * big["w"] + factors[1] * small["w"]}
    release = noised_mean(
        clipped_sum,
        participants=2,
        clipped=1,
        clip_norm=2.0,
        noise_multiplier=0.8,
        expected_clients=4.0,
        generator=generator,
    )

    clipped_sum = big["w"] * (2.0 / float(big["w"].norm())) + small["w"]
    noise = release.mean_update["w"] - clipped_sum / 4.0
    assert release.clipped == 1 and release.noise_std == pytest.approx(0.8 * 2.0 / 4.0)
    assert float(noise.std()) == pytest.approx(release.noise_std, rel=0.01)
    assert abs(float(noise.mean())) < 3 * release.noise_std / 200_000**0.5


def test_speaker_level_dp_charges_every_eligible_speaker_once_per_round(tmp_path):
    config = _config(
        tmp_path,
        **{
            "num-server-rounds": 2,
            "clients-per-round": 2,
            "client-budget-epsilon": 50.0,
            "speaker-dp.enabled": True,
            "speaker-dp.noise-multiplier": 0.7,
            "speaker-dp.clip-norm": 0.5,
        },
    )
    grid = LocalGrid(make_client_app(tmp_path / "clients", budgets={3: 0.5}), num_nodes=4)
    _run(config, grid, seed=3)

    q = 2 / 4  # clients-per-round / population, fixed at the first selection
    with Ledger(config.checkpoint_dir) as ledger:
        rows = ledger.rows(unit="speaker")
    # speaker-3 cannot afford a round, so it is never eligible and never charged.
    assert sorted((r.round, r.client_id) for r in rows) == [(r, f"speaker-{p}") for r in (1, 2) for p in (0, 1, 2)]
    for row in rows:
        assert (row.noise_multiplier, row.sample_rate, row.steps, row.clip_norm) == (0.7, q, 1, 0.5)
        assert row.epsilon == pytest.approx(epsilon([Mechanism(0.7, q, 1)] * row.round, config.speaker_dp.delta))
    # Flower's own RDP accountant for the same Poisson subsampled Gaussian is an independent,
    # looser bound: it must not fall below the ledger's PRV value, nor be far above it.
    flower = RdpAccountant(
        PrivacyConfig(
            target_delta=config.speaker_dp.delta,
            population_size=4,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.POISSON,
        )
    )
    flower.compose(GaussianPrivacyEvent(0.7, 2, 4), count=2)
    ledger_epsilon = rows[-1].epsilon
    assert ledger_epsilon <= flower.get_epsilon(config.speaker_dp.delta) <= 1.3 * ledger_epsilon

    metrics = _metrics(config)
    assert [m["epsilon-speaker-max"] for m in metrics] == pytest.approx([rows[0].epsilon, rows[-1].epsilon])
    assert all(m["speaker-dp"]["noise-std"] == pytest.approx(0.7 * 0.5 / (q * 3)) for m in metrics)
    assert all(m["sample-rate"] == q and m["eligible"] == 3 for m in metrics)


def test_each_aggregation_is_one_rule_object_with_fedadam_on_the_mean_it_wraps(tmp_path):
    def rule(**overrides):
        return build_aggregator(_config(tmp_path, **overrides))

    assert type(rule(aggregation="fedavg")) is WeightedMean and type(rule(aggregation="fedprox")) is WeightedMean
    adam = rule(aggregation="fedadam")
    assert isinstance(adam, ServerAdam) and type(adam.inner) is WeightedMean and adam.adam.eta == 0.01
    private = rule(aggregation="fedadam", **{"speaker-dp.enabled": True, "speaker-dp.clip-norm": 0.5})
    assert isinstance(private.inner, SpeakerDPMean) and private.inner.clip_norm == 0.5
    median, trimmed = rule(aggregation="median"), rule(aggregation="trimmed-mean", **{"trim-fraction": 0.3})
    assert isinstance(median, FlowerRule) and type(median.rule) is FedMedian
    assert isinstance(trimmed, FlowerRule) and isinstance(trimmed.rule, FedTrimmedAvg) and trimmed.rule.beta == 0.3
    stepped = rule(aggregation="median", **{"server-step": 2.5})
    assert isinstance(stepped, ServerStep) and stepped.step == 2.5 and isinstance(stepped.inner, FlowerRule)


@pytest.mark.parametrize("speaker_dp", [False, True])
def test_a_server_step_moves_the_global_model_that_multiple_of_the_rules_move(tmp_path, speaker_dp):
    dp = (
        {"speaker-dp.enabled": True, "speaker-dp.clip-norm": 1e3, "speaker-dp.noise-multiplier": 1e-9}
        if speaker_dp
        else {}
    )
    plain = _run(_config(tmp_path / "1", **dp), LocalGrid(make_client_app(tmp_path / "c1"), num_nodes=2))
    config = _config(tmp_path / "3", **dp, **{"server-step": 3.0})
    stepped = _run(config, LocalGrid(make_client_app(tmp_path / "c3"), num_nodes=2))
    start = initial_state()
    for name, value in stepped.store.latest().state.items():
        mean_move = plain.store.latest().state[name] - start[name]
        assert mean_move.abs().max() > 0
        torch.testing.assert_close(value - start[name], 3.0 * mean_move, rtol=1e-4, atol=1e-6)
    assert stepped.strategy.aggregator.name == ("speaker-dp-mean" if speaker_dp else "mean") + " x 3"


def test_fedadam_takes_flowers_adam_step_on_the_screened_mean(tmp_path):
    config = _config(tmp_path, aggregation="fedadam")
    run = _run(config, LocalGrid(make_client_app(tmp_path / "clients", {2: "nan"}), num_nodes=3))
    good = [_local_model(p, config) for p in (0, 1)]
    eta, beta_1, beta_2, tau = 0.01, 0.9, 0.99, 1e-3  # Flower's FedAdam defaults; round 1
    eta_norm = eta * (1 - beta_2**2) ** 0.5 / (1 - beta_1**2)
    for name, value in run.store.latest().state.items():
        start = initial_state()[name]
        delta = (good[0][name] + good[1][name]) / 2 - start
        m, v = (1 - beta_1) * delta, (1 - beta_2) * delta**2
        torch.testing.assert_close(value, start + eta_norm * m / (v.sqrt() + tau))
    assert set(run.store.latest().strategy_state) == {f"{m}/{n}" for m in ("m_t", "v_t") for n in initial_state()}


def test_median_ignores_a_rejected_client_and_tolerates_a_bad_but_valid_one(tmp_path):
    config = _config(tmp_path, aggregation="median")
    run = _run(config, LocalGrid(make_client_app(tmp_path / "clients", {3: "nan"}), num_nodes=4))
    locals_ = [_local_model(p, config) for p in (0, 1, 2)]
    for name, value in run.store.latest().state.items():
        torch.testing.assert_close(value, torch.stack([m[name] for m in locals_]).median(0).values)


def test_a_resumed_run_refuses_a_changed_privacy_configuration(tmp_path):
    config = _config(tmp_path)
    _run(config, LocalGrid(make_client_app(tmp_path / "clients"), num_nodes=2))
    changed = config.with_overrides({"dp.noise-multiplier": 0.5, "num-server-rounds": 3})
    with pytest.raises(ConfigError, match=r"dp.noise-multiplier: 1.0 -> 0.5"):
        _run(changed, LocalGrid(make_client_app(tmp_path / "clients"), num_nodes=2))


class SuperLinkErrors(LocalGrid):
    """The node ``gone`` goes away after answering the query: the SuperLink answers its train
    message for it, as node 1, like Flower's does."""

    def __init__(self, client_app, num_nodes, gone):
        super().__init__(client_app, num_nodes)
        self.gone = self.node_ids[gone]

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        lost = [m for m in messages if m.metadata.dst_node_id == self.gone and m.metadata.message_type == "train"]
        replies = list(super().send_and_receive([m for m in messages if m not in lost]))
        for message in lost:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            replies.append(create_message_error_unavailable_res_message(message.metadata, "node_unavail"))
        return replies


def test_an_error_reply_names_the_node_its_message_went_to_not_the_superlink(tmp_path, caplog):
    config = _config(tmp_path, **{"min-clients": 2})
    grid = SuperLinkErrors(make_client_app(tmp_path / "clients"), num_nodes=3, gone=2)
    with caplog.at_level(logging.WARNING, logger="fedvox.server.strategy"):
        _run(config, grid)

    (row,) = _metrics(config)
    assert row["rejects"] == {"error": 1}
    failed = [c for c in row["clients"] if not c["accepted"]]
    assert [c["node-id"] for c in failed] == [grid.gone] and SUPERLINK_NODE_ID not in {
        c["node-id"] for c in row["clients"]
    }
    assert f"node {grid.gone} replied with an error: " in caplog.text and "node 1 replied" not in caplog.text


def test_speaker_dp_mean_clips_each_received_update_before_noising():
    from flwr.app import Message, MessageType, RecordDict

    from fedvox.server.aggregators import Accepted, RoundUpdates, SpeakerDPMean
    from fedvox.shared.protocol import ARRAYS
    from fedvox.shared.wire import read_update, to_wire, validate_update

    global_state = {"w": torch.zeros(50_000), "b": torch.ones(7)}
    sent = {name: t.half().float() for name, t in global_state.items()}
    updates = [{"w": torch.full((50_000,), v), "b": torch.ones(7) + v} for v in (0.5, 1e-4, -0.2)]
    accepted = []
    for update in updates:
        record = to_wire(update, "fp16")
        norm = validate_update(sent, read_update(record))
        reply = Message(RecordDict({ARRAYS: record}), dst_node_id=0, message_type=MessageType.TRAIN)
        accepted.append(Accepted(reply, None, {"num-examples": 1.0}, norm))
    rule = SpeakerDPMean(clip_norm=2.0, noise_multiplier=0.0)
    got = rule.aggregate(RoundUpdates(1, global_state, sent, accepted, 4.0, torch.Generator().manual_seed(0)))

    # The same release computed the long way, in float64, from the decoded updates.
    expected = {name: torch.zeros_like(t, dtype=torch.float64) for name, t in sent.items()}
    for update in updates:
        delta = {n: update[n].half().double() - sent[n].double() for n in sent}
        norm = sum(float(d.pow(2).sum()) for d in delta.values()) ** 0.5
        for n in sent:
            expected[n] += delta[n] * min(1.0, 2.0 / norm)
    assert got.release.participants == 3 and got.release.clipped == 2
    for name in sent:
        torch.testing.assert_close(
            got.state[name].double(), global_state[name].double() + expected[name] / 4.0, rtol=0, atol=1e-6
        )


@pytest.mark.parametrize("max_misses", [2, 0])
def test_a_client_whose_updates_always_come_late_is_benched_after_max_misses(tmp_path, max_misses):
    config = _config(tmp_path, **{"num-server-rounds": 4, "client-budget-epsilon": 50.0, "max-misses": max_misses})
    grid = LocalGrid(make_client_app(tmp_path / "clients", {2: "late"}), num_nodes=3)
    _run(config, grid)

    late = grid.node_ids[2]
    trained_rounds = [
        m.content.config_records["config"]["server-round"]
        for m in grid.sent
        if m.metadata.message_type == "train" and m.metadata.dst_node_id == late
    ]
    with Ledger(tmp_path / "clients" / "client-2") as ledger:
        charged = [r.round for r in ledger.rows(unit="utterance")]
    rows = _metrics(config)
    if max_misses:
        assert trained_rounds == [1, 2] and charged == [1, 2]  # no budget spent after it was benched
        assert [row["ineligible"] for row in rows] == [{}, {}, {"missed": 1}, {"missed": 1}]
    else:
        assert trained_rounds == [1, 2, 3, 4] and charged == [1, 2, 3, 4]
    assert all(row["participants"] == 2 for row in rows)
