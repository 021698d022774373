"""Test kit for the federation: a small ClientApp that speaks the fedvox protocol, an in-process Grid.

The ClientApp fits a linear model ``y = x . w + b`` to its own synthetic data with full-batch
gradient descent (deterministic, so a resumed run can be compared with an uninterrupted one) and
keeps a real utterance-level privacy ledger on disk, charging each round as a DP-SGD release of
the plan's noise multiplier, so budgets and refusals behave as they will for the real client.
A partition can be told to misbehave (``nan``, ``shape``, ``huge``, ``crash``).

:class:`LocalGrid` implements Flower's ``Grid`` by calling the ClientApp in process: strategy
tests need no Ray start-up (10-20 s on 2 cores). A real simulation test uses Flower's engine.

Run as a module it is a federation in one process (the kill-and-resume test's subprocess)::

    python -m tests.federation_kit RUN_DIR CLIENT_ROOT ROUNDS [HOLD_ROUND]
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedvox.shared.errors import BudgetExceededError
from fedvox.shared.privacy.accounting import Mechanism, epsilon
from fedvox.shared.privacy.budget import Budget
from fedvox.shared.privacy.ledger import Ledger, Release
from fedvox.shared.privacy.ledger_head import LEDGER_HEAD, SIGNING_KEY_FILE, head_record
from fedvox.shared.protocol import ARRAYS, CONFIG, METRICS, REFUSED, STATUS, ClientStatus, Plan
from fedvox.shared.runconfig import RunConfig
from fedvox.shared.wire import encode_update, from_wire, record_bytes
from tests.tiny import TINY

DIM = 8
TRUE_W = torch.linspace(-1.0, 1.0, DIM)
TRAIN_EXAMPLES = 32
VAL_EXAMPLES = 16
ACCOUNTANT = "rdp"  # 10-20x faster than prv; the accountant itself is tested elsewhere


def initial_state() -> dict[str, torch.Tensor]:
    return {"linear.weight": torch.zeros(1, DIM), "linear.bias": torch.zeros(1)}


def client_data(partition: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, y, x_val, y_val)`` of one client: a shared linear rule, a client-specific offset."""
    g = torch.Generator().manual_seed(1000 + partition)
    x = torch.randn(TRAIN_EXAMPLES + VAL_EXAMPLES, DIM, generator=g)
    y = x @ TRUE_W + 0.2 * (partition % 3) + 0.05 * torch.randn(len(x), generator=g)
    return x[:TRAIN_EXAMPLES], y[:TRAIN_EXAMPLES], x[TRAIN_EXAMPLES:], y[TRAIN_EXAMPLES:]


def mse(state: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((x @ state["linear.weight"][0] + state["linear.bias"] - y) ** 2).mean())


def make_client_app(
    root: str | Path,
    behaviours: Mapping[int, str] | None = None,
    budgets: Mapping[int, float] | None = None,
) -> ClientApp:
    """The test ClientApp; client ``p`` keeps its ledger in ``root/client-p``."""
    root = Path(root)
    behaviours = dict(behaviours or {})
    budgets = dict(budgets or {})
    app = ClientApp()

    def signed(reply: Message, plan: Plan, partition: int, client_id: str, ledger: Ledger) -> Message:
        """Every reply carries the ledger's signed head, as the real ClientApp's do."""
        key = root / f"client-{partition}" / SIGNING_KEY_FILE
        reply.content[LEDGER_HEAD] = head_record(ledger, client_id, key, f"{plan.run_id}/{plan.server_round}")
        return reply

    def node(context: Context) -> tuple[int, str, Ledger, float]:
        partition = int(context.node_config["partition-id"])
        return partition, f"speaker-{partition}", Ledger(root / f"client-{partition}"), budgets.get(partition, 0.0)

    def status(plan: Plan, client_id: str, ledger: Ledger, budget: float, **overrides: object) -> ClientStatus:
        history = ledger.history(client_id, "utterance")
        mechanism = round_mechanism(plan.config)
        return ClientStatus(
            client_id=client_id,
            profile="cpu-test",
            epsilon_spent=epsilon(history, plan.config.dp.delta, ACCOUNTANT),
            epsilon_budget=budget or plan.config.client_budget_epsilon,
            epsilon_next=epsilon((*history, mechanism), plan.config.dp.delta, ACCOUNTANT),
            **overrides,
        )

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        plan = Plan.from_record(msg.content.config_records[CONFIG])
        partition, client_id, ledger, budget = node(context)
        with ledger:
            reply = Message(RecordDict({STATUS: status(plan, client_id, ledger, budget).to_record()}), reply_to=msg)
            return signed(reply, plan, partition, client_id, ledger)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        plan = Plan.from_record(msg.content.config_records[CONFIG])
        partition, client_id, ledger, budget = node(context)
        behaviour = behaviours.get(partition, "good")
        if behaviour == "crash":
            raise RuntimeError("this client always crashes")
        with ledger:
            before = status(plan, client_id, ledger, budget)
            if not before.can_afford_round():
                return refuse(msg, status(plan, client_id, ledger, budget, outcome=REFUSED, reason="budget"))
            x, y, _, _ = client_data(partition)
            received = from_wire(msg.content.array_records[ARRAYS])
            state = received
            for _ in range(plan.config.local_steps):
                state = gradient_step(state, x, y, plan.config.learning_rate)
            try:
                ledger.append(
                    Release(
                        run_id=f"{plan.run_id}/{plan.attempt}",
                        round=plan.server_round,
                        client_id=client_id,
                        stage=plan.config.stage,
                        unit="utterance",
                        mechanism=round_mechanism(plan.config),
                        delta=plan.config.dp.delta,
                        clip_norm=plan.config.dp.clip_norm,
                    ),
                    budget=Budget(before.epsilon_budget),
                    accountant=ACCOUNTANT,
                )
            except BudgetExceededError as exc:
                return refuse(
                    msg, status(plan, client_id, ledger, budget, outcome=REFUSED, reason="budget", detail=str(exc))
                )
            after = status(plan, client_id, ledger, budget)
            if behaviour == "late":  # trained and charged, but the update came after the deadline
                raise RuntimeError("this client's update always arrives too late")
            rounding = torch.Generator().manual_seed(partition)
            arrays = encode_update(misbehave(state, behaviour), received, plan.config.update_encoding, rounding)
            metrics = MetricRecord(
                {"bytes-down": record_bytes(msg.content.array_records[ARRAYS]), "bytes-up": record_bytes(arrays)}
            )
            reply = Message(RecordDict({ARRAYS: arrays, METRICS: metrics, STATUS: after.to_record()}), reply_to=msg)
            return signed(reply, plan, partition, client_id, ledger)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        plan = Plan.from_record(msg.content.config_records[CONFIG])
        partition, client_id, ledger, budget = node(context)
        _, _, x_val, y_val = client_data(partition)
        state = from_wire(msg.content.array_records[ARRAYS])
        err = x_val @ state["linear.weight"][0] + state["linear.bias"] - y_val
        metrics = MetricRecord({"val-loss": float((err**2).mean())})  # un-noised: the kit tests the server
        with ledger:
            reply = Message(
                RecordDict({METRICS: metrics, STATUS: status(plan, client_id, ledger, budget).to_record()}),
                reply_to=msg,
            )
            return signed(reply, plan, partition, client_id, ledger)

    return app


