"""One canary audit: s1 trained by the production DP trainer with canaries among its examples.

The training set is the prepared cache's utterances, the IN black-box canaries (real s1
examples) and one placeholder per IN white-box canary. The trainer's own Poisson draw picks
from all of them at one sample rate, so canaries are accounted exactly like recordings; the
sample rate is fixed before membership is drawn, so one canary's membership cannot change how
any other example is sampled. The run is charged to a ledger of its own by the trainer, and that
row's epsilon is what the empirical bound is checked against.
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from dp_accounting.pld import pld_privacy_accountant
from torch.utils.data import Dataset

from fedvox.client.canary.blackbox import BlackBoxCanaries
from fedvox.client.canary.guesses import OneRunBound, one_run_bound
from fedvox.client.canary.spec import CanaryAuditSpec
from fedvox.client.canary.whitebox import CanaryDPOptimizer, WhiteBoxCanaries, free_coordinates
from fedvox.client.data.cache import FeatureCache
from fedvox.client.data.datasets import S1Dataset, S1Example
from fedvox.client.dp import PrivacyPlan, RoundPlan, Trainer
from fedvox.client.dp.monitor import TrainingMonitor
from fedvox.client.stages.s1 import S1Task
from fedvox.shared.errors import ConfigError, DataError
from fedvox.shared.models.factory import build_model
from fedvox.shared.models.subsets import SubsetSpec
from fedvox.shared.privacy.accounting import Mechanism
from fedvox.shared.privacy.audit import PLD_DISCRETISATION, dp_events
from fedvox.shared.privacy.ledger import Ledger, LedgerRow

log = logging.getLogger(__name__)

WHITE_BOX = "white-box"
BLACK_BOX = "black-box"
VIOLATION = "violation"
NO_POWER = "no_power"


@dataclass(frozen=True)
class CanaryFinding:
    """Something that fails the audit."""

    kind: str
    message: str


@dataclass(frozen=True)
class CanaryResult:
    """One kind of canary: its bound and how its scores split."""

    kind: str
    canaries: int
    included: int
    bound: OneRunBound
    mean_score_in: float
    mean_score_out: float
    score: str
    """What the score is, in words."""
    scores: torch.Tensor
    member: torch.Tensor


@dataclass
class CanaryAudit:
    """Everything one audit measured."""

    spec: CanaryAuditSpec
    seed: int
    data_examples: int
    training_examples: int
    """Data plus IN canaries: what the sample rate applies to."""
    epsilon: float
    """The trainer's ledger row: the accountant's epsilon for this run."""
    epsilon_pld: float
    """dp-accounting's PLD on the same mechanism, an independent recomputation."""
    results: list[CanaryResult]
    findings: list[CanaryFinding] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def theoretical_epsilon(self) -> float:
        """The tightest certified epsilon (both are upper bounds): what no lower bound may exceed."""
        return min(self.epsilon, self.epsilon_pld)


class CanaryDataset(Dataset):
    """Data, then IN black-box canaries, then one placeholder per IN white-box canary."""

    def __init__(self, data: Dataset, black_box: list[S1Example], white_box: int) -> None:
        self.data, self.black_box, self.white_box = data, black_box, white_box
        self.white_box_start = len(data) + len(black_box)

    def __len__(self) -> int:
        return self.white_box_start + self.white_box

    def __getitem__(self, index: int) -> S1Example:
        if index < len(self.data):
            return self.data[index]
        if index < self.white_box_start:
            return self.black_box[index - len(self.data)]
        raise IndexError(f"example {index} is a white-box canary: it has a gradient, not data")


class CanaryS1Task(S1Task):
    """s1's step with white-box placeholders handed to the canaries instead of the model."""

    def __init__(
        self,
        model: torch.nn.Module,
        dataset: CanaryDataset,
        device: torch.device,
        precision: str,
        white_box: WhiteBoxCanaries | None,
    ) -> None:
        super().__init__(model, dataset, device, precision)
        self.white_box = white_box

    def accumulate(self, wrapped, indices, step_seed):
        start = self.dataset.white_box_start
        examples, placeholders = indices[indices < start], indices[indices >= start]
        if self.white_box is not None:
            self.white_box.sample(placeholders - start)
        return super().accumulate(wrapped, examples, step_seed) if len(examples) else {}


