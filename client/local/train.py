"""Local-only DP fine-tuning (``fedvox-client train``): the baseline and the federated building block.

Training runs in segments of ``checkpoint_every`` steps. Before the first step, every remaining
segment is accounted together against the budget (:func:`plan_run`): a run that does not fit is
refused whole, never stopped part-way. Each segment is then one release: trained, charged to the
data folder's ledger (which checks the budget again under its lock), then checkpointed. A run killed at
any point resumes from its last checkpoint and is never charged twice: a segment that was charged
but not checkpointed is redone with the same random states, so it is the same release and the
ledger's idempotent append returns the row it already has.

Each segment's noise and sampling seeds are derived from its release id (run id and segment)
under the device's secret release key (:meth:`client.releases.ReleaseBook.seeds`, kept beside the
ledger), so a resume redraws them and ``OUT/`` (``run.json``, checkpoints, ``export/``) holds no
seed or generator state: anyone given those files cannot predict the noise.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import asdict, field
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field

from fedvox.client.data.split import HELD_OUT_FRACTION
from fedvox.client.dp import PrivacyPlan, RoundPlan, Trainer
from fedvox.client.dp.monitor import TrainingMonitor
from fedvox.client.dp.trainer import UNIT
from fedvox.client.host import prepare_training_process
from fedvox.client.identity import bind_ledger, identity
from fedvox.client.local.checkpoints import SegmentCheckpoints
from fedvox.client.profiles import ResourceProfile
from fedvox.client.releases import ReleaseBook, ReleaseSeeds, release_seeds
from fedvox.client.stages import build_task, datasets
from fedvox.shared.atomic import atomic_write_text, claim_folder
from fedvox.shared.cli import StepProgress
from fedvox.shared.errors import BudgetExceededError, ConfigError
from fedvox.shared.models.factory import build_model, export_all
from fedvox.shared.models.interop import save_safetensors
from fedvox.shared.models.subsets import SubsetSpec, trainable_state_dict
from fedvox.shared.privacy.accounting import Mechanism, calibrate_noise_multiplier, epsilon
from fedvox.shared.privacy.budget import Budget
from fedvox.shared.privacy.ledger import Ledger, OwnerBudget, ledger_file, read_rows
from fedvox.shared.runconfig import S2Training, subset_spec
from fedvox.shared.settings import flatten, settings

log = logging.getLogger(__name__)

RUN_FILE = "run.json"


@settings("local training")
class LocalTrainingSpec:
    """Everything that defines a local run (stored in ``OUT/run.json``; a resume must match it)."""

    stage: str
    model_config: str = "tiny"
    subset: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    groups: str = ""  # module groups trained in full, comma-separated (RunConfig.groups)
    s2: S2Training = field(default_factory=S2Training)  # what an s2 run trains, as in a federated one
    steps: Annotated[int, Field(ge=1)] = 100
    logical_batch: int = 8
    learning_rate: float = 1e-3
    checkpoint_every: Annotated[int, Field(ge=1)] = 20
    model_seed: int = 0
    pretrained: str | None = None
    validation_fraction: float = HELD_OUT_FRACTION
    privacy: PrivacyPlan = field(default_factory=PrivacyPlan)

    @property
    def subset_spec(self) -> SubsetSpec:
        return subset_spec(self.stage, self.subset, self.lora_rank, self.lora_alpha, self.groups, self.s2)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_local(
    data_dir: str | Path,
    out_dir: str | Path,
    spec: LocalTrainingSpec,
    profile: ResourceProfile,
    *,
    seed: int | None = None,
    show_progress: bool = True,
    keep_checkpoints: int = 3,
    exports: bool = True,
    home: str | Path | None = None,
    strict: bool = False,
    first_budget: OwnerBudget | None = None,
) -> dict[str, Any]:
    """Run (or resume) a local DP fine-tuning; returns a summary (also in ``OUT/summary.json``).

    The whole remaining run is accounted before anything is written: a run that would pass the
    budget is refused with no run folder made and nothing trained or charged, and the same
    command continues it once the budget is raised. A finished run is reported as it stands.
    ``strict`` refuses a run that cannot learn (:func:`usefulness`) instead of warning.
    ``keep_checkpoints`` segment checkpoints are kept (a simulation's local baseline keeps one per
    round to score each). ``exports``: write the trained model in fedvox's and GPT-SoVITS's
    formats at the end (a baseline scored from its checkpoints needs none). ``home`` is the fedvox
    home recording the recordings' one ledger (the data folder's; :func:`client.identity.bind_ledger`).
    ``first_budget``, the owner's budget where none was recorded yet, is recorded with the binding
    once the run is accepted.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    previous = _previous_run(out_dir, spec)
    store = SegmentCheckpoints(out_dir / "checkpoints", keep=keep_checkpoints)
    steps_done = max(store.steps(), default=0) if previous else 0
    if previous and steps_done >= spec.steps and (out_dir / "summary.json").is_file():
        log.info("%s finished earlier (%d steps); nothing trained or charged", out_dir, steps_done)
        return {**json.loads((out_dir / "summary.json").read_text()), "finished_earlier": True}
    train_set, val_set = datasets(spec.stage, data_dir, spec.validation_fraction)
    client_id = identity(data_dir).client_id  # bound to its ledger once the run is accepted
    run_id = previous["run_id"] if previous else f"local-{secrets.token_hex(6)}"
    if steps_done < spec.steps:  # (all steps done, the export not: only the export is left)
        whole = plan_run(data_dir, client_id, spec, len(train_set), steps_done, run_id)
        for warning in usefulness(whole, len(train_set), strict=strict):
            log.warning("%s", warning)
    bind_ledger(data_dir, data_dir, home)
    if first_budget is not None:
        with Ledger(data_dir) as book:
            book.set_owner_budget(first_budget)
    run = _write_run_record(out_dir, spec, previous, run_id)
    prepare_training_process(profile.threads)
    model = build_model(
        spec.stage, spec.model_config, spec.subset_spec, seed=spec.model_seed, pretrained=spec.pretrained
    )
    task = build_task(spec.stage, model, train_set, profile)
    monitor = TrainingMonitor(out_dir / "logs")
    log.info("logs: %s (TensorBoard: tensorboard --logdir %s)", monitor.log_dir, monitor.log_dir / "tensorboard")
    trainer = Trainer(
        task,
        Ledger(data_dir),
        client_id,
        spec.privacy,
        physical_batch=profile.physical_batch,
        monitor=monitor,
    )
    seeds = ReleaseBook(data_dir).seeds if seed is None else _fixed_seeds(seed)
    _restore(trainer, store)
    segments = -(-spec.steps // spec.checkpoint_every)
    first = trainer.steps_done // spec.checkpoint_every + 1
    summary: dict[str, Any] = {"run_id": run["run_id"], "client_id": client_id, "profile": profile.name}
    try:
        with StepProgress("DP training", spec.steps, trainer.steps_done, visible=show_progress) as bar:
            monitor.on_step = bar.update
            for segment in range(first, segments + 1):
                steps = min(spec.checkpoint_every, spec.steps - trainer.steps_done)
                plan = RoundPlan(
                    steps, spec.logical_batch, spec.learning_rate, planned_steps=spec.steps - trainer.steps_done
                )
                release = seeds(f"{run['run_id']}/{segment}")
                trainer.reseed(release.noise, release.sample, release.noise_key)
                result = trainer.train(plan, run_id=run["run_id"], round=segment)
                store.save(trainer.steps_done, {**trainer.state_dict(), "ledger_head": result.row.row_hash})
                validation = trainer.evaluate(val_set) if len(val_set) else {}
                monitor.log(trainer.steps_done, {f"val_{k}": v for k, v in validation.items()}, kind="validation")
                monitor.log(trainer.steps_done, {"epsilon": result.row.epsilon}, kind="privacy")
                summary.update(
                    steps=trainer.steps_done,
                    epsilon=result.row.epsilon,
                    delta=spec.privacy.delta,
                    train=result.metrics,
                    validation=validation,
                )
                log.info("step %d: epsilon %.3f%s", trainer.steps_done, result.row.epsilon, _for_people(validation))
        if "epsilon" not in summary:  # killed between the last checkpoint and the export
            summary.update(steps=trainer.steps_done, epsilon=trainer.spent(), delta=spec.privacy.delta)
    finally:
        trainer.close()
    summary["exports"] = [str(p) for p in export(model, spec, out_dir)] if exports else []
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2, default=float) + "\n")
    return summary


