"""The fedvox ClientApp: the server's messages become DP training on this node's own recordings.

Three handlers (``shared.protocol`` is the contract):

- ``query``: report this node's status (data, device profile, utterance-level budget and the
  epsilon one round of the plan would reach) without training;
- ``train``: load the global subset, run one DP-SGD release of the plan (``client.trainer``),
  reply with the updated subset in the wire precision and the round's metrics;
- ``evaluate``: validation loss (and s1 top-3 accuracy) of the global subset on held-out
  utterances, which training never sees.

A node that cannot or will not do what is asked replies ``refused`` with a reason (``budget``,
``data``, ``model``, ``device``) instead of crashing, and nothing is trained or charged.

Where a node's things are (:class:`Node`):

============== ================================================= ==============================
               deployment (``flower-supernode --node-config``)    simulation
============== ================================================= ==============================
data           ``data-path``: a prepared feature cache            ``<data-root>/client-<p>``
ledger         ``ledger-path`` (default: the data folder)         the data folder
budget         ``budget-epsilon`` (default: the run's)            the run's ``client-budget-epsilon``
profile        ``profile.*`` overrides of the probed device       the probed device
base model     ``pretrained`` (default: the run's path)           the run's ``pretrained``
============== ================================================= ==============================

(``<p>`` is Flower's ``partition-id``.) The client id is the data folder's identity
(:mod:`client.identity`), so local training and every federated run that use the same
recordings are charged to one budget. Everything that must outlive the process, the privacy
ledger above all, lives on disk: in deployment every message runs in a fresh process.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedvox.client.device import probe
from fedvox.client.identity import client_identity
from fedvox.client.profiles import ProfileOverrides, ResourceProfile, select_profile
from fedvox.client.trainer.local import build_task, datasets
from fedvox.client.trainer.session import PrivacyPlan, RoundPlan, Trainer
from fedvox.shared.cli import set_offline_env
from fedvox.shared.errors import BudgetExceededError, CheckpointError, ConfigError, DataError, DeviceError, FedvoxError
from fedvox.shared.models.factory import build_model
from fedvox.shared.models.subsets import SubsetSpec, load_trainable_state_dict
from fedvox.shared.privacy.ledger import Ledger
from fedvox.shared.privacy.ledger_head import LEDGER_HEAD, SIGNING_KEY_FILE, head_record
from fedvox.shared.protocol import ARRAYS, CONFIG, METRICS, REFUSED, STATUS, ClientStatus, Plan
from fedvox.shared.runconfig import RunConfig
from fedvox.shared.wire import from_record, record_bytes, to_record

log = logging.getLogger(__name__)

VALIDATION_FRACTION = 0.1
"""Share of a node's utterances held out for ``evaluate`` (never trained on)."""

app = ClientApp()