class _CanaryTrainer(Trainer):
    """The production trainer at the audit's mechanism (noise 0 allowed: the DP-off control)."""

    def __init__(self, *args, noise_multiplier: float, sample_rate: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.audit_noise, self.audit_rate = noise_multiplier, sample_rate

    def mechanism(self, plan: RoundPlan, excluding=None) -> Mechanism:
        return Mechanism(self.audit_noise, self.audit_rate, plan.steps)


class _ProgressMonitor(TrainingMonitor):
    """Calls ``advance`` after every training step (the CLI's progress bar)."""

    def __init__(self, advance: Callable[[], None]) -> None:
        super().__init__(None)
        self.advance = advance

    def log(self, step, metrics, kind="train") -> None:
        super().log(step, metrics, kind)
        self.advance()


def run_canary_audit(
    data_dir: str | Path,
    spec: CanaryAuditSpec,
    *,
    seed: int | None = None,
    ledger_dir: str | Path | None = None,
    on_step: Callable[[], None] | None = None,
) -> CanaryAudit:
    """Train s1 on the cache at ``data_dir`` with canaries, then bound epsilon from below.

    ``seed`` fixes every draw (canaries, sampling, noise); by default it is random and reported.
    The run is charged to the ledger in ``ledger_dir`` (default: a temporary one), never to the
    data folder's own. ``on_step`` is called after every training step (progress bars).
    """
    seed = secrets.randbits(62) if seed is None else int(seed)
    started = time.perf_counter()
    device = torch.device(spec.device)
    data = S1Dataset(FeatureCache(data_dir))
    if len(data) == 0:
        raise DataError(f"no usable s1 utterances in {data_dir}; run `fedvox-client prepare` first")
    draws = torch.Generator().manual_seed(seed + 2)
    black_box_member = torch.rand(spec.black_box, generator=draws) < 0.5
    white_box_member = torch.rand(spec.white_box, generator=draws) < 0.5

    model = build_model("s1", spec.model_config, SubsetSpec(kind="full"), seed=0, pretrained=spec.pretrained)
    black_box = None
    if spec.black_box:
        black_box = BlackBoxCanaries.draw(black_box_member, data.symbols_version, draws)
    white_box = None
    if spec.white_box:
        used = {int(i) for k in range(len(data)) for i in data[k].phoneme_ids}
        used |= black_box.phoneme_ids() if black_box else set()
        table = model.ar_text_embedding.weight
        rows, cols = free_coordinates(table.shape[0], table.shape[1], used, spec.white_box, draws)
        white_box = WhiteBoxCanaries(
            table,
            rows,
            cols,
            white_box_member,
            noise_multiplier=spec.noise_multiplier,
            sample_rate=spec.sample_rate,
        )
    dataset = CanaryDataset(
        data, black_box.included_examples if black_box else [], white_box.included if white_box else 0
    )
    task = CanaryS1Task(model, dataset, device, "fp32", white_box)
    initial_loss = black_box.losses(model, device, "fp32") if black_box else None

    with tempfile.TemporaryDirectory(prefix="fedvox-canary-") as scratch:
        ledger = Ledger(ledger_dir or scratch)
        # The audit fixes the mechanism itself (_CanaryTrainer.mechanism), so the plan has no
        # noise and no target of its own, and no budget: the DP-off control must run too.
        privacy = PrivacyPlan(
            clip_norm=spec.clip_norm,
            delta=spec.delta,
            budget_epsilon=math.inf,
            noise_multiplier=None,
            target_epsilon=math.inf,
            accountant=spec.accountant,
        )
        extra = {"optimizer_class": functools.partial(CanaryDPOptimizer, canaries=white_box)} if white_box else {}
        trainer = _CanaryTrainer(
            task,
            ledger,
            f"canary-audit-{seed}",
            privacy,
            physical_batch=spec.physical_batch,
            monitor=_ProgressMonitor(on_step or (lambda: None)),
            noise_seed=seed,
            sample_seed=seed + 1,
            noise_multiplier=spec.noise_multiplier,
            sample_rate=spec.sample_rate,
            **extra,
        )
        try:
            trained = time.perf_counter()
            plan = RoundPlan(spec.steps, max(1, round(spec.sample_rate * len(dataset))), spec.learning_rate)
            release = trainer.train(plan, run_id=f"canary-audit-{seed}", round=1)
            training_s = time.perf_counter() - trained
        finally:
            trainer.close()
            ledger.close()
    row = release.row
    audit = CanaryAudit(
        spec=spec,
        seed=seed,
        data_examples=len(data),
        training_examples=len(dataset),
        epsilon=row.epsilon,
        epsilon_pld=_pld_epsilon(row, spec.delta),
        results=[],
        timings={"training_s": training_s, "step_s": release.metrics["step_time_s"]},
    )
    ties = torch.Generator().manual_seed(seed + 3)
    # The audit fails if any kind's bound exceeds the accountant's epsilon, so the kinds share its
    # error probability (Bonferroni): a correct training fails with probability <= 1 - confidence.
    kinds = (white_box is not None) + (black_box is not None)
    confidence = 1 - (1 - spec.confidence) / max(kinds, 1)
    if white_box is not None:
        if white_box.steps != spec.steps:
            raise ConfigError(f"white-box canaries were scored at {white_box.steps} of {spec.steps} steps")
        audit.results.append(
            _result(
                WHITE_BOX,
                white_box.scores,
                white_box.member,
                spec,
                confidence,
                ties,
                "log-likelihood ratio of the released noisy gradients, summed over steps"
                if spec.noise_multiplier > 0
                else "sum of the released gradients over steps",
            )
        )
    if black_box is not None:
        drop = initial_loss - black_box.losses(model, device, "fp32")
        audit.results.append(
            _result(BLACK_BOX, drop, black_box.member, spec, confidence, ties, "loss drop, initial to final model")
        )
    audit.findings = _findings(audit)
    audit.timings["total_s"] = time.perf_counter() - started
    return audit


def _result(
    kind: str,
    scores: torch.Tensor,
    member: torch.Tensor,
    spec: CanaryAuditSpec,
    confidence: float,
    ties: torch.Generator,
    score: str,
) -> CanaryResult:
    bound = one_run_bound(scores, member, delta=spec.delta, confidence=confidence, generator=ties)
    return CanaryResult(
        kind=kind,
        canaries=len(member),
        included=int(member.sum()),
        bound=bound,
        mean_score_in=float(scores[member].mean()) if member.any() else math.nan,
        mean_score_out=float(scores[~member].mean()) if (~member).any() else math.nan,
        score=score,
        scores=scores,
        member=member,
    )


def _pld_epsilon(row: LedgerRow, delta: float) -> float:
    """dp-accounting's PLD epsilon for the run's ledger row (a code base apart from Opacus)."""
    if row.noise_multiplier == 0:
        return math.inf
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETISATION)
    accountant.compose(dp_events(row)[1])
    return float(accountant.get_epsilon(delta))