def plan_run(
    data_dir: Path, client_id: str, spec: LocalTrainingSpec, num_examples: int, steps_done: int, run_id: str
) -> Mechanism:
    """Account every remaining segment of the run now; raises :class:`BudgetExceededError` if they
    do not fit, before anything is trained, charged or written.

    The segments share one noise multiplier and sample rate, so together they are one subsampled
    Gaussian of all their steps. Segments of this run already in the ledger but not checkpointed
    (a kill in between) are redone as the same releases, so they count once, in the plan.
    """
    first = steps_done // spec.checkpoint_every + 1
    path = ledger_file(data_dir)
    rows = read_rows(path) if path.is_file() else []
    history = [
        row.to_mechanism()
        for row in rows
        if row.client_id == client_id and row.unit == UNIT and not (row.run_id == run_id and row.round >= first)
    ]
    privacy = spec.privacy
    sample_rate = min(1.0, spec.logical_batch / num_examples)
    steps = spec.steps - steps_done
    sigma = privacy.noise_multiplier
    if sigma is None:
        sigma = calibrate_noise_multiplier(
            privacy.target_epsilon,
            privacy.delta,
            sample_rate=sample_rate,
            steps=steps,
            history=history,
            accountant=privacy.accountant,
        )
    mechanism = Mechanism(sigma, sample_rate, steps)
    spent = epsilon(history, privacy.delta, privacy.accountant)
    try:
        after = Budget(privacy.budget_epsilon).check(
            history,
            mechanism,
            delta=privacy.delta,
            accountant=privacy.accountant,
            subject=f"the run's {steps} remaining steps ({client_id}, utterance level)",
        )
    except BudgetExceededError as exc:
        needed = epsilon((*history, mechanism), privacy.delta, privacy.accountant)
        raise BudgetExceededError(
            f"{exc} Nothing was written either: raise --budget-epsilon to {needed:.3f} or more (once the owner's "
            "budget is recorded, with `fedvox-client prepare`) and run the same command again, or change --steps "
            "or the noise as above."
        ) from None
    log.info(
        "privacy: noise multiplier %.3g, sample rate %.3g (expected batch %.3g of %d utterances), %d steps: "
        "epsilon %.3f -> %.3f of the budget %g at delta %g (checked now, before training)",
        sigma,
        sample_rate,
        sample_rate * num_examples,
        num_examples,
        steps,
        spent,
        after,
        privacy.budget_epsilon,
        privacy.delta,
    )
    return mechanism


