"""The fedvox ClientApp: the server's messages become DP training on this node's own recordings.

Three handlers (``shared.protocol`` is the contract):

- ``query``: report this node's status (device profile, the owner's utterance-level budget and
  the epsilon spent and reached after one round of the plan) without training;
- ``train``: load the global subset, run one DP-SGD release of the plan (``fedvox.client.dp``),
  reply with the update in the plan's ``update-encoding`` (by default its int4 delta against the
  received subset, stochastically rounded with the release's own seed; :mod:`shared.wire`);
- ``evaluate``: when the plan asks for it, release one noised validation loss of the global
  subset on held-out utterances (:mod:`client.loss_release`), charged like a training round.

The device decides what leaves it (docs/privacy.md, "What a device releases"):

- every reply carries the ledger's head signed with the device key (:mod:`shared.privacy.ledger_head`);
- every train or evaluate message is a release the device identifies itself
  (:mod:`client.releases`): it answers a question it already answered with the stored reply
  bytes, and charges its ledger under its own release id before any reply leaves;
- nothing data-dependent leaves un-noised: no loss, count, memory or time; the epsilons in the
  status are the *federation account* (:func:`client.releases.answers_a_server`), which depends
  on plan values only (the plan fixes the sample rate ``q``, not ``N``): the owner's local
  training, accounted at ``q = B/N``, is checked against the budget but never reported;
- the budget and delta are the owner's (:mod:`client.owner`), never the plan's: a plan that asks
  for more is refused with the reason; at most :data:`MAX_EVALUATIONS_PER_ROUND` evaluations are
  answered per run and round.

A node that cannot or will not do what is asked replies ``refused`` with a reason (``budget``,
``data``, ``model``, ``device``, ``policy``) instead of crashing, and nothing is trained or charged.

Where a node's things are (:class:`NodeSetup`):

============== ================================================= ==============================
               deployment (``flower-supernode --node-config``)    simulation
============== ================================================= ==============================
data           ``data-path``: a prepared feature cache            ``<data-root>/client-<p>``
ledger         ``ledger-path`` (default: the data folder)         the data folder
budget         the ledger's owner budget (``budget-epsilon``       the ledger's owner budget
               in the node config sets it; default epsilon 10)    (set by the simulation)
profile        ``profile.*`` overrides of the probed device       the probed device
base model     ``pretrained`` (default: the run's path)           the run's ``pretrained``
============== ================================================= ==============================

(``<p>`` is Flower's ``partition-id``.) The client id is the recordings' identity and the ledger
their one ledger (:func:`client.identity.bind_ledger`, recorded in ``fedvox-home`` from the node
config, ``<data-root>/.fedvox`` in simulation), so local training and every federated run that
use the same recordings are charged to one budget. Everything that must outlive the process, the privacy
ledger above all, lives on disk: in deployment every message runs in a fresh process. A process
that lives on (a simulation's Ray actor) keeps the base model it built (:mod:`client.warm`).
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedvox.client.data.split import HELD_OUT_FRACTION
from fedvox.client.device import probe
from fedvox.client.dp import PrivacyPlan, RoundPlan, Trainer
from fedvox.client.dp.trainer import UNIT
from fedvox.client.host import prepare_training_process
from fedvox.client.identity import bind_ledger
from fedvox.client.loss_release import loss_mechanism, noisy_mean_loss, utterance_losses
from fedvox.client.message_times import MessageClock
from fedvox.client.owner import check_plan, owner_budget
from fedvox.client.profiles import ProfileOverrides, ResourceProfile, select_profile
from fedvox.client.releases import Entry, ReleaseBook, ReleaseSeeds, answers_a_server, message_digest
from fedvox.client.stages import build_task, datasets
from fedvox.client.warm import base_model
from fedvox.shared.cli import set_offline_env
from fedvox.shared.errors import (
    BudgetExceededError,
    CheckpointError,
    ConfigError,
    DataError,
    DeviceError,
    FedvoxError,
    PrivacyError,
    UpdateRejected,
)
from fedvox.shared.models.subsets import load_trainable_state_dict
from fedvox.shared.privacy.accounting import remember_epsilons
from fedvox.shared.privacy.budget import Budget
from fedvox.shared.privacy.epsilon_store import FILE as EPSILON_FILE
from fedvox.shared.privacy.epsilon_store import EpsilonStore
from fedvox.shared.privacy.ledger import Ledger, OwnerBudget, Release
from fedvox.shared.privacy.ledger_head import LEDGER_HEAD, SIGNING_KEY_FILE, head_record
from fedvox.shared.privacy.noise import SecureGaussian
from fedvox.shared.protocol import ARRAYS, CONFIG, METRICS, REFUSED, STATUS, ClientStatus, Plan
from fedvox.shared.runconfig import RunConfig
from fedvox.shared.wire import encode_update, from_wire, read_update, record_bytes

log = logging.getLogger(__name__)

MAX_EVALUATIONS_PER_ROUND = 1
"""Distinct evaluate messages a node answers per run and round (a replay gets the stored reply)."""
LOCAL_TIMING = "fedvox.local-timing"
"""Key in the node's own context state of the last train message's DP-step time (never sent)."""

app = ClientApp()


class Refusal(Exception):
    """Why this node will not do what it was asked: becomes a ``refused`` reply."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class NodeSetup:
    """Where this node keeps its data and ledger, who it is, what its owner set (module docstring)."""

    client_id: str
    data_path: Path
    ledger_path: Path
    budget_epsilon: float | None  # the owner's node-config budget; None: the ledger's (or the default)
    overrides: ProfileOverrides
    pretrained: str  # where this machine keeps the plan's GPT-SoVITS base checkpoint ("": the plan's path)
    signing_key: Path  # signs the ledger head in every reply (shared.privacy.ledger_head)
    log_dir: Path | None = None  # the device's logs: each message's times (client.message_times)

    @classmethod
    def from_context(cls, context: Context, config: RunConfig) -> NodeSetup:
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
        if "fedvox-home" in node_config:
            home: Path | None = Path(str(node_config["fedvox-home"]))
        else:  # a simulation's owners keep their records in the run's data root
            home = Path(config.data_root).expanduser() / ".fedvox" if "data-path" not in node_config else None
        try:
            client_id = bind_ledger(data, ledger, home)
        except DataError as exc:
            raise Refusal("data", str(exc)) from None
        except PrivacyError as exc:  # the detail names local folders: it stays in the device's log
            log.error("%s", exc)
            raise Refusal(
                "budget",
                "these recordings are charged in another ledger on this device; "
                "its owner must use that one (the device's log says where)",
            ) from None
        budget = float(node_config["budget-epsilon"]) if "budget-epsilon" in node_config else None
        try:
            overrides = ProfileOverrides.from_mapping(node_config)
        except ConfigError as exc:
            raise Refusal("device", str(exc)) from None
        signing_key = Path(str(node_config.get("signing-key", ledger / SIGNING_KEY_FILE))).expanduser()
        log_dir = Path(str(node_config["log-dir"])).expanduser() if "log-dir" in node_config else None
        pretrained = str(node_config.get("pretrained", ""))
        return cls(client_id, data, ledger, budget, overrides, pretrained, signing_key, log_dir)