POWER_FRACTION = 0.5
"""Without noise the white-box audit must reach at least this share of what its canaries can show."""


def _findings(audit: CanaryAudit) -> list[CanaryFinding]:
    findings = []
    if audit.spec.noise_multiplier > 0:
        for result in audit.results:
            if result.bound.epsilon > audit.theoretical_epsilon:
                findings.append(
                    CanaryFinding(
                        VIOLATION,
                        (
                            f"{result.kind} canaries show epsilon >= {result.bound.epsilon:.3f} at "
                            f"{100 * result.bound.confidence:g}% confidence, above the accountant's "
                            f"{audit.theoretical_epsilon:.3f}: the training is less private than accounted "
                            "(a bug in clipping, noise, sampling or accounting; or the "
                            f"{100 * (1 - audit.spec.confidence):g}% chance that the audit's bounds are wrong, so "
                            "rerun "
                            "with another --seed before concluding)"
                        ),
                    )
                )
        return findings
    white = next((r for r in audit.results if r.kind == WHITE_BOX), None)
    if white is not None and white.bound.epsilon < POWER_FRACTION * white.bound.cap:
        spec = audit.spec
        seen = 1 - (1 - spec.sample_rate) ** spec.steps
        findings.append(
            CanaryFinding(
                NO_POWER,
                (
                    f"without noise the white-box canaries show only epsilon >= {white.bound.epsilon:.3f} "
                    f"(these canaries can show up to {white.bound.cap:.3f}): injected gradients do not reach "
                    f"the released update, or too few steps sample them (an IN canary is sampled at least "
                    f"once with probability {seen:.3f}; raise --steps or --sample-rate)"
                ),
            )
        )
    return findings