class Refusal(Exception):
    """Why this node will not do what it was asked: becomes a ``refused`` reply."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Node:
    """Where this node keeps its data and ledger, who it is, what it allows (module docstring)."""

    client_id: str
    data_path: Path
    ledger_path: Path
    budget_epsilon: float
    overrides: ProfileOverrides
    pretrained: str  # where this machine keeps the plan's GPT-SoVITS base checkpoint ("": the plan's path)
    signing_key: Path  # signs the ledger head in every reply (shared.privacy.ledger_head)

    @classmethod
    def from_context(cls, context: Context, config: RunConfig) -> Node:
        node_config = context.node_config
        if "data-path" in node_config:
            data = Path(str(node_config["data-path"])).expanduser()
        elif "partition-id" in node_config and config.data_root:
            data = Path(config.data_root).expanduser() / f"client-{node_config['partition-id']}"
        else:
            raise Refusal(
                "data",
                "no data: start the SuperNode with --node-config \"data-path='<prepared cache>'\" "
                "(or set the run's data-root in simulation)",
            )
        ledger = Path(str(node_config.get("ledger-path", data))).expanduser()
        try:
            client_id = client_identity(data)
        except DataError as exc:
            raise Refusal("data", str(exc)) from None
        budget = float(node_config.get("budget-epsilon", config.client_budget_epsilon))
        try:
            overrides = ProfileOverrides.from_mapping(node_config)
        except ConfigError as exc:
            raise Refusal("device", str(exc)) from None
        signing_key = Path(str(node_config.get("signing-key", ledger / SIGNING_KEY_FILE))).expanduser()
        return cls(client_id, data, ledger, budget, overrides, str(node_config.get("pretrained", "")), signing_key)


class Session:
    """This node set up for one plan: its data split, device profile, model and DP trainer."""

    def __init__(self, node: Node, plan: Plan) -> None:
        config = plan.config
        self.node, self.plan = node, plan
        try:
            self.train_set, self.val_set = datasets(config.stage, node.data_path, VALIDATION_FRACTION)
            if len(self.train_set) == 0:
                raise DataError(f"no usable training utterances in {node.data_path}")
        except DataError as exc:
            raise Refusal("data", str(exc)) from None
        spec = SubsetSpec(kind=config.subset, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha)
        try:
            self.profile: ResourceProfile = select_profile(
                probe(), config.stage, config.model_config, spec, node.overrides, logical_batch=config.logical_batch
            )
        except (ConfigError, DeviceError) as exc:
            raise Refusal("device", str(exc)) from None
        torch.set_num_threads(self.profile.threads)
        try:
            pretrained = (node.pretrained or config.pretrained) or None
            model = build_model(config.stage, config.model_config, spec, seed=config.model_seed, pretrained=pretrained)
        except (CheckpointError, ConfigError) as exc:
            raise Refusal("model", str(exc)) from None
        task = build_task(config.stage, model, self.train_set, self.profile)
        dp = config.dp
        try:
            privacy = PrivacyPlan(
                clip_norm=dp.clip_norm,
                delta=dp.delta,
                budget_epsilon=node.budget_epsilon,
                noise_multiplier=None if dp.target_epsilon > 0 else dp.noise_multiplier,
                target_epsilon=dp.target_epsilon if dp.target_epsilon > 0 else None,
            )
        except ConfigError as exc:  # e.g. the run's target epsilon is above this node's budget
            raise Refusal("budget", str(exc)) from None
        self.ledger = Ledger(node.ledger_path)
        self.trainer = Trainer(task, self.ledger, node.client_id, privacy, physical_batch=self.profile.physical_batch)
        rounds_left = config.num_server_rounds - plan.server_round + 1
        self.round_plan = RoundPlan(
            steps=config.local_steps,
            logical_batch=config.logical_batch,
            learning_rate=config.learning_rate,
            planned_steps=config.local_steps * max(rounds_left, 1),
            proximal_mu=config.proximal_mu if config.aggregation == "fedprox" else 0.0,
        )

    def load_global(self, message: Message) -> None:
        """Load the received global subset; refuses if it is not this plan's model."""
        try:
            load_trainable_state_dict(self.trainer.task.model, from_record(message.content.array_records[ARRAYS]))
        except (KeyError, CheckpointError) as exc:
            raise Refusal("model", f"the received model does not match the plan's: {exc}") from None

    def status(self, **overrides: object) -> ClientStatus:
        try:
            epsilon_next = self.trainer.projected_epsilon(self.round_plan)
        except BudgetExceededError:  # a target-epsilon plan with no room left: no round fits
            epsilon_next = math.inf
        return ClientStatus(
            client_id=self.node.client_id,
            profile=self.profile.name,
            num_examples=len(self.train_set),
            epsilon_spent=self.trainer.spent(),
            epsilon_budget=self.node.budget_epsilon,
            epsilon_next=epsilon_next,
            **overrides,
        )

    def close(self) -> None:
        self.trainer.close()
        self.ledger.close()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return _handle(msg, context, lambda session: _reply(msg, session.status()))


