"""s1, the GPT text-to-semantic stage, on the client: its DP training task."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fedvox.client.data.datasets import S1Dataset, S1Example, collate_s1
from fedvox.client.dp.task import Examples, Task, adamw, autocast
from fedvox.client.profiles import ResourceProfile
from fedvox.client.stages import ClientStage
from fedvox.shared.models.batches import S1Batch
from fedvox.shared.models.s1 import Text2SemanticDecoder, s1_loss

S1_BETAS = (0.9, 0.95)
"""GPT-SoVITS's AdamW betas for s1."""


class S1Task(Task):
    """GPT text-to-semantic: per-utterance cross-entropy over its semantic tokens and EOS."""

    stage = "s1"

    def __init__(
        self,
        model: Text2SemanticDecoder,
        dataset: Examples,
        device: torch.device,
        precision: str = "fp32",
        loss_scale: float = 1.0,
        checkpointing: bool = False,
    ) -> None:
        super().__init__(device, precision, loss_scale)
        self.model = model.to(device)
        self.model.set_attention_checkpointing(checkpointing)
        self.dataset = dataset

    @classmethod
    def for_profile(cls, model: nn.Module, dataset: Examples, profile: ResourceProfile) -> S1Task:
        """The task on the profile's device, precision and attention checkpointing."""
        if not isinstance(model, Text2SemanticDecoder):
            raise TypeError(f"the s1 task trains a Text2SemanticDecoder, not a {type(model).__name__}")
        return cls(
            model, dataset, torch.device(profile.device), profile.precision, profile.loss_scale, profile.checkpointing
        )

    def parts(self) -> dict[str, nn.Module]:
        return {"s1": self.model}

    def optimizer(self, name: str, module: nn.Module, learning_rate: float) -> torch.optim.Optimizer:
        params = [p for p in module.parameters() if p.requires_grad]
        return adamw([{"params": params}], learning_rate, betas=S1_BETAS, weight_decay=0.01)

    def batch(self, indices: torch.Tensor) -> S1Batch:
        return collate_s1([self.dataset[int(i)] for i in indices]).to(self.device)

    def accumulate(self, wrapped: Mapping[str, nn.Module], indices: torch.Tensor, step_seed: int) -> dict[str, float]:
        batch = self.batch(indices)
        with autocast(self.device, self.precision):
            out = s1_loss(wrapped["s1"], batch)
        self._backward(out.per_sample, wrapped["s1"])
        return {
            "loss_sum": float(out.per_sample.detach().float().sum()),
            "tokens": float(out.tokens.sum()),
            "top3_correct": float(out.top3_correct),
            "top3_total": float(out.top3_total),
            "examples": float(len(indices)),
        }

    def means(self, sums: dict[str, float]) -> dict[str, float]:
        """Per-example means plus GPT-SoVITS's per-token loss and top-3 accuracy."""
        means = super().means(sums)
        if sums.get("tokens"):
            means["loss_per_token"] = sums["loss_sum"] / sums["tokens"]
            means["top3_accuracy"] = sums["top3_correct"] / max(sums["top3_total"], 1.0)
        return means

    @torch.no_grad()
    def evaluate(self, dataset: Examples, indices: torch.Tensor) -> dict[str, float]:
        self.model.eval()
        try:
            batch = collate_s1([dataset[int(i)] for i in indices]).to(self.device)
            with autocast(self.device, self.precision):
                out = s1_loss(self.model, batch)
        finally:
            self.model.train()
        return {
            "loss_sum": float(out.per_sample.float().sum()),
            "tokens": float(out.tokens.sum()),
            "top3_correct": float(out.top3_correct),
            "top3_total": float(out.top3_total),
            "examples": float(len(indices)),
        }


CLIENT_STAGE = ClientStage(example=S1Example, dataset=S1Dataset, task=S1Task)

__all__ = ["CLIENT_STAGE", "S1_BETAS", "S1Task"]