class PlanSession:
    """This node set up for one plan: its data split, owner budget, device profile, model and DP trainer.

    ``seeds`` are the release's seeds and secure noise key (:meth:`ReleaseBook.seeds`).
    """

    def __init__(self, node: NodeSetup, plan: Plan, seeds: ReleaseSeeds | None = None) -> None:
        config = plan.config
        self.node, self.plan = node, plan
        try:
            self.train_set, self.val_set = datasets(config.stage, node.data_path, HELD_OUT_FRACTION)
            if len(self.train_set) == 0:
                raise DataError(f"no usable training utterances in {node.data_path}")
        except DataError as exc:
            raise Refusal("data", str(exc)) from None
        self.ledger = Ledger(node.ledger_path)
        remember_epsilons(EpsilonStore(node.ledger_path / EPSILON_FILE))  # the last message asked the same
        try:
            self.owner: OwnerBudget = owner_budget(
                self.ledger, node.client_id, len(self.train_set), epsilon=node.budget_epsilon
            )
            check_plan(self.owner, config)
        except FedvoxError as exc:
            self.ledger.close()
            raise Refusal("budget", str(exc)) from None
        try:
            self._build(node, plan, seeds)
        except BaseException:
            self.ledger.close()
            raise

    def _build(self, node: NodeSetup, plan: Plan, seeds: ReleaseSeeds | None) -> None:
        config = plan.config
        spec = config.subset_spec
        try:
            self.profile: ResourceProfile = select_profile(
                probe(), config.stage, config.model_config, spec, node.overrides, logical_batch=config.logical_batch
            )
        except (ConfigError, DeviceError) as exc:
            raise Refusal("device", str(exc)) from None
        prepare_training_process(self.profile.threads)
        try:
            pretrained = (node.pretrained or config.pretrained) or None
            model = base_model(config.stage, config.model_config, spec, seed=config.model_seed, pretrained=pretrained)
        except (CheckpointError, ConfigError) as exc:
            raise Refusal("model", str(exc)) from None
        task = build_task(config.stage, model, self.train_set, self.profile)
        try:
            privacy = PrivacyPlan.for_run(config.dp, budget_epsilon=self.owner.epsilon, delta=self.owner.delta)
        except ConfigError as exc:  # e.g. the run's target epsilon is above this node's budget
            raise Refusal("budget", str(exc)) from None
        self.seeds = seeds
        self.trainer = Trainer(
            task,
            self.ledger,
            node.client_id,
            privacy,
            physical_batch=self.profile.physical_batch,
            noise_seed=seeds.noise if seeds else None,
            sample_seed=seeds.sample if seeds else None,
            noise_key=seeds.noise_key if seeds else None,
            account=answers_a_server,
        )
        rounds_left = config.num_server_rounds - plan.server_round + 1
        self.round_plan = RoundPlan(
            steps=config.local_steps,
            logical_batch=config.logical_batch,
            learning_rate=config.learning_rate,
            planned_steps=config.local_steps * max(rounds_left, 1),
            proximal_mu=config.proximal_mu if config.aggregation == "fedprox" else 0.0,
            sample_rate=config.dp.sample_rate,
        )

    def load_global(self, message: Message) -> None:
        """Load the received global subset; refuses if it is not this plan's model."""
        try:
            load_trainable_state_dict(self.trainer.task.model, from_wire(message.content.array_records[ARRAYS]))
        except (KeyError, CheckpointError, UpdateRejected) as exc:
            raise Refusal("model", f"the received model does not match the plan's: {exc}") from None

    def status(self, **overrides: object) -> ClientStatus:
        """This node's status: its epsilons are the federation account's, which depend on plan
        values only, not on ``N`` (local training rows are not in it)."""
        return ClientStatus(
            client_id=self.node.client_id,
            profile=self.profile.name,
            epsilon_spent=self.trainer.spent(),
            epsilon_budget=self.owner.epsilon,
            epsilon_next=self.epsilon_next(),
            **overrides,
        )

    def epsilon_next(self) -> float:
        """The federation account's epsilon after one more round of the plan."""
        try:
            return self.trainer.projected_epsilon(self.round_plan)
        except BudgetExceededError:  # a target-epsilon plan with no room left: no round fits
            return math.inf

    def release_id(self, entry: Entry) -> str:
        """The ledger's run id of a release: the plan's run id and the device's own release id."""
        return f"{self.plan.run_id}/{entry.release_id}"

    def close(self) -> None:
        if hasattr(self, "trainer"):
            self.trainer.close()
        self.ledger.close()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return _handle(msg, context, MessageClock("query"), lambda session, _: _content(session.status()))