@app.train()
def train(msg: Message, context: Context) -> Message:
    def run(session: Session) -> Message:
        session.load_global(msg)
        status = session.status()
        if not status.can_afford_round():
            raise Refusal("budget", f"one more round would take epsilon to {status.epsilon_next:.3f}, "
                                    f"past this node's budget {status.epsilon_budget:g}")
        plan = session.plan
        try:
            result = session.trainer.train(
                session.round_plan, run_id=f"{plan.run_id}/{plan.attempt}", round=plan.server_round
            )
        except BudgetExceededError as exc:
            raise Refusal("budget", str(exc)) from None
        arrays = to_record(result.state, plan.config.wire_precision)
        metrics = MetricRecord({
            "num-examples": len(session.train_set),
            "train-loss": _loss(result.metrics, plan.config.stage),
            "peak-memory-bytes": max((v for k, v in result.metrics.items() if k.startswith("peak_")), default=0.0)
            * 2**20,
            "step-time-s": result.metrics["step_time_s"],
            "bytes-down": record_bytes(msg.content.array_records[ARRAYS]),
            "bytes-up": record_bytes(arrays),
        })
        return _reply(msg, session.status(), arrays=arrays, metrics=metrics)

    return _handle(msg, context, run)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    def run(session: Session) -> Message:
        if len(session.val_set) == 0:
            raise Refusal("data", "no held-out utterances to evaluate on (prepare more recordings)")
        session.load_global(msg)
        values = session.trainer.evaluate(session.val_set)
        loss = _loss(values, session.plan.config.stage)
        metrics = MetricRecord({"num-examples": len(session.val_set), "val-loss": loss})
        if "top3_accuracy" in values:
            metrics["val-accuracy"] = values["top3_accuracy"]
        return _reply(msg, session.status(), metrics=metrics)

    return _handle(msg, context, run)


def _handle(msg: Message, context: Context, run: Callable[[Session], Message]) -> Message:
    """Set up a session for the message's plan, run ``run`` on it, turn refusals into replies."""
    set_offline_env()
    session = None
    client_id = f"node-{context.node_id}"  # until the data folder's identity is known
    try:
        plan = Plan.from_record(msg.content.config_records[CONFIG])
        node = Node.from_context(context, plan.config)
        client_id = node.client_id
        session = Session(node, plan)
        return _signed(run(session), session)
    except Refusal as refusal:
        log.warning("refusing %s: %s", msg.metadata.message_type, refusal)
        status = session.status(outcome=REFUSED, reason=refusal.reason, detail=str(refusal)) if session else (
            ClientStatus(client_id=client_id, outcome=REFUSED, reason=refusal.reason, detail=str(refusal))
        )
        return _signed(_reply(msg, status), session)
    except (KeyError, FedvoxError) as exc:  # a plan this client cannot read
        log.warning("refusing %s: %s", msg.metadata.message_type, exc)
        return _reply(msg, ClientStatus(client_id=client_id, outcome=REFUSED, reason="model", detail=str(exc)))
    finally:
        if session is not None:
            session.close()


def _signed(reply: Message, session: Session | None) -> Message:
    """``reply`` with the ledger's head as it stands after this reply's release, signed by the device."""
    if session is not None:
        plan, node = session.plan, session.node
        context = f"{plan.run_id}/{plan.server_round}"
        reply.content[LEDGER_HEAD] = head_record(session.ledger, node.client_id, node.signing_key, context)
    return reply


def _reply(msg: Message, status: ClientStatus, **records: object) -> Message:
    content = RecordDict({STATUS: status.to_record()})
    if "arrays" in records:
        content[ARRAYS] = records["arrays"]
    if "metrics" in records:
        content[METRICS] = records["metrics"]
    return Message(content, reply_to=msg)


def _loss(metrics: dict[str, float], stage: str) -> float:
    """The stage's headline loss: s1 cross-entropy per token, s2 generator loss per utterance."""
    return metrics["loss_per_token"] if stage == "s1" else metrics["loss"]


__all__ = ["Node", "Refusal", "Session", "app"]
