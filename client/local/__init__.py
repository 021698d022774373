"""Local-only DP fine-tuning (``fedvox-client train``), resumable from segment checkpoints."""

from fedvox.client.local.train import LocalTrainingSpec, train_local

__all__ = ["LocalTrainingSpec", "train_local"]