@app.train()
def train(msg: Message, context: Context) -> Message:
    clock = MessageClock("train")

    def run(session: PlanSession, entry: Entry | None) -> RecordDict:
        session.load_global(msg)
        epsilon_next = session.epsilon_next()  # (what the account has spent is not needed yet: each costs seconds)
        if epsilon_next > session.owner.epsilon:
            raise Refusal(
                "budget",
                f"one more round would take epsilon to {epsilon_next:.3f}, "
                f"past this node's budget {session.owner.epsilon:g}",
            )
        plan = session.plan
        try:
            result = session.trainer.train(
                session.round_plan, run_id=session.release_id(entry), round=plan.server_round
            )
        except BudgetExceededError as exc:
            raise _budget_refusal(exc) from None
        # The DP steps' own time, for this node only (node state never leaves it; a simulation's
        # fleet mod reads it to split a message's time): nothing measured goes in the reply.
        context.state[LOCAL_TIMING] = MetricRecord(
            {"steps-s": result.metrics["steps_time_s"], "steps": float(plan.config.local_steps)}
        )
        clock.training_s = result.metrics["steps_time_s"]  # and in the device's log (client.message_times)
        received = read_update(msg.content.array_records[ARRAYS])  # views of the bytes that arrived
        rounding = torch.Generator().manual_seed(session.seeds.rounding if session.seeds else secrets.randbits(63))
        arrays = encode_update(result.state, received, plan.config.update_encoding, rounding)
        metrics = MetricRecord(
            {  # sizes fixed by the plan; nothing that depends on the recordings
                "bytes-down": record_bytes(msg.content.array_records[ARRAYS]),
                "bytes-up": record_bytes(arrays),
            }
        )
        return _content(session.status(), arrays=arrays, metrics=metrics)

    return _handle(msg, context, clock, run, release="train")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    clock = MessageClock("evaluate")

    def run(session: PlanSession, entry: Entry | None) -> RecordDict:
        config = session.plan.config
        if not config.evaluate:
            raise Refusal("policy", "the plan does not ask for evaluation (evaluate = false)")
        if len(session.val_set) == 0:
            raise Refusal("data", "no held-out utterances to evaluate on (prepare more recordings)")
        session.load_global(msg)
        trainer = session.trainer
        mechanism = loss_mechanism(config.dp.loss_noise_multiplier)
        release = Release(
            run_id=session.release_id(entry),
            round=session.plan.server_round,
            client_id=session.node.client_id,
            stage=config.stage,
            unit=UNIT,
            mechanism=mechanism,
            delta=session.owner.delta,
            clip_norm=config.dp.loss_clip,
        )
        budget = Budget(session.owner.epsilon)
        key = (release.run_id, release.round)
        try:
            budget.check(
                trainer.history(excluding=key),
                mechanism,
                delta=session.owner.delta,
                accountant=trainer.privacy.accountant,
                subject=f"client {session.node.client_id!r}",
            )
            loss = noisy_mean_loss(
                utterance_losses(trainer.task, session.val_set),
                clip=config.dp.loss_clip,
                noise_multiplier=config.dp.loss_noise_multiplier,
                noise=SecureGaussian(session.seeds.noise_key),
            )
            session.ledger.append(release, accountant=trainer.privacy.accountant, budget=budget)
        except BudgetExceededError as exc:
            raise _budget_refusal(exc) from None
        return _content(session.status(), metrics=MetricRecord({"val-loss": loss}))

    return _handle(msg, context, clock, run, release="evaluate")


