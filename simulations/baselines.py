"""Baselines a federated run is judged against, scored per round like the global model.

- **Local only** (:func:`local_baseline`): a client trains alone on its own recordings with the
  same utterance-level privacy as in the federation (``client.local.train_local``: same
  noise calibration, sample rate, steps and device profile), for as many steps as it would have
  trained in all rounds. Does federating help a speaker beyond what it can do alone?
- **Centralised, non-private** (:func:`central_baseline`): one model trained on the union of
  the clients' training utterances without clipping or noise, for the same number of steps,
  each on as many examples as a round's participants process together. What do privacy and
  federation cost against pooling the data?

Each baseline runs in its own process (one job per client), with the torch threads its profile
sets, and returns its per-round losses as plain data.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset

from fedvox.client.data.split import HELD_OUT_FRACTION
from fedvox.client.device import probe
from fedvox.client.dp import PrivacyPlan
from fedvox.client.local import LocalTrainingSpec, train_local
from fedvox.client.profiles import ProfileOverrides, select_profile
from fedvox.client.stages import build_task, datasets
from fedvox.shared.atomic import atomic_path, atomic_write_text
from fedvox.shared.models.subsets import trainable_state_dict
from fedvox.shared.privacy.ledger import Ledger
from fedvox.shared.runconfig import RunConfig
from fedvox.simulations import reuse
from fedvox.simulations.evaluation import Evaluator
from fedvox.simulations.features import heldout_by_speaker

log = logging.getLogger(__name__)

CENTRAL_STATE = "state.pt"
"""The centralised model's final trainable state, in its output folder (scored for speech quality)."""
CHUNK = 16
"""Most examples per forward/backward pass of the centralised baseline. A step's examples are
sorted by length and passed in chunks of similar length: the sum of per-example losses is the
same, but a 64-example step padded to its longest utterance (s1 sequences of the default speakers
run 85-283 positions) took 1.5-4x as long as sorted chunks of 16 on the 2-core CPU host."""


@dataclass(frozen=True)
class LocalJob:
    """One client's local-only baseline."""

    partition: int
    speaker: str
    data: Path  # a clone of the client's features with its own identity and ledger
    out: Path
    config: RunConfig
    rounds: int
    overrides: dict[str, Any]  # the client's profile.* settings in the federation
    unseen: Path | None
    seen: Path
    seed: int

    @property
    def folder(self) -> Path:
        """What the baseline writes: its data clone (with its ledger) and its training folder."""
        return self.out.parent

    @property
    def training(self) -> LocalTrainingSpec:
        """The local run: the federation's model, subset, steps and privacy, for all its rounds."""
        config = self.config
        return LocalTrainingSpec(
            stage=config.stage,
            model_config=config.model_config,
            subset=config.subset,
            lora_rank=config.lora_rank,
            lora_alpha=config.lora_alpha,
            groups=config.groups,
            s2=config.s2,
            steps=self.rounds * config.local_steps,
            logical_batch=config.logical_batch,
            learning_rate=config.learning_rate,
            checkpoint_every=config.local_steps,
            model_seed=config.model_seed,
            pretrained=config.pretrained or None,
            validation_fraction=HELD_OUT_FRACTION,
            privacy=PrivacyPlan.for_run(config.dp, budget_epsilon=config.client_budget_epsilon),
        )

    def reuse_parts(self) -> dict[str, Any]:
        """Everything the baseline's result depends on but the code and the base (:func:`.reuse.key`)."""
        return {
            "kind": "local only",
            "speaker": self.speaker,
            "config": reuse.settings(self.config),
            "rounds": self.rounds,
            "overrides": self.overrides,
            "seed": self.seed,
            "features": reuse.features_digest(self.data),
            "seen": reuse.features_digest(self.seen),
            "unseen": reuse.features_digest(self.unseen),
        }


@dataclass(frozen=True)
class CentralJob:
    """The non-private centralised baseline."""

    caches: tuple[Path, ...]
    out: Path
    config: RunConfig
    rounds: int
    examples_per_step: int
    threads: int
    seen: Path
    unseen: Path | None
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.out

    def reuse_parts(self) -> dict[str, Any]:
        """As :meth:`LocalJob.reuse_parts`; no privacy settings (it trains without them)."""
        return {
            "kind": "central",
            "config": reuse.settings(self.config, private=False),
            "rounds": self.rounds,
            "examples-per-step": self.examples_per_step,
            "threads": self.threads,
            "overrides": self.overrides,
            "seed": self.seed,
            "features": [reuse.features_digest(c) for c in self.caches],
            "seen": reuse.features_digest(self.seen),
            "unseen": reuse.features_digest(self.unseen),
        }


