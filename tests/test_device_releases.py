"""What a curious or faulty server can get out of the real ClientApp (issue 12, device side).

Each test sends the real fedvox ClientApp the messages such a server would send: replays, new
models for a round already answered, evaluation floods, plans that ask for another budget. The
device must release nothing its ledger does not record, and nothing data-dependent un-noised.
"""

import json
import shutil

import pytest
from flwr.app import Message, MessageType, RecordDict
from flwr.common.serde import recorddict_to_proto
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedvox.client.app import app as client_app
from fedvox.client.identity import bind_ledger, client_identity, move_ledger
from fedvox.client.owner import owner_budget
from fedvox.client.releases import FOLDER
from fedvox.server.model import initial_subset
from fedvox.shared.errors import PrivacyError
from fedvox.shared.privacy.accounting import Mechanism, calibrate_noise_multiplier
from fedvox.shared.privacy.ledger import Ledger, Release
from fedvox.shared.privacy.ledger_head import LEDGER_HEAD, SignedHead
from fedvox.shared.protocol import ARRAYS, CONFIG, METRICS, STATUS, TRAIN_METRICS, ClientStatus, Plan
from fedvox.shared.runconfig import RunConfig
from fedvox.shared.wire import to_wire
from tests.federation_kit import LocalGrid
from tests.prepared import prepared_cache
from tests.tiny import TINY