def usefulness(m: Mechanism, num_examples: int, *, strict: bool = False) -> list[str]:
    """Why this run cannot learn, or learns without privacy amplification (empty when neither).

    The rule: over T steps the clipped mean gradients add up to at most T*C in any direction,
    while the noise they carry has a standard deviation of sqrt(T)*sigma*C/B in every coordinate
    (B = q*N, the expected batch). When sigma/(B*sqrt(T)) > 1 the noise exceeds even the best case
    of the signal (all of it along one coordinate): the update is noise. With ``strict`` this
    raises :class:`ConfigError` instead.
    """
    batch = m.sample_rate * num_examples
    ratio = m.noise_multiplier / (batch * math.sqrt(m.steps))
    problems = []
    if ratio > 1:
        problems.append(
            f"this run cannot learn: over {m.steps} steps the clipped gradients add up to at most "
            f"{m.steps} clip norms in any direction, while the noise has a standard deviation of "
            f"{ratio * m.steps:.3g} clip norms in every coordinate (sqrt(steps) x noise multiplier "
            f"{m.noise_multiplier:.3g} / expected batch {batch:.3g}); raise the epsilon or the batch, or add "
            "recordings"
        )
    if m.sample_rate >= 1:
        problems.append(
            f"the batch covers all {num_examples} training utterances (sample rate 1): every step sees "
            "every utterance, so there is no privacy amplification by subsampling; a batch of about "
            f"{max(1, num_examples // 4)} would give some"
        )
    if strict and problems:
        raise ConfigError(f"{problems[0]} (refused: --strict)")
    return problems