def local_baseline(job: LocalJob) -> dict[str, Any]:
    """Train one client alone for ``rounds * local-steps`` steps; score it after each round's worth."""
    started, cpu = time.perf_counter(), time.process_time()
    config, training = job.config, job.training
    profile = select_profile(
        probe(),
        config.stage,
        config.model_config,
        training.subset_spec,
        ProfileOverrides.from_mapping(job.overrides),
        logical_batch=config.logical_batch,
    )
    # A counterfactual owner who trained only locally: its own fedvox home, so the clone is not
    # taken for a second ledger of the federated client's recordings.
    summary = train_local(
        job.data,
        job.out,
        training,
        profile,
        seed=job.seed,
        show_progress=False,
        keep_checkpoints=job.rounds,
        exports=False,  # scored from its checkpoints: merging and writing a GPT-SoVITS copy took ~5 % of the job
        home=job.data.parent / ".fedvox",
    )
    seen = heldout_by_speaker(config.stage, job.seen)
    evaluator = Evaluator(
        config,
        {
            "seen": {job.speaker: seen[job.speaker]} if job.speaker in seen else {},
            "unseen": heldout_by_speaker(config.stage, job.unseen),
        },
    )
    losses = {}
    for r in range(1, job.rounds + 1):
        checkpoint = torch.load(
            job.out / "checkpoints" / f"step-{r * config.local_steps:08d}.pt", map_location="cpu", weights_only=True
        )
        losses[r] = evaluator.losses(checkpoint["state"])
    with Ledger(job.data) as ledger:
        epsilons = [row.epsilon for row in ledger.rows(summary["client_id"], "utterance")]
    return {
        "partition": job.partition,
        "speaker": job.speaker,
        "losses": losses,
        "epsilon": epsilons,
        "profile": profile.name,
        "seconds": time.perf_counter() - started,
        "cpu-s": time.process_time() - cpu,
    }


def central_baseline(job: CentralJob) -> dict[str, Any]:
    """Non-private training on every client's training split; scored every ``local-steps`` steps."""
    started, cpu = time.perf_counter(), time.process_time()
    config = job.config
    torch.manual_seed(job.seed)
    union = ConcatDataset([datasets(config.stage, cache, HELD_OUT_FRACTION)[0] for cache in job.caches])
    overrides = ProfileOverrides.from_mapping(
        {**job.overrides, "profile.precision": "fp32", "profile.threads": job.threads}
    )
    profile = select_profile(
        probe(), config.stage, config.model_config, config.subset_spec, overrides, logical_batch=job.examples_per_step
    )
    model = config.build_model()
    task = build_task(config.stage, model, union, profile)
    parts = task.parts()
    optimizers = [task.optimizer(name, module, config.learning_rate) for name, module in parts.items()]
    evaluator = Evaluator(
        config,
        {"seen": heldout_by_speaker(config.stage, job.seen), "unseen": heldout_by_speaker(config.stage, job.unseen)},
    )
    sampler = torch.Generator().manual_seed(job.seed)
    lengths = torch.tensor([_length(union[i]) for i in range(len(union))])
    losses, train_loss = {}, []
    for step in range(1, job.rounds * config.local_steps + 1):
        indices = torch.randperm(len(union), generator=sampler)[: job.examples_per_step]
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        by_length = indices[torch.argsort(lengths[indices], stable=True)]
        for chunk in by_length.split(min(CHUNK, profile.physical_batch)):
            for key, value in task.accumulate(parts, chunk, step).items():
                sums[key] = sums.get(key, 0.0) + value
        for module in parts.values():  # the summed per-example losses become a mean
            for param in module.parameters():
                if param.grad is not None:
                    param.grad /= len(indices)
        for optimizer in optimizers:
            optimizer.step()
        train_loss.append(sums.get("loss_sum", 0.0) / max(len(indices), 1))
        if step % config.local_steps == 0:
            losses[step // config.local_steps] = evaluator.losses(trainable_state_dict(model))
    with atomic_path(job.out / CENTRAL_STATE) as tmp:
        torch.save(trainable_state_dict(model), tmp)
    result = {
        "losses": losses,
        "train_loss": train_loss,
        "examples_per_step": job.examples_per_step,
        "steps": job.rounds * config.local_steps,
        "examples": len(union),
        "seconds": time.perf_counter() - started,
        "cpu-s": time.process_time() - cpu,
    }
    atomic_write_text(job.out / "summary.json", json.dumps(result, indent=1) + "\n")
    return result


def _length(example: Any) -> int:
    """What a padded batch is as long as: phonemes plus semantic tokens (s1 and s2 examples)."""
    return len(example.phoneme_ids) + len(example.semantic_ids)


__all__ = ["CENTRAL_STATE", "CentralJob", "LocalJob", "central_baseline", "local_baseline"]
