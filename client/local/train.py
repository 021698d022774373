"""Local-only DP fine-tuning (``fedvox-client train``): the baseline and the federated building block.

Training runs in segments of ``checkpoint_every`` steps. Each segment is one release: it is
budget-checked, trained, charged to the data folder's ledger, then checkpointed. A run killed at
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
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedvox.client.data.split import HELD_OUT_FRACTION
from fedvox.client.dp import PrivacyPlan, RoundPlan, Trainer
from fedvox.client.dp.monitor import TrainingMonitor
from fedvox.client.identity import bind_ledger
from fedvox.client.local.checkpoints import SegmentCheckpoints
from fedvox.client.profiles import ResourceProfile
from fedvox.client.releases import ReleaseBook, ReleaseSeeds, release_seeds
from fedvox.client.stages import build_task, datasets
from fedvox.shared.atomic import atomic_write_text
from fedvox.shared.cli import progress
from fedvox.shared.errors import ConfigError
from fedvox.shared.models.factory import build_model, export_all
from fedvox.shared.models.interop import save_safetensors
from fedvox.shared.models.subsets import SubsetSpec, trainable_state_dict
from fedvox.shared.privacy.ledger import Ledger

log = logging.getLogger(__name__)

RUN_FILE = "run.json"


@dataclass(frozen=True)
class LocalTrainingSpec:
    """Everything that defines a local run (stored in ``OUT/run.json``; a resume must match it)."""

    stage: str
    model_config: str = "tiny"
    subset: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    steps: int = 100
    logical_batch: int = 8
    learning_rate: float = 1e-3
    checkpoint_every: int = 20
    model_seed: int = 0
    pretrained: str | None = None
    validation_fraction: float = HELD_OUT_FRACTION
    privacy: PrivacyPlan = field(default_factory=PrivacyPlan)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.checkpoint_every < 1:
            raise ConfigError("steps and checkpoint-every must be at least 1")

    @property
    def subset_spec(self) -> SubsetSpec:
        return SubsetSpec(kind=self.subset, lora_rank=self.lora_rank, lora_alpha=self.lora_alpha)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LocalTrainingSpec:
        values = dict(values)
        values["privacy"] = PrivacyPlan(**values["privacy"])
        return cls(**values)


def train_local(
    data_dir: str | Path,
    out_dir: str | Path,
    spec: LocalTrainingSpec,
    profile: ResourceProfile,
    *,
    seed: int | None = None,
    show_progress: bool = True,
    keep_checkpoints: int = 3,
    home: str | Path | None = None,
) -> dict[str, Any]:
    """Run (or resume) a local DP fine-tuning; returns a summary (also in ``OUT/summary.json``).

    ``keep_checkpoints`` segment checkpoints are kept (a simulation's local baseline keeps one per
    round to score each). ``home`` is the fedvox home recording the recordings' one ledger (the
    data folder's; :func:`client.identity.bind_ledger`).
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    run = _run_record(out_dir, spec)
    torch.set_num_threads(profile.threads)
    train_set, val_set = datasets(spec.stage, data_dir, spec.validation_fraction)
    model = build_model(spec.stage, spec.model_config, spec.subset_spec, seed=spec.model_seed, pretrained=spec.pretrained)
    task = build_task(spec.stage, model, train_set, profile)
    client_id = bind_ledger(data_dir, data_dir, home)
    trainer = Trainer(
        task, Ledger(data_dir), client_id, spec.privacy, physical_batch=profile.physical_batch,
        monitor=TrainingMonitor(out_dir / "logs"),
    )
    seeds = ReleaseBook(data_dir).seeds if seed is None else _fixed_seeds(seed)
    store = SegmentCheckpoints(out_dir / "checkpoints", keep=keep_checkpoints)
    _restore(trainer, store)
    segments = -(-spec.steps // spec.checkpoint_every)
    first = trainer.steps_done // spec.checkpoint_every + 1
    summary: dict[str, Any] = {"run_id": run["run_id"], "client_id": client_id, "profile": profile.name}
    try:
        with progress() as bar:
            task_id = bar.add_task("DP training", total=spec.steps, completed=trainer.steps_done, visible=show_progress)
            for segment in range(first, segments + 1):
                steps = min(spec.checkpoint_every, spec.steps - trainer.steps_done)
                plan = RoundPlan(steps, spec.logical_batch, spec.learning_rate, planned_steps=spec.steps - trainer.steps_done)
                release = seeds(f"{run['run_id']}/{segment}")
                trainer.reseed(release.noise, release.sample, release.noise_key)
                result = trainer.train(plan, run_id=run["run_id"], round=segment)
                store.save(trainer.steps_done, {**trainer.state_dict(), "ledger_head": result.row.row_hash})
                validation = trainer.evaluate(val_set) if len(val_set) else {}
                trainer.monitor.log(trainer.steps_done, {f"val_{k}": v for k, v in validation.items()}, kind="validation")
                summary.update(steps=trainer.steps_done, epsilon=result.row.epsilon, delta=spec.privacy.delta,
                               train=result.metrics, validation=validation)
                bar.update(task_id, completed=trainer.steps_done)
                log.info("step %d: epsilon %.3f, validation %s", trainer.steps_done, result.row.epsilon, validation)
    finally:
        trainer.close()
    summary["exports"] = [str(p) for p in export(model, spec, out_dir)]
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2, default=float) + "\n")
    return summary


def export(model: torch.nn.Module, spec: LocalTrainingSpec, out_dir: Path) -> list[Path]:
    """The trained subset (``subset.safetensors``) and the merged model (``export/``)."""
    path = out_dir / "subset.safetensors"
    save_safetensors(trainable_state_dict(model), path, metadata={"spec": spec.to_dict()})
    return [path, *export_all(model, out_dir / "export")]


def _run_record(out_dir: Path, spec: LocalTrainingSpec) -> dict[str, Any]:
    path = out_dir / RUN_FILE
    if path.is_file():
        run = json.loads(path.read_text())
        if run["spec"] == json.loads(json.dumps(spec.to_dict())):
            return run
        if SegmentCheckpoints(out_dir / "checkpoints").steps():
            raise ConfigError(
                f"{out_dir} holds a run with different settings ({path}); resume it with the same "
                "options, or choose a new --out"
            )
        # No step was trained under the earlier settings (e.g. refused for its budget): nothing
        # was released, so these settings take its place.
        log.info("%s: no step was trained with its earlier settings; starting with these", out_dir)
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir} is not empty and holds no fedvox run; choose a new --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    run = {"run_id": f"local-{secrets.token_hex(6)}", "spec": spec.to_dict()}
    atomic_write_text(path, json.dumps(run, indent=2) + "\n")
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