def refuse(msg: Message, status: ClientStatus) -> Message:
    return Message(RecordDict({STATUS: status.to_record()}), reply_to=msg)


def round_mechanism(config: RunConfig) -> Mechanism:
    return Mechanism(config.dp.noise_multiplier, config.logical_batch / TRAIN_EXAMPLES, config.local_steps)


def gradient_step(
    state: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, lr: float
) -> dict[str, torch.Tensor]:
    """One full-batch gradient-descent step on the mean squared error."""
    err = x @ state["linear.weight"][0] + state["linear.bias"] - y
    grad_w, grad_b = 2 * (err[:, None] * x).mean(0), 2 * err.mean()
    weight, bias = state["linear.weight"] - lr * grad_w[None], state["linear.bias"] - lr * grad_b
    return {"linear.weight": weight, "linear.bias": bias}


def misbehave(state: dict[str, torch.Tensor], behaviour: str) -> dict[str, torch.Tensor]:
    if behaviour == "nan":
        state["linear.weight"][0, 0] = float("nan")
    elif behaviour == "shape":
        state["linear.weight"] = torch.zeros(2, DIM)
    elif behaviour == "huge":
        state["linear.weight"] = state["linear.weight"] + 1e6
    return state


class LocalGrid(Grid):
    """Flower's ``Grid`` in process: every message is answered by ``client_app`` at once.

    ``hold(server_round, replies)`` runs after each train round's replies are in (the kill test
    blocks there so the server dies between training and commit).
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        hold: Callable[[int, list[Message]], None] | None = None,
    ) -> None:
        self.client_app = client_app
        self.hold = hold
        self.node_ids = [int.from_bytes(uuid.uuid4().bytes[:7], "big") for _ in range(num_nodes)]
        self.contexts = {
            node_id: Context(
                run_id=1,
                node_id=node_id,
                node_config={"partition-id": p, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for p, node_id in enumerate(self.node_ids)
        }
        self.sent: list[Message] = []
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self._run = Run.create_empty(run_id=1)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("LocalGrid answers in send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("LocalGrid answers in send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages, replies = list(messages), []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent.append(message)
            try:
                reply = self.client_app(message, self.contexts[message.metadata.dst_node_id])
            except Exception as exc:  # Flower turns a ClientApp exception into an error reply
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)
            replies.append(reply)
        if self.hold and replies and messages and replies[0].metadata.message_type == "train":
            self.hold(int(messages[0].content.config_records[CONFIG]["server-round"]), replies)
        return replies


def _main(run_dir: str, client_root: str, rounds: str, hold_round: str = "0") -> None:
    """A speaker-DP FedAdam federation of 4 clients; with ``hold_round`` it hangs after that
    round's training until killed, leaving ``run_dir/holding`` as the sign."""
    from fedvox.server.run import FederatedRun

    def hold(server_round: int, replies: list[Message]) -> None:
        if server_round == int(hold_round):
            (Path(run_dir) / "holding").touch()
            time.sleep(600)

    config = kill_test_config(run_dir, int(rounds))
    grid = LocalGrid(make_client_app(client_root), num_nodes=4, hold=hold)
    FederatedRun(config, initial_state(), seed=7).execute(grid)


def kill_test_config(run_dir: str | Path, rounds: int) -> RunConfig:
    return RunConfig.from_flat(
        {
            **TINY,
            "num-server-rounds": rounds,
            "checkpoint-dir": str(run_dir),
            "aggregation": "fedadam",
            "server-learning-rate": 0.1,
            "learning-rate": 0.05,
            "local-steps": 3,
            "clients-per-round": 2,
            "min-clients": 2,
            "keep-checkpoints": 2,
            "client-budget-epsilon": 50.0,
            "speaker-dp.enabled": True,
            "speaker-dp.noise-multiplier": 0.5,
            "speaker-dp.clip-norm": 1.0,
        }
    )


if __name__ == "__main__":
    _main(*sys.argv[1:])
