"""DP-SGD mechanics shared by every stage: Poisson batches, physical batches, OOM fallback.

One *logical* batch is drawn by Poisson sampling (each utterance independently with probability
``sample_rate``), which is what the accountant assumes. A resource profile then decides the
*physical* batch: the logical batch is split into chunks that fit in memory, every chunk's
per-sample gradients are clipped and summed, and noise is added once, on the last chunk. The
split changes how a step runs, never what it computes: the same seed gives the same update for
any physical batch size, up to floating-point summation order.

Per-sample gradients come from :class:`~fedvox.client.dp.grad_sample.PrivateGradSampleModule`
(lean per-layer hooks, no functorch fallback for SoVITS's weight-normed convolutions, and a backward pass
that skips the summed gradients DP-SGD discards): call ``private.module.backward(loss)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fedvox.client.dp.grad_sample import PrivateGradSampleModule
from fedvox.client.dp.optimizer import FedvoxDPOptimizer
from fedvox.shared.errors import DeviceError

log = logging.getLogger(__name__)


@dataclass
class PrivateModel:
    """A module wrapped for per-sample gradients and its DP optimizer."""

    module: PrivateGradSampleModule
    optimizer: FedvoxDPOptimizer

    def close(self) -> None:
        """Remove Opacus's hooks (the wrapped module stays usable without them)."""
        self.module._close()


def make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    noise_multiplier: float,
    clip_norm: float,
    expected_batch_size: float,
    noise_generator: torch.Generator,
    loss_scale: float = 1.0,
    optimizer_class: Callable[..., FedvoxDPOptimizer] = FedvoxDPOptimizer,
) -> PrivateModel:
    """Wrap ``model``/``optimizer`` for DP-SGD with per-sample losses summed (``loss_reduction="sum"``).

    The update is ``(sum_i clip(g_i) + N(0, (noise_multiplier * clip_norm)^2)) / expected_batch_size``.
    ``noise_generator`` must be seeded from a secret in deployment: noise an adversary can
    predict is no noise. ``optimizer_class`` lets the canary audit (``client/canary``)
    put its white-box canaries into the same DP step.
    """
    module = PrivateGradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
    dp_optimizer = optimizer_class(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=clip_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=noise_generator,
        loss_scale=loss_scale,
    )
    dp_optimizer.reset_hooks.append(module.reset_pass_state)
    return PrivateModel(module=module, optimizer=dp_optimizer)


def poisson_sample(num_examples: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of one Poisson-sampled logical batch (may be empty)."""
    mask = torch.rand(num_examples, generator=generator) < sample_rate
    return mask.nonzero(as_tuple=True)[0]


@dataclass
class StepOutcome:
    """What one logical step did."""

    batch_size: int
    physical_batch_size: int
    sums: dict[str, float]
    oom_retries: int = 0


Accumulate = Callable[[torch.Tensor], dict[str, float]]
"""``accumulate(indices)``: forward + backward on the examples ``indices``; returns summed metrics."""


def run_logical_step(
    indices: torch.Tensor,
    physical_batch_size: int,
    accumulate: Accumulate,
    optimizers: Sequence[FedvoxDPOptimizer],
) -> StepOutcome:
    """Run one DP-SGD step over ``indices`` in chunks of ``physical_batch_size``.

    On CUDA out-of-memory the step restarts from scratch with half the physical batch; the
    noise has not been drawn yet at that point, so the update is unchanged.
    """
    if physical_batch_size < 1:
        raise DeviceError(f"physical batch size must be at least 1, got {physical_batch_size}")
    if len(indices) == 0:
        for optimizer in optimizers:
            optimizer.step_without_samples()
            optimizer.zero_grad(set_to_none=True)
        return StepOutcome(batch_size=0, physical_batch_size=physical_batch_size, sums={})

    retries = 0
    while True:
        try:
            sums = _accumulate_chunks(indices, physical_batch_size, accumulate, optimizers)
            return StepOutcome(len(indices), physical_batch_size, sums, retries)
        except torch.OutOfMemoryError:
            for optimizer in optimizers:
                optimizer.reset_logical_batch()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if physical_batch_size == 1:
                raise DeviceError(
                    "out of memory with a physical batch of 1; use a smaller model config, the "
                    "lora subset, or a device profile with more memory"
                ) from None
            physical_batch_size = max(1, physical_batch_size // 2)
            retries += 1
            log.warning("out of memory: retrying the step with physical batch %d", physical_batch_size)


def _accumulate_chunks(
    indices: torch.Tensor,
    physical_batch_size: int,
    accumulate: Accumulate,
    optimizers: Sequence[FedvoxDPOptimizer],
) -> dict[str, float]:
    chunks = indices.split(physical_batch_size)
    sums: dict[str, float] = {}
    for position, chunk in enumerate(chunks):
        for key, value in accumulate(chunk).items():
            sums[key] = sums.get(key, 0.0) + value
        last = position == len(chunks) - 1
        for optimizer in optimizers:
            optimizer.signal_skip_step(do_skip=not last)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return sums
