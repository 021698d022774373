"""Validation loss of a model's trainable subset on held-out speakers, the way clients compute it.

The simulator holds every speaker's held-out utterances, so the global model of each round (and
each baseline) is scored centrally on the same utterances: the clients' own held-out ones
(*seen* speakers, whose training data the federation used) and those of speakers no client has
(*unseen*). The loss is the stage's headline validation loss, as ``client.app`` reports it: s1
cross-entropy per semantic token, s2 mel-reconstruction + KL per utterance.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.utils.data import Dataset

from fedvox.client.dp.task import Task
from fedvox.client.stages import client_stage
from fedvox.shared.models.subsets import load_trainable_state_dict
from fedvox.shared.runconfig import RunConfig
from fedvox.shared.stages import recipe

EVAL_BATCH = 8

Heldout = Mapping[str, Mapping[str, Dataset]]
"""Held-out datasets by group (``seen``, ``unseen``) and speaker."""


def headline_loss(metrics: Mapping[str, float], stage: str) -> float:
    """The stage's validation loss (the ClientApp's ``val-loss``)."""
    return metrics[recipe(stage).headline_metric]


class Evaluator:
    """Scores trainable subsets of the run's model on held-out datasets (CPU, fp32)."""

    def __init__(self, config: RunConfig, heldout: Heldout) -> None:
        self.stage = config.stage
        self.heldout = heldout
        model = config.build_model()
        first = next(d for sets in heldout.values() for d in sets.values())
        cpu = torch.device("cpu")
        self.task: Task = client_stage(self.stage).task(model, first, cpu)

    @torch.no_grad()
    def losses(self, state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
        """``{group: {speaker: loss}}`` of the model with trainable subset ``state``."""
        load_trainable_state_dict(self.task.model, state)
        out: dict[str, dict[str, float]] = {}
        for group, sets in self.heldout.items():
            out[group] = {}
            for speaker, dataset in sets.items():
                sums: dict[str, float] = {}
                for chunk in torch.arange(len(dataset)).split(EVAL_BATCH):
                    for key, value in self.task.evaluate(dataset, chunk).items():
                        sums[key] = sums.get(key, 0.0) + value
                out[group][speaker] = headline_loss(self.task.means(sums), self.stage)
        return out


def reference_losses(config: RunConfig, training: Iterable[Dataset], heldout: Heldout) -> dict[str, Any]:
    """Loss levels a model must beat, on the same held-out utterances, for a stage whose headline
    metric is a cross-entropy per token (s1; {} for s2: its recipe's ``headline_vocabulary``).

    *uniform*: every semantic code and EOS equally likely, ``ln(vocabulary)``. *unigram*: each
    token at its frequency in the clients' training utterances (add-one smoothed, EOS once per
    utterance), per held-out token including EOS as the s1 loss counts it; the mean over
    speakers, as :meth:`Evaluator.losses`.
    """
    stage_recipe = recipe(config.stage)
    if stage_recipe.headline_vocabulary is None:
        return {}
    vocabulary = stage_recipe.headline_vocabulary(stage_recipe.config(config.model_config))
    eos = vocabulary - 1
    counts = torch.ones(vocabulary, dtype=torch.float64)
    for dataset in training:
        for k in range(len(dataset)):
            counts += torch.bincount(dataset[k].semantic_ids, minlength=vocabulary)[:vocabulary].double()
            counts[eos] += 1
    log_p = (counts / counts.sum()).log()
    unigram: dict[str, dict[str, float]] = {}
    for group, sets in heldout.items():
        unigram[group] = {}
        for speaker, dataset in sets.items():
            nll, tokens = 0.0, 0
            for k in range(len(dataset)):
                ids = dataset[k].semantic_ids
                nll -= float(log_p[ids].sum() + log_p[eos])
                tokens += ids.numel() + 1
            unigram[group][speaker] = nll / max(tokens, 1)
    return {"uniform": math.log(vocabulary), "unigram": {g: mean_loss(v) for g, v in unigram.items() if v}}


def mean_loss(losses: Mapping[str, float], speakers: list[str] | None = None) -> float | None:
    """Mean over speakers (each counts once), optionally only ``speakers``; None if none."""
    values = [v for s, v in losses.items() if speakers is None or s in speakers]
    return sum(values) / len(values) if values else None


__all__ = ["EVAL_BATCH", "Evaluator", "headline_loss", "mean_loss", "reference_losses"]
