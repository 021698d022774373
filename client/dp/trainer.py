"""A client's DP-SGD releases: plan the noise, check the budget, train, charge the ledger.

A *release* is a run of DP-SGD steps whose result leaves the training loop (a federated round's
update, or a local checkpoint). :class:`Trainer` produces one release at a time:

1. plan the mechanism: the plan's sample rate (federated rounds, so epsilon does not depend on
   ``N``) or ``logical_batch / N`` (local runs), the noise multiplier given or
   calibrated so the trainer's *account* (the ledger rows it reports on: every row for a local
   run, only the federation's rows in a federation) plus everything still planned reaches the
   target epsilon;
2. refuse before any compute if the release would take the client's whole ledger past its budget;
3. run the steps (Poisson logical batches, physical batches from the device profile);
4. append the release to the ledger (idempotent per ``(run_id, round)``; the ledger re-checks the
   budget under its write lock) before the result is returned.

s2 privatises generator and discriminator on the same Poisson batch; the pair is accounted as one
subsampled Gaussian with the effective noise multiplier (docs/privacy.md). Each gets
``sigma * sqrt(2)`` so the pair's effective multiplier is the planned ``sigma``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import secrets
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedvox.client.dp.engine import PrivateModel, make_private, poisson_sample, run_logical_step
from fedvox.client.dp.monitor import TrainingMonitor, peak_memory
from fedvox.client.dp.optimizer import FedvoxDPOptimizer
from fedvox.client.dp.task import Task
from fedvox.shared.errors import ConfigError, DataError
from fedvox.shared.models.subsets import load_trainable_state_dict, trainable_state_dict
from fedvox.shared.privacy.accounting import DEFAULT_ACCOUNTANT, Mechanism, calibrate_noise_multiplier, epsilon
from fedvox.shared.privacy.budget import Budget
from fedvox.shared.privacy.ledger import Component, Ledger, LedgerRow, Release
from fedvox.shared.privacy.noise import SecureGaussian
from fedvox.shared.runconfig import UtteranceDP

log = logging.getLogger(__name__)

UNIT = "utterance"


@dataclass(frozen=True)
class PrivacyPlan:
    """Utterance-level DP-SGD settings of a client."""

    clip_norm: float = 1.0
    delta: float = 1e-5
    budget_epsilon: float = 10.0
    noise_multiplier: float | None = 1.0
    target_epsilon: float | None = None  # when set, the noise is calibrated to reach it
    accountant: str = DEFAULT_ACCOUNTANT

    @classmethod
    def for_run(cls, dp: UtteranceDP, *, budget_epsilon: float, delta: float | None = None) -> PrivacyPlan:
        """The plan a client follows under a run's ``dp`` settings and a budget (a device's owner
        also sets the delta): a target epsilon (> 0) calibrates the noise, otherwise the noise
        multiplier is used as given."""
        calibrated = dp.target_epsilon > 0
        return cls(
            clip_norm=dp.clip_norm,
            delta=dp.delta if delta is None else delta,
            budget_epsilon=budget_epsilon,
            noise_multiplier=None if calibrated else dp.noise_multiplier,
            target_epsilon=dp.target_epsilon if calibrated else None,
        )

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ConfigError("give exactly one of a noise multiplier or a target epsilon")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ConfigError(
                f"noise multiplier must be > 0 (got {self.noise_multiplier}): without noise there is "
                "no privacy guarantee"
            )
        if self.target_epsilon is not None and self.target_epsilon > self.budget_epsilon:
            raise ConfigError(
                f"target epsilon {self.target_epsilon} is above the budget {self.budget_epsilon}; "
                "lower the target or raise the budget"
            )


@dataclass(frozen=True)
class RoundPlan:
    """How much to train in one release, and how much is planned after it."""

    steps: int
    logical_batch: int
    learning_rate: float
    planned_steps: int = 0  # steps the target epsilon must still cover, this release included
    proximal_mu: float = 0.0  # FedProx: pull towards the weights the release started from
    sample_rate: float | None = None  # the plan's Poisson rate (the sum is divided by logical_batch); None: B / N

    def __post_init__(self) -> None:
        for name in ("steps", "logical_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be at least 1")
        if self.sample_rate is not None and not 0 < self.sample_rate <= 1:
            raise ConfigError(f"sample rate must be in (0, 1], got {self.sample_rate}")
        if not self.learning_rate > 0:
            raise ConfigError("learning rate must be > 0")
        if self.proximal_mu < 0:
            raise ConfigError("the FedProx proximal mu must be >= 0")


@dataclass
class ReleaseResult:
    """One release: the trainable subset after it, its ledger row and what it measured."""

    state: dict[str, torch.Tensor]
    row: LedgerRow
    noise_multiplier: float
    sample_rate: float
    metrics: dict[str, float]


class Trainer:
    """Trains one task for one client, one privacy-accounted release at a time.

    ``account`` picks the ledger rows that :meth:`spent`, :meth:`projected_epsilon` and the
    calibration of a target epsilon count (default: all); the budget is always checked against
    all of them. A federation passes :func:`client.releases.answers_a_server`, so nothing the
    server sees is computed from local rows accounted at ``q = B/N``.

    ``noise_seed``/``sample_seed`` make a run reproducible (tests, simulations); leave them unset
    in deployment so the noise comes from the operating system's secret randomness: noise an
    adversary can predict protects nothing. ``noise_key`` (32 secret bytes, per release:
    :meth:`reseed`) draws the noise from a ChaCha20 stream instead of torch's generator. ``optimizer_class`` builds
    each part's DP optimizer
    (a subclass of :class:`FedvoxDPOptimizer`; the canary audit's injects white-box canaries).
    """

    def __init__(
        self,
        task: Task,
        ledger: Ledger,
        client_id: str,
        privacy: PrivacyPlan,
        *,
        physical_batch: int,
        monitor: TrainingMonitor | None = None,
        noise_seed: int | None = None,
        sample_seed: int | None = None,
        noise_key: bytes | None = None,
        optimizer_class: Callable[..., FedvoxDPOptimizer] = FedvoxDPOptimizer,
        account: Callable[[LedgerRow], bool] | None = None,
    ) -> None:
        self.task, self.ledger, self.client_id, self.privacy = task, ledger, client_id, privacy
        self.account = account
        self.physical_batch = physical_batch
        self.monitor = monitor or TrainingMonitor(None)
        self.budget = Budget(privacy.budget_epsilon)
        self.num_examples = len(task.dataset)
        if self.num_examples == 0:
            raise DataError("no training utterances: run `fedvox-client prepare` on your recordings first")
        self.sample_generator = torch.Generator().manual_seed(_seed(sample_seed))
        noise_device = task.device if task.device.type != "mps" else torch.device("cpu")
        self.noise_generator = torch.Generator(device=noise_device).manual_seed(_seed(noise_seed))
        self.private: dict[str, PrivateModel] = {}
        self.steps_done = 0
        for name, module in task.parts().items():
            optimizer = task.optimizer(name, module, learning_rate=1.0)
            for group in optimizer.param_groups:  # relative rates (s2's text side) survive re-planning
                group["lr_scale"] = group["lr"]
            self.private[name] = make_private(
                module,
                optimizer,
                noise_multiplier=1.0,
                clip_norm=privacy.clip_norm,
                expected_batch_size=1.0,
                noise_generator=self.noise_generator,
                loss_scale=task.loss_scale,
                optimizer_class=optimizer_class,
            )
        self.wrapped = {name: p.module for name, p in self.private.items()}
        self._set_noise_key(noise_key)

    def reseed(self, noise_seed: int, sample_seed: int, noise_key: bytes | None = None) -> None:
        """Start a release's own randomness (local training: one per segment)."""
        self.noise_generator.manual_seed(noise_seed)
        self.sample_generator.manual_seed(sample_seed)
        self._set_noise_key(noise_key)

    def _set_noise_key(self, key: bytes | None) -> None:
        for name, private in self.private.items():  # each part its own stream
            private.optimizer.secure_noise = (
                None if key is None else SecureGaussian(hashlib.sha256(key + name.encode()).digest())
            )

    # ------------------------------------------------------------------ planning
    def sample_rate(self, logical_batch: int) -> float:
        return min(1.0, logical_batch / self.num_examples)

    def history(self, excluding: tuple[str, int] | None = None, *, account: bool = False) -> list[Mechanism]:
        """The client's utterance-level releases (``account``: only the trainer's account), without
        the one keyed ``(run_id, round)``.

        Excluding the release being (re)made matters after a kill between the ledger append and
        the checkpoint: the redone release must be planned and checked as it was the first time.
        """
        return [
            row.to_mechanism()
            for row in self.ledger.rows(self.client_id, UNIT)
            if (excluding is None or (row.run_id, row.round) != excluding)
            and not (account and self.account is not None and not self.account(row))
        ]

    def mechanism(self, plan: RoundPlan, excluding: tuple[str, int] | None = None) -> Mechanism:
        """The (effective) Gaussian mechanism this release would apply."""
        q = self.sample_rate(plan.logical_batch) if plan.sample_rate is None else plan.sample_rate
        if self.privacy.noise_multiplier is not None:
            return Mechanism(self.privacy.noise_multiplier, q, plan.steps)
        assert self.privacy.target_epsilon is not None  # a PrivacyPlan holds exactly one of the two
        sigma = calibrate_noise_multiplier(
            self.privacy.target_epsilon,
            self.privacy.delta,
            sample_rate=q,
            steps=max(plan.planned_steps, plan.steps),
            history=self.history(excluding, account=True),
            accountant=self.privacy.accountant,
        )
        return Mechanism(sigma, q, plan.steps)

    def projected_epsilon(self, plan: RoundPlan) -> float:
        """The account's utterance-level epsilon after this release (no budget check)."""
        history = (*self.history(account=True), self.mechanism(plan))
        return epsilon(history, self.privacy.delta, self.privacy.accountant)

    def spent(self) -> float:
        """The account's utterance-level epsilon (the ledger's total when the account is every row)."""
        if self.account is None:
            return self.ledger.spent(self.client_id, UNIT)
        return epsilon(self.history(account=True), self.privacy.delta, self.privacy.accountant)

    # ------------------------------------------------------------------ training
    def train(self, plan: RoundPlan, *, run_id: str, round: int) -> ReleaseResult:
        """Run one release; raises :class:`BudgetExceededError` before training if it cannot afford it."""
        this_release = (run_id, round)
        mechanism = self.mechanism(plan, excluding=this_release)
        subject = f"client {self.client_id!r} (utterance level)"
        self.budget.check(
            self.history(excluding=this_release),
            mechanism,
            delta=self.privacy.delta,
            accountant=self.privacy.accountant,
            subject=subject,
        )
        part_sigma = mechanism.noise_multiplier * math.sqrt(len(self.private))
        # The noisy sum is divided by a public constant where the plan fixes q: q * N would scale
        # every coordinate of the released update by the private N (AdamW hides it, bar its eps).
        public = plan.sample_rate is not None
        expected_batch = plan.logical_batch if public else mechanism.sample_rate * self.num_examples
        for private in self.private.values():
            private.optimizer.noise_multiplier = part_sigma
            private.optimizer.expected_batch_size = expected_batch
            for group in private.optimizer.param_groups:
                group["lr"] = plan.learning_rate * group["lr_scale"]
            private.optimizer.attach_step_hook(_proximal_term(private.optimizer.params, plan.proximal_mu))

        sums: dict[str, float] = {}
        step_times: list[float] = []
        for _ in range(plan.steps):
            start = time.perf_counter()
            indices = poisson_sample(self.num_examples, mechanism.sample_rate, self.sample_generator)
            step_seed = int(torch.randint(0, 2**62, (), generator=self.sample_generator))
            # Dropout draws from the global generator: seed it per step (inside a fork, leaving
            # the caller's state alone) so a resumed run redoes exactly the same steps.
            devices = [self.task.device] if self.task.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(step_seed)
                outcome = run_logical_step(
                    indices,
                    self.physical_batch,
                    functools.partial(self.task.accumulate, self.wrapped, step_seed=step_seed),
                    [p.optimizer for p in self.private.values()],
                )
            self.physical_batch = outcome.physical_batch_size
            elapsed = time.perf_counter() - start
            step_times.append(elapsed)
            self.steps_done += 1
            for key, value in outcome.sums.items():
                sums[key] = sums.get(key, 0.0) + value
            self.monitor.log(self.steps_done, self._step_metrics(outcome, elapsed))

        release = self._release(mechanism, run_id, round)
        row = self.ledger.append(release, accountant=self.privacy.accountant, budget=self.budget)
        metrics = {
            **self.task.means(sums),
            "examples_seen": sums.get("examples", 0.0),
            "steps": float(plan.steps),
            "step_time_s": statistics.median(step_times),
            "steps_time_s": sum(step_times),
            "noise_multiplier": mechanism.noise_multiplier,
            "sample_rate": mechanism.sample_rate,
            "epsilon": row.epsilon,
            **peak_memory(self.task.device),
        }
        return ReleaseResult(
            trainable_state_dict(self.task.model), row, mechanism.noise_multiplier, mechanism.sample_rate, metrics
        )

    def evaluate(self, dataset, batch_size: int = 8) -> dict[str, float]:
        """Validation means over every utterance of ``dataset`` (no noise: it is never released
        as a model, but the numbers themselves are computed from private recordings)."""
        sums: dict[str, float] = {}
        for chunk in torch.arange(len(dataset)).split(batch_size):
            for key, value in self.task.evaluate(dataset, chunk).items():
                sums[key] = sums.get(key, 0.0) + value
        return self.task.means(sums) if sums else {}

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """What continuing exactly needs: the trainable subset, each part's optimizer state, the
        step counter and the physical batch (the random generators are reseeded per release)."""
        return {
            "state": trainable_state_dict(self.task.model),
            "optimizers": {name: p.optimizer.original_optimizer.state_dict() for name, p in self.private.items()},
            "physical_batch": self.physical_batch,
            "step": self.steps_done,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        load_trainable_state_dict(self.task.model, state["state"])
        for name, private in self.private.items():
            private.optimizer.original_optimizer.load_state_dict(state["optimizers"][name])
        self.physical_batch = int(state["physical_batch"])
        self.steps_done = int(state["step"])

    def close(self) -> None:
        """Remove Opacus hooks from the task's modules."""
        for private in self.private.values():
            private.close()
        self.monitor.close()

    # ------------------------------------------------------------------ internals
    def _release(self, mechanism: Mechanism, run_id: str, round: int) -> Release:
        if len(self.private) == 1:
            return Release(
                run_id=run_id,
                round=round,
                client_id=self.client_id,
                stage=self.task.stage,
                unit=UNIT,
                mechanism=mechanism,
                delta=self.privacy.delta,
                clip_norm=self.privacy.clip_norm,
            )
        components = tuple(
            Component(name, private.optimizer.noise_multiplier, self.privacy.clip_norm)
            for name, private in self.private.items()
        )
        return Release.shared_batch(
            run_id=run_id,
            round=round,
            client_id=self.client_id,
            stage=self.task.stage,
            unit=UNIT,
            sample_rate=mechanism.sample_rate,
            steps=mechanism.steps,
            delta=self.privacy.delta,
            components=components,
        )

    def _step_metrics(self, outcome, elapsed: float) -> dict[str, float]:
        examples = max(outcome.batch_size, 1)
        metrics: dict[str, float] = {
            "batch_size": float(outcome.batch_size),
            "physical_batch": float(outcome.physical_batch_size),
            "step_time_s": elapsed,
            "samples_per_s": outcome.batch_size / elapsed if elapsed > 0 else 0.0,
            **{k[: -len("_sum")]: v / examples for k, v in outcome.sums.items() if k.endswith("_sum")},
            **peak_memory(self.task.device),
        }
        for name, private in self.private.items():
            stats = private.optimizer.take_stats()
            metrics[f"{name}/clipped_fraction"] = stats.clipped_fraction
            metrics[f"{name}/nonfinite_samples"] = float(stats.nonfinite_samples)
            metrics[f"{name}/skipped_steps"] = float(private.optimizer.skipped_nonfinite_steps)
            metrics.update({f"{name}/{k}": v for k, v in stats.quantiles().items()})
        return metrics


def _proximal_term(params: list[torch.nn.Parameter], mu: float):
    """FedProx's ``mu * (w - w_start)`` added to the noisy gradient (``None`` when ``mu == 0``).

    It depends on no data, only on the weights the release started from, so adding it after the
    noise is post-processing: it costs no privacy.
    """
    if mu == 0:
        return None
    anchors = [p.detach().clone() for p in params]

    def hook(optimizer) -> None:
        for p, anchor in zip(params, anchors, strict=True):
            assert p.grad is not None  # the DP optimizer has just set every parameter's noisy gradient
            p.grad.add_(p.detach() - anchor, alpha=mu)

    return hook


def _seed(seed: int | None) -> int:
    return secrets.randbits(63) if seed is None else int(seed)