def _budget_refusal(exc: BudgetExceededError) -> Refusal:
    """A release the whole ledger cannot afford: its figures (which count local training, hence
    ``N``) stay in the device's log; the server learns only that the owner's budget is used up."""
    log.error("%s", exc)
    return Refusal(
        "budget",
        "this release does not fit the owner's budget with the device's other releases "
        "(the figures stay on the device: `fedvox-client budget`)",
    )


def _handle(
    msg: Message,
    context: Context,
    clock: MessageClock,
    run: Callable[[PlanSession, Entry | None], RecordDict],
    release: str | None = None,
) -> Message:
    """Set up a session for the message's plan, run ``run`` on it, turn refusals into replies.

    A ``release`` message (train, evaluate) is answered under the device's release book: the
    stored reply if this exact message was answered before, otherwise a release id recorded
    before any work, whose reply is stored before it is sent. ``clock`` records the message's
    times in the device's log folder, if it has one.
    """
    set_offline_env()
    client_id = f"node-{context.node_id}"  # until the data folder's identity is known
    node: NodeSetup | None = None
    try:
        plan = Plan.from_record(msg.content.config_records[CONFIG])
        clock.run_id, clock.round = plan.run_id, plan.server_round
        node = NodeSetup.from_context(context, plan.config)
        client_id = node.client_id
        if release is None:
            return Message(_answer(node, plan, run, None), reply_to=msg)
        with ReleaseBook(node.ledger_path).locked() as book:
            digest = message_digest(msg)
            stored = book.reply(digest)
            if stored is not None:
                log.info("%s message answered before: sending the stored reply (no new release)", release)
                return Message(stored, reply_to=msg)
            if (
                release == "evaluate"
                and book.entry(digest) is None
                and book.answered(release, plan.run_id, plan.server_round) >= MAX_EVALUATIONS_PER_ROUND
            ):
                raise Refusal(
                    "policy",
                    f"this device answers at most {MAX_EVALUATIONS_PER_ROUND} evaluation(s) "
                    f"per round (run {plan.run_id}, round {plan.server_round})",
                )
            entry = book.begin(digest, release, plan.run_id, plan.server_round)
            content = _answer(node, plan, run, entry, book.seeds(entry.release_id))
            if ClientStatus.from_record(content.config_records[STATUS]).ok:
                book.finish(digest, content)
            return Message(content, reply_to=msg)
    except Refusal as refusal:
        log.warning("refusing %s: %s", msg.metadata.message_type, refusal)
        status = ClientStatus(client_id=client_id, outcome=REFUSED, reason=refusal.reason, detail=str(refusal))
        return Message(_content(status), reply_to=msg)
    except (KeyError, FedvoxError) as exc:  # a plan this client cannot read
        log.warning("refusing %s: %s", msg.metadata.message_type, exc)
        status = ClientStatus(client_id=client_id, outcome=REFUSED, reason="model", detail=str(exc))
        return Message(_content(status), reply_to=msg)
    finally:
        clock.record(node.log_dir if node is not None else None)


