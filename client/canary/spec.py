"""What one canary audit trains: its canaries, DP settings and model, checked once."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedvox.shared.errors import ConfigError
from fedvox.shared.privacy.accounting import ACCOUNTANTS, DEFAULT_ACCOUNTANT


@dataclass(frozen=True)
class CanaryAuditSpec:
    """What one audit trains and how many canaries it hides in the training."""

    white_box: int = 1000
    black_box: int = 0
    noise_multiplier: float = 1.0
    sample_rate: float = 0.1
    steps: int = 100
    clip_norm: float = 1.0
    learning_rate: float = 1e-3
    delta: float = 1e-5
    confidence: float = 0.95
    accountant: str = DEFAULT_ACCOUNTANT
    model_config: str = "tiny"
    pretrained: str | None = None
    physical_batch: int = 16
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.white_box < 0 or self.black_box < 0 or self.white_box + self.black_box == 0:
            raise ConfigError("give at least 2 white-box or black-box canaries (--white-box, --black-box)")
        if self.white_box == 1 or self.black_box == 1:
            raise ConfigError("a canary audit needs at least 2 canaries of a kind (or none)")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ConfigError(f"--noise-multiplier must be >= 0 (0 turns DP off), got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"--sample-rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 1 or self.physical_batch < 1:
            raise ConfigError("--steps and --physical-batch must be at least 1")
        if not self.clip_norm > 0 or not self.learning_rate > 0:
            raise ConfigError("--clip-norm and --learning-rate must be > 0")
        if not 0 < self.delta < 1 or not 0 < self.confidence < 1:
            raise ConfigError("--delta and --confidence must be in (0, 1)")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"unknown accountant {self.accountant!r}; use one of {', '.join(ACCOUNTANTS)}")
        import torch  # here, not at the top: the CLI reads these defaults for --help

        try:
            torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"--device {self.device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