def _for_people(validation: dict[str, float]) -> str:
    """``; validation loss 3.21, accuracy 0.0412`` (3 significant digits; JSON keeps them all)."""
    if not validation:
        return ""
    return "; validation " + ", ".join(f"{key} {value:.3g}" for key, value in validation.items())


def export(model: torch.nn.Module, spec: LocalTrainingSpec, out_dir: Path) -> list[Path]:
    """The trained subset (``subset.safetensors``) and the merged model (``export/``)."""
    path = out_dir / "subset.safetensors"
    save_safetensors(trainable_state_dict(model), path, metadata={"spec": spec.to_dict()})
    return [path, *export_all(spec.stage, model, out_dir / "export")]


IDENTITY_EXEMPT = ("privacy.budget_epsilon",)
"""Settings a run may change between its segments: the budget is the owner's to raise."""
EARLIER_SUBSET = {"groups": "", "s2.lora": "all", "s2.adversarial": True}
"""What a run record written before these settings existed trained: every s2 LoRA target beside
the discriminator (s1 runs ignore the s2 settings)."""


def _previous_run(out_dir: Path, spec: LocalTrainingSpec) -> dict[str, Any] | None:
    """The run record in ``out_dir`` if these settings continue it; ``None`` for a new run.

    Raises :class:`ConfigError` naming each setting that differs once steps were trained, and when
    ``out_dir`` holds files that are not a fedvox run (fedvox writes into new or empty folders).
    """
    path = claim_folder(out_dir, (RUN_FILE,)) / RUN_FILE
    if not path.is_file():
        return None
    run = json.loads(path.read_text())
    recorded, asked = flatten(run["spec"]), flatten(json.loads(json.dumps(spec.to_dict())))
    recorded = {**EARLIER_SUBSET, **recorded}
    if spec.stage != "s2":
        recorded = {k: v for k, v in recorded.items() if not k.startswith("s2.")}
        asked = {k: v for k, v in asked.items() if not k.startswith("s2.")}
    differences = _differences(recorded, asked)
    if not differences:
        return run
    if SegmentCheckpoints(out_dir / "checkpoints").steps():
        raise ConfigError(
            f"{out_dir} holds a run with other settings ({'; '.join(differences)}); resume it with its "
            "settings, or choose a new --out"
        )
    # No step was trained under the earlier settings: nothing was released, so these take its place.
    log.info("%s: no step was trained with its earlier settings; starting with these", out_dir)
    return None


def _differences(recorded: dict[str, Any], asked: dict[str, Any]) -> list[str]:
    """``"learning_rate: 0.001 in the run, 0.01 now"`` for each setting that differs."""
    return [
        f"{key.rsplit('.', 1)[-1]}: {recorded.get(key)} in the run, {asked.get(key)} now"
        for key in sorted(set(recorded) | set(asked))
        if key not in IDENTITY_EXEMPT and recorded.get(key) != asked.get(key)
    ]


def _write_run_record(
    out_dir: Path, spec: LocalTrainingSpec, previous: dict[str, Any] | None, run_id: str
) -> dict[str, Any]:
    """Write ``OUT/run.json``: the run's id and settings (with a raised budget); no seeds."""
    run = {**(previous or {}), "run_id": run_id, "spec": spec.to_dict()}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / RUN_FILE, json.dumps(run, indent=2) + "\n")
    return run


def _fixed_seeds(seed: int) -> Callable[[str], ReleaseSeeds]:
    """Experiments' seeds: every run of the same settings draws the same noise, whatever its run id."""
    return lambda release: release_seeds(f"seed-{seed}".encode(), release.rsplit("/", 1)[-1])


def _restore(trainer: Trainer, store: SegmentCheckpoints) -> None:
    saved = store.latest()
    if saved is None:
        return
    trainer.load_state_dict(saved)
    log.info("resumed from step %d", trainer.steps_done)