FIELDS_OF_A_STATUS = {
    "client-id",
    "outcome",
    "reason",
    "detail",
    "profile",
    "epsilon-spent",
    "epsilon-budget",
    "epsilon-next",
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return prepared_cache(tmp_path_factory.mktemp("device-releases"))


@pytest.fixture
def data(cache, tmp_path):
    """A fresh data folder of the prepared recordings (its own identity and ledger)."""
    folder = tmp_path / "data" / "client-0"
    shutil.copytree(cache, folder)
    return folder


def config(data, **overrides) -> RunConfig:
    flat = {
        **TINY,
        "data-root": str(data.parent),
        "local-steps": 2,
        "logical-batch": 4,
        "learning-rate": 0.01,
        "dp.noise-multiplier": 1.0,
        "dp.sample-rate": 0.4,
        "num-server-rounds": 3,
    }
    return RunConfig.from_flat({**flat, **overrides})


def message(cfg: RunConfig, kind: str, *, server_round: int = 1, run_id: str = "run", lora_shift: float = 0.0):
    state = initial_subset(cfg)
    if lora_shift:
        state = {k: v + lora_shift for k, v in state.items()}
    plan = Plan(cfg, server_round=server_round, run_id=run_id, attempt="a").to_record()
    return Message(
        RecordDict({ARRAYS: to_wire(state, "fp16"), CONFIG: plan}), dst_node_id=GRID.node_ids[0], message_type=kind
    )


GRID = LocalGrid(client_app, num_nodes=1)  # sets Flower's task identity, which messages need


def send(msg: Message) -> tuple[Message, ClientStatus]:
    """One message to the ClientApp, as Flower delivers it (a fresh message each time: a replay)."""
    copy = Message(msg.content, dst_node_id=GRID.node_ids[0], message_type=msg.metadata.message_type)
    (reply,) = GRID.send_and_receive([copy])
    return reply, ClientStatus.from_record(reply.content.config_records[STATUS])


def wire_bytes(reply: Message) -> bytes:
    return recorddict_to_proto(reply.content).SerializeToString(deterministic=True)


def release_bytes(reply: Message) -> bytes:
    """The reply without its signed ledger head."""
    content = RecordDict({name: record for name, record in reply.content.items() if name != LEDGER_HEAD})
    return recorddict_to_proto(content).SerializeToString(deterministic=True)


def rows(data):
    with Ledger(data) as ledger:
        return ledger.rows(client_identity(data), "utterance")


def test_a_replayed_train_message_gets_the_same_bytes_and_is_charged_once(data):
    msg = message(config(data), MessageType.TRAIN)
    replies = [send(msg) for _ in range(3)]
    assert all(status.ok for _, status in replies)
    assert len({wire_bytes(reply) for reply, _ in replies}) == 1  # no fresh noise for free
    (row,) = rows(data)
    assert row.run_id.startswith("run/r-") and row.round == 1


def test_a_new_model_for_an_answered_round_is_a_new_charged_release(data):
    cfg = config(data)
    first, _ = send(message(cfg, MessageType.TRAIN))
    second, status = send(message(cfg, MessageType.TRAIN, lora_shift=1e-3))  # same run, round and attempt
    assert status.ok and wire_bytes(first) != wire_bytes(second)
    charged = rows(data)
    assert len(charged) == 2 and charged[1].epsilon > charged[0].epsilon
    assert status.epsilon_spent == charged[1].epsilon


def test_a_release_redone_after_a_crash_is_the_one_already_charged(data):
    msg = message(config(data), MessageType.TRAIN)
    first, _ = send(msg)
    # The process died after charging but before its reply was stored: the answer is gone.
    for reply_file in (data / FOLDER).glob("*.reply"):
        reply_file.unlink()
    again, _ = send(msg)
    # Same release id, same secret seeds: the same release, bit for bit, and the same ledger head
    # (signed afresh: ECDSA signatures are randomised).
    assert release_bytes(again) == release_bytes(first)
    heads = [SignedHead.from_json(dict(r.content.config_records[LEDGER_HEAD])) for r in (first, again)]
    assert heads[0].rows == heads[1].rows == 1 and heads[0].head == heads[1].head
    assert len(rows(data)) == 1


def test_nothing_data_dependent_leaves_with_a_train_reply(data, cache, tmp_path):
    reply, status = send(message(config(data), MessageType.TRAIN))
    assert set(reply.content.metric_records[METRICS]) == set(TRAIN_METRICS)
    assert set(reply.content.config_records[STATUS]) == FIELDS_OF_A_STATUS
    # A device with half the recordings reports the same epsilons for the same plan: no N in them.
    small = tmp_path / "small" / "client-0"
    shutil.copytree(cache, small)
    content = json.loads((small / "index.json").read_text())
    content["items"] = content["items"][: len(content["items"]) // 2]
    (small / "index.json").write_text(json.dumps(content))
    _, small_status = send(message(config(small), MessageType.TRAIN))
    assert small_status.ok
    assert (small_status.epsilon_spent, small_status.epsilon_next) == (status.epsilon_spent, status.epsilon_next)


def test_evaluation_is_a_charged_noisy_release_answered_once_per_round(data):
    cfg = config(data, evaluate=True, **{"dp.loss-noise-multiplier": 2.0})
    msg = message(cfg, MessageType.EVALUATE)
    answers = [send(msg) for _ in range(3)]
    assert all(status.ok for _, status in answers) and len({wire_bytes(r) for r, _ in answers}) == 1
    assert set(answers[0][0].content.metric_records[METRICS]) == {"val-loss"}
    (row,) = rows(data)
    assert row.steps == 1 and row.sample_rate == 1.0 and row.clip_norm == cfg.dp.loss_clip
    # Another model in the same round: the flood is refused, nothing more is charged.
    _, status = send(message(cfg, MessageType.EVALUATE, lora_shift=1e-3))
    assert (status.outcome, status.reason) == ("refused", "policy")
    assert len(rows(data)) == 1
    # The next round may be evaluated again, and is charged again.
    _, status = send(message(cfg, MessageType.EVALUATE, server_round=2))
    assert status.ok and len(rows(data)) == 2


def test_a_device_refuses_to_evaluate_a_plan_that_did_not_ask(data):
    _, status = send(message(config(data), MessageType.EVALUATE))
    assert (status.outcome, status.reason) == ("refused", "policy") and not rows(data)


def test_the_owner_sets_budget_and_delta_and_a_plan_asking_for_more_is_refused(data):
    greedy = config(data, **{"client-budget-epsilon": 50.0})
    _, status = send(message(greedy, MessageType.TRAIN))
    assert (status.outcome, status.reason) == ("refused", "budget") and "owner allows 10" in status.detail
    assert not rows(data)
    # The plan's delta is not the device's: rows are accounted at the owner's delta.
    _, status = send(message(config(data, **{"dp.delta": 0.5}), MessageType.TRAIN))
    assert status.ok and status.epsilon_budget == 10.0
    (row,) = rows(data)
    with Ledger(data) as ledger:
        owner = ledger.owner_budget(client_identity(data))
    assert row.delta == owner.delta <= 1e-5 and row.budget_epsilon == owner.epsilon == 10.0


# ---------------------------------------------------------------------- any sequence of server messages
MESSAGES = st.sampled_from(
    [
        "train",
        "train-replay",
        "train-new-model",
        "train-new-attempt",
        "train-next-round",
        "evaluate",
        "evaluate-replay",
        "evaluate-new-model",
        "greedy-plan",
        "other-delta",
    ]
)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=st.lists(MESSAGES, min_size=2, max_size=5))
def test_no_sequence_of_server_messages_releases_more_than_the_ledger_records(cache, tmp_path_factory, sequence):
    data = tmp_path_factory.mktemp("sequence") / "client-0"
    shutil.copytree(cache, data)
    base = config(data, evaluate=True, **{"local-steps": 1, "dp.noise-multiplier": 3.0})
    plans = {
        "train": message(base, MessageType.TRAIN),
        "train-new-model": message(base, MessageType.TRAIN, lora_shift=1e-3),
        "train-new-attempt": message(base, MessageType.TRAIN, run_id="run-restarted"),
        "train-next-round": message(base, MessageType.TRAIN, server_round=2),
        "evaluate": message(base, MessageType.EVALUATE),
        "evaluate-new-model": message(base, MessageType.EVALUATE, lora_shift=1e-3),
        "greedy-plan": message(config(data, **{"client-budget-epsilon": 1e3}), MessageType.TRAIN),
        "other-delta": message(config(data, **{"dp.delta": 0.1, "local-steps": 1}), MessageType.TRAIN),
    }
    released: set[bytes] = set()
    for name in sequence:
        reply, status = send(plans[name.replace("-replay", "")])
        if status.ok and (ARRAYS in reply.content.array_records or METRICS in reply.content.metric_records):
            released.add(wire_bytes(reply))
    charged = rows(data)
    with Ledger(data) as ledger:
        owner = ledger.owner_budget(client_identity(data))
    assert len(released) <= len(charged)  # every distinct data-dependent reply is a charged release
    assert len({r.run_id for r in charged}) == len(charged)  # each charged under its own release id
    assert all(r.delta == owner.delta for r in charged) and (not charged or charged[-1].epsilon <= owner.epsilon)


def test_a_second_ledger_for_the_same_recordings_is_refused_and_a_move_is_explicit(data, cache, tmp_path):
    _, status = send(message(config(data), MessageType.TRAIN))
    assert status.ok
    first, home = client_identity(data), data.parent / ".fedvox"
    # The same recordings prepared again into another folder (its own default ledger): refused.
    again = shutil.copytree(cache, data.parent / "client-again")
    assert client_identity(again) == first
    with pytest.raises(PrivacyError, match="already charged"):
        bind_ledger(again, again, home)
    # Moving the ledger is the explicit way; its rows and the owner's budget go with it.
    moved = move_ledger(data, tmp_path / "ledger", home)
    assert bind_ledger(data, moved, home) == first and not (data / "privacy_ledger.sqlite").exists()
    with Ledger(moved) as ledger:
        assert len(ledger.rows(first, "utterance")) == 1 and ledger.owner_budget(first).epsilon == 10.0
    # A SuperNode still pointed at the old place is refused, with the ledger to use.
    _, status = send(message(config(data), MessageType.TRAIN))
    assert (status.outcome, status.reason) == ("refused", "budget") and "another ledger" in status.detail
    assert str(tmp_path) not in status.detail  # no local path leaves the device


# ---------------------------------------------------------------------- local training stays on the device
def local_run(data, steps: int, reach: float | None = None) -> float:
    """Charge ``data``'s ledger with a local `train` run (q = logical batch / N), as the CLI does,
    at noise 1 or the noise that makes it ``reach`` that epsilon; returns the ledger's total."""
    client_id = client_identity(data)
    bind_ledger(data, data, data.parent / ".fedvox")
    q = 4 / len(json.loads((data / "index.json").read_text())["items"])
    with Ledger(data) as ledger:
        owner = owner_budget(ledger, client_id, 10)
        sigma = 1.0 if reach is None else calibrate_noise_multiplier(reach, owner.delta, sample_rate=q, steps=steps)
        release = Release(
            run_id="local-0123456789ab",
            round=0,
            client_id=client_id,
            stage="s1",
            unit="utterance",
            mechanism=Mechanism(sigma, q, steps),
            delta=owner.delta,
            clip_norm=1.0,
        )
        return ledger.append(release).epsilon


def test_what_the_server_sees_does_not_depend_on_local_training_at_q_b_over_n(cache, tmp_path):
    """Local rows are accounted at q = B/N: their epsilon (hence N) must not reach the server."""
    folders = {}
    for name in ("federated-only", "also-local"):
        folders[name] = tmp_path / name / "client-0"
        shutil.copytree(cache, folders[name])
    local_total = local_run(folders["also-local"], steps=1)
    for cfg in ({}, {"dp.target-epsilon": 6.0}):  # a given noise, and one calibrated to a target
        statuses = {name: send(message(config(data, **cfg), MessageType.TRAIN))[1] for name, data in folders.items()}
        assert all(status.ok for status in statuses.values())
        plain, local = statuses["federated-only"], statuses["also-local"]
        assert (local.epsilon_spent, local.epsilon_next) == (plain.epsilon_spent, plain.epsilon_next)
        # The same noise in both updates: a calibration against the local rows would name N.
        noise = {name: rows(data)[-1].noise_multiplier for name, data in folders.items()}
        assert noise["also-local"] == noise["federated-only"]
    # The device's own total still counts every release: local training is charged.
    assert rows(folders["also-local"])[-1].epsilon > max(local_total, rows(folders["federated-only"])[-1].epsilon)


def test_a_budget_refusal_caused_by_local_training_gives_the_server_no_epsilon_of_it(cache, tmp_path):
    data = tmp_path / "local" / "client-0"
    shutil.copytree(cache, data)
    total = local_run(data, steps=20, reach=9.5)  # nearly the owner's whole budget
    assert 9.0 < total < 10.0
    _, status = send(message(config(data), MessageType.TRAIN))
    assert (status.outcome, status.reason) == ("refused", "budget")
    assert status.epsilon_spent == 0.0 and status.epsilon_next < status.epsilon_budget  # the federation's own
    assert f"{total:.3f}" not in status.detail and f"{10.0 - total:.3f}" not in status.detail
    assert len(rows(data)) == 1  # nothing trained or charged
