"""Non-private training of one stage of the base on the prepared corpus, resumable after a kill.

Both stages train from scratch with the same per-stage step code the federated clients run
(each stage's task, :mod:`fedvox.client.stages`), but without DP: plain mini-batches,
gradient clipping on the batch mean, AdamW, linear warm-up then cosine decay. A stage with an
adversary (s2) starts with the losses that need none (mel L1 and the prior/posterior KL, its
task's ``accumulate_without_adversary``) and adds the discriminator after ``disc_start`` steps: on
a CPU, the GAN terms only pay off once the generator already reconstructs the mel.

Resume is exact: the batch of step ``t`` and every random draw inside it come from generators
keyed by (seed, stage, t), and the state file (weights, optimizer moments, step, history) is
replaced atomically, so a run killed at any moment continues from its last checkpoint and then
computes what an uninterrupted run would have.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedvox.client.dp.task import Task
from fedvox.client.stages import client_stage
from fedvox.shared.atomic import atomic_path
from fedvox.shared.cli import progress
from fedvox.shared.errors import CheckpointError, ConfigError
from fedvox.shared.models.factory import build_model
from fedvox.shared.models.subsets import SubsetSpec
from fedvox.shared.stages import STAGES, recipe
from fedvox.simulations.pretrain.prompted import PromptedPairs

log = logging.getLogger(__name__)

STATE = "state.pt"
BEST = "best.pt"
LOG_EVERY = 10
_EXTENSIBLE = ("steps", "eval_every", "prompt_pairs")
"""Plan fields a resumed run may change: train longer (the cosine then stretches), validate at
another interval, add or drop prompted pairs (validation changes with them: the best starts over)."""


@dataclass(frozen=True)
class StagePlan:
    """How one stage trains; a resumed run must use the same plan (stored with the state), except that
    it may change ``steps`` and ``eval_every``."""

    stage: str
    model_config: str = "base"
    steps: int = 2000
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup: int = 100
    clip_norm: float = 1.0
    eval_every: int = 100
    eval_utterances: int = 32
    disc_start: int = 0  # s2: steps with reconstruction losses only (0: the GAN from the start)
    prompt_pairs: int = 0  # s1: prompted copies of each utterance drawn from besides it (:class:`PromptedPairs`)
    seed: int = 0

    def validate(self) -> None:
        recipe(self.stage)  # raises for an unknown stage
        if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1 or self.learning_rate <= 0:
            raise ConfigError("steps, batch size, evaluation interval and learning rate must be positive")
        if self.prompt_pairs < 0 or (self.prompt_pairs and self.stage != "s1"):
            raise ConfigError("prompted pairs are for s1 only, and their number cannot be negative")

    def learning_rate_at(self, step: int) -> float:
        """Linear warm-up to ``learning_rate``, then cosine decay to a tenth of it at ``steps``."""
        if step < self.warmup:
            return self.learning_rate * (step + 1) / self.warmup
        progress_ = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return self.learning_rate * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress_)))


@dataclass
class TrainState:
    """What survives a kill: weights, optimizer moments, the step reached and the history."""

    step: int
    model: dict
    optimizers: dict
    history: list[dict]
    seconds: float
    best: dict | None  # {"step", "valid_loss"} of the weights in best.pt
    running: dict[str, float]  # exponential moving averages of the training metrics
    plan: dict = field(default_factory=dict)  # the plan the state was saved with


def train_stage(
    plan: StagePlan,
    train_cache: Path,
    valid_cache: Path,
    folder: Path,
    device: torch.device,
    checkpoint_seconds: float = 300.0,
    on_checkpoint: Callable[[TrainState], None] | None = None,
) -> TrainState:
    """Train (or continue training) ``plan.stage`` into ``folder``; returns the final state.

    ``on_checkpoint`` is called after every checkpoint (the pipeline refreshes its provenance).
    """
    plan.validate()
    folder.mkdir(parents=True, exist_ok=True)
    dataset = client_stage(plan.stage).dataset
    train, valid = dataset(train_cache), dataset(valid_cache)
    if not len(train) or not len(valid):
        raise ConfigError(f"no usable {plan.stage} utterances in {train_cache} or {valid_cache}")
    eval_indices = torch.arange(min(plan.eval_utterances, len(valid)))
    if plan.prompt_pairs:  # trained and validated as inference prompts it
        eval_indices += len(valid)  # each validation utterance after a partner
        train, valid = (PromptedPairs(d, plan.prompt_pairs, plan.seed) for d in (train, valid))
    model = build_model(plan.stage, plan.model_config, SubsetSpec(kind="full"), seed=plan.seed)
    task: Task = client_stage(plan.stage).task(model, train, device)
    optimizers = {name: task.optimizer(name, module, plan.learning_rate) for name, module in task.parts().items()}
    state = _load_state(folder / STATE, plan) or TrainState(0, {}, {}, [], 0.0, None, {})
    if state.model:
        task.model.load_state_dict(state.model)
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(state.optimizers[name])
        log.info("%s: resuming at step %d of %d", plan.stage, state.step, plan.steps)
        if state.plan.get("prompt_pairs", 0) != plan.prompt_pairs:
            shape = "prompted pairs" if plan.prompt_pairs else "single utterances"
            log.info("%s: validation now on %s: the best so far starts over", plan.stage, shape)
            state.best = None
    saved_at, first_step = time.monotonic(), state.step
    started, start_seconds = time.monotonic(), state.seconds
    with progress() as bar:
        task_id = bar.add_task(f"{plan.stage} pretraining", total=plan.steps, completed=state.step)
        while state.step < plan.steps:
            sums = _step(task, optimizers, plan, state.step, len(train))
            means = task.means(sums)
            state.running = {k: 0.9 * state.running.get(k, v) + 0.1 * v for k, v in means.items()}
            state.step += 1
            state.seconds = start_seconds + time.monotonic() - started
            shown = state.running.get("loss_per_token", state.running.get("g_mel", state.running.get("loss", 0.0)))
            bar.update(task_id, completed=state.step, description=f"{plan.stage} pretraining (loss {shown:.3f})")
            if state.step % LOG_EVERY == 0:  # progress for logs, where the bar is not drawn
                log.info(
                    "%s step %d/%d: %.1f s/step, training loss %.3f",
                    plan.stage,
                    state.step,
                    plan.steps,
                    (state.seconds - start_seconds) / (state.step - first_step),
                    shown,
                )
            if state.step % plan.eval_every == 0 or state.step == plan.steps:
                record = {
                    "step": state.step,
                    "seconds": round(state.seconds, 1),
                    "learning_rate": plan.learning_rate_at(state.step - 1),
                    "train": {k: round(v, 4) for k, v in state.running.items()},
                    "valid": evaluate(task, valid, eval_indices),
                }
                state.history.append(record)
                log.info("%s step %d: train %s valid %s", plan.stage, state.step, record["train"], record["valid"])
                if state.best is None or record["valid"]["loss"] < state.best["valid_loss"]:
                    state.best = {"step": state.step, "valid_loss": record["valid"]["loss"]}
                    _save(folder / BEST, {"step": state.step, "model": task.model.state_dict(), "plan": asdict(plan)})
                _save_state(folder / STATE, task, optimizers, state, plan, on_checkpoint)
                saved_at = time.monotonic()
            elif time.monotonic() - saved_at > checkpoint_seconds:
                _save_state(folder / STATE, task, optimizers, state, plan, on_checkpoint)
                saved_at = time.monotonic()
    return state


def batch_indices(plan: StagePlan, step: int, size: int) -> torch.Tensor:
    """The examples of step ``step``: a fresh draw without replacement, keyed by (seed, stage, step)."""
    rng = np.random.default_rng([plan.seed, _stage_code(plan.stage), step])
    return torch.from_numpy(rng.choice(size, size=min(plan.batch_size, size), replace=False)).long()


def _step(
    task: Task, optimizers: dict[str, torch.optim.Optimizer], plan: StagePlan, step: int, size: int
) -> dict[str, float]:
    """One non-private step on the batch of ``step``; returns the summed metrics."""
    indices = batch_indices(plan, step, size)
    step_seed = plan.seed * 1_000_003 + _stage_code(plan.stage) * 100_000_007 + step
    torch.manual_seed(step_seed)  # dropout
    if step < plan.disc_start:
        sums, trained = task.accumulate_without_adversary(indices, step_seed)
        active = {name: optimizers[name] for name in trained}
    else:
        sums = task.accumulate(task.parts(), indices, step_seed)
        active = optimizers
    for optimizer in active.values():
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        for p in params:
            p.grad.div_(len(indices))  # the accumulate* methods back-propagate sums
        torch.nn.utils.clip_grad_norm_(params, plan.clip_norm)
        scale = plan.learning_rate_at(step) / plan.learning_rate
        for group in optimizer.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * scale
        optimizer.step()
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    return sums


def _stage_code(stage: str) -> int:
    """The stage's number in pipeline order (s1: 1, s2: 2), which keys its random draws."""
    return STAGES.index(stage) + 1