def _answer(
    node: NodeSetup,
    plan: Plan,
    run: Callable[[PlanSession, Entry | None], RecordDict],
    entry: Entry | None,
    seeds: ReleaseSeeds | None = None,
) -> RecordDict:
    """``run`` on a session of ``plan``; a refusal inside it carries the session's status. Either
    carries the ledger's head as it stands after this answer, signed by the device (a stored
    answer keeps its signature: the same bytes)."""
    session = PlanSession(node, plan, seeds)
    try:
        try:
            content = run(session, entry)
        except Refusal as refusal:
            log.warning("refusing: %s", refusal)
            content = _content(session.status(outcome=REFUSED, reason=refusal.reason, detail=str(refusal)))
        context = f"{plan.run_id}/{plan.server_round}"
        content[LEDGER_HEAD] = head_record(session.ledger, node.client_id, node.signing_key, context)
        return content
    finally:
        session.close()


def _content(status: ClientStatus, **records: object) -> RecordDict:
    content = RecordDict({STATUS: status.to_record()})
    if "arrays" in records:
        content[ARRAYS] = records["arrays"]
    if "metrics" in records:
        content[METRICS] = records["metrics"]
    return content


__all__ = ["LOCAL_TIMING", "MAX_EVALUATIONS_PER_ROUND", "NodeSetup", "PlanSession", "Refusal", "app"]