def evaluate(task: Task, dataset, indices: torch.Tensor, chunk: int = 8) -> dict[str, float]:
    """Validation means over ``indices`` (s1: loss per token and top-3 accuracy; s2: mel L1 and KL)."""
    sums: dict[str, float] = {}
    for start in range(0, len(indices), chunk):
        for key, value in task.evaluate(dataset, indices[start : start + chunk]).items():
            sums[key] = sums.get(key, 0.0) + value
    means = task.means(sums)
    means["loss"] = means[recipe(task.stage).headline_metric]  # what "best" compares
    return {k: round(v, 4) for k, v in means.items()}


def load_weights(folder: Path, which: str = BEST) -> tuple[dict, int]:
    """The model state dict saved in ``folder`` (``best.pt`` or ``state.pt``) and its step."""
    saved = _read(folder / which)
    return saved["model"], int(saved["step"])


def _save_state(
    path: Path,
    task: Task,
    optimizers: dict[str, torch.optim.Optimizer],
    state: TrainState,
    plan: StagePlan,
    on_checkpoint: Callable[[TrainState], None] | None,
) -> None:
    _save(
        path,
        {
            "plan": asdict(plan),
            "step": state.step,
            "model": task.model.state_dict(),
            "optimizers": {n: o.state_dict() for n, o in optimizers.items()},
            "history": state.history,
            "seconds": state.seconds,
            "best": state.best,
            "running": state.running,
        },
    )
    if on_checkpoint is not None:
        on_checkpoint(state)


def _save(path: Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_state(folder: Path) -> tuple[StagePlan, TrainState]:
    """The plan and state of the stage trained in ``folder`` (as a resumed run would find them)."""
    saved = _read(folder / STATE)
    return StagePlan(**saved["plan"]), _state(saved)


def _read(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(
            f"cannot read the pretraining state {path}: {exc}; train the stage first "
            "(fedvox-sim pretrain), or delete a damaged state to start over"
        ) from None


def _state(saved: dict) -> TrainState:
    return TrainState(
        saved["step"],
        saved["model"],
        saved["optimizers"],
        saved["history"],
        saved["seconds"],
        saved["best"],
        saved.get("running", {}),
        saved["plan"],
    )


def _load_state(path: Path, plan: StagePlan) -> TrainState | None:
    if not path.is_file():
        return None
    saved = _read(path)
    changed = sorted(k for k in saved["plan"] if saved["plan"][k] != asdict(plan).get(k) and k not in _EXTENSIBLE)
    if changed:
        raise ConfigError(
            f"{path} was trained with other settings ({', '.join(changed)}); pass the same "
            "options to continue, or another --out to start over"
        )
    return _state(saved)
