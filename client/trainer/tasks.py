"""What one DP-SGD step computes for each stage.

A task names the modules that get their own DP optimizer (s1: the GPT; s2: generator and
discriminator, privatised on the same Poisson batch), builds their optimizers, and runs forward
and backward for a chunk of examples. It returns *sums* over the chunk, so the caller can split a
logical batch into any physical batches and still report exact means.

Per-sample randomness (s2's decoder slice and posterior noise) is drawn from a generator keyed by
(step seed, example index), so an example sees the same randomness whichever chunk it lands in:
that is what makes the update independent of the physical batch size.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod

import torch
from torch import nn

from fedvox.client.data.datasets import S1Dataset, S2Dataset, collate_s1, collate_s2
from fedvox.client.trainer.grad_sample import PrivateGradSampleModule
from fedvox.shared.models.batches import S1Batch, S2Batch
from fedvox.shared.models.factory import SoVITSPair
from fedvox.shared.models.s1 import Text2SemanticDecoder, s1_loss
from fedvox.shared.models.s2 import discriminator_losses, frozen, generator_losses
from fedvox.shared.models.s2.generator import SynthesizerTrn

S2_BETAS = (0.8, 0.99)
"""GPT-SoVITS's AdamW betas for s2 (eps 1e-9); s1 uses AdamW defaults with betas (0.9, 0.95)."""
S1_BETAS = (0.9, 0.95)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for ``bf16``/``fp16``; nothing for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class Task(ABC):
    """One stage's training and evaluation step, independent of how batches are split."""

    stage: str
    model: nn.Module
    """Everything the task trains (s1: the GPT; s2: the generator/discriminator pair)."""

    def __init__(self, device: torch.device, precision: str, loss_scale: float) -> None:
        self.device = device
        self.precision = precision
        self.loss_scale = loss_scale if precision == "fp16" else 1.0

    @abstractmethod
    def parts(self) -> dict[str, nn.Module]:
        """The modules that each get a DP optimizer (and their own noise)."""

    @abstractmethod
    def optimizer(self, name: str, module: nn.Module, learning_rate: float) -> torch.optim.Optimizer:
        """The (non-private) optimizer that DP-SGD wraps for part ``name``."""

    @abstractmethod
    def accumulate(self, wrapped: dict[str, nn.Module], indices: torch.Tensor, step_seed: int) -> dict[str, float]:
        """Forward + backward over examples ``indices`` through the Opacus-wrapped ``parts``."""

    @abstractmethod
    def evaluate(self, dataset, indices: torch.Tensor) -> dict[str, float]:
        """Validation sums over ``indices`` of ``dataset`` (keys ending in ``_sum`` or counts)."""

    def _backward(self, per_sample: torch.Tensor, module: nn.Module) -> None:
        """Back-propagate the summed (and loss-scaled) per-sample losses into ``module`` (the DP
        engine's backward skips the summed gradients DP-SGD discards)."""
        loss = per_sample.sum() * self.loss_scale
        if isinstance(module, PrivateGradSampleModule):
            module.backward(loss)
        else:
            loss.backward()


class S1Task(Task):
    """GPT text-to-semantic: per-utterance cross-entropy over its semantic tokens and EOS."""

    stage = "s1"

    def __init__(self, model: Text2SemanticDecoder, dataset: S1Dataset, device: torch.device,
                 precision: str = "fp32", loss_scale: float = 1.0, checkpointing: bool = False) -> None:
        super().__init__(device, precision, loss_scale)
        self.model = model.to(device)
        self.model.set_attention_checkpointing(checkpointing)
        self.dataset = dataset

    def parts(self) -> dict[str, nn.Module]:
        return {"s1": self.model}

    def optimizer(self, name: str, module: nn.Module, learning_rate: float) -> torch.optim.Optimizer:
        params = [p for p in module.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=learning_rate, betas=S1_BETAS, weight_decay=0.01)

    def batch(self, indices: torch.Tensor) -> S1Batch:
        return collate_s1([self.dataset[int(i)] for i in indices]).to(self.device)

    def accumulate(self, wrapped, indices, step_seed):
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

    @torch.no_grad()
    def evaluate(self, dataset, indices):
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


class S2Task(Task):
    """SoVITS GAN: generator and discriminator losses per utterance, on the same examples.

    Both networks are updated from their parameters at the start of the step (simultaneous
    updates): G's adversarial terms go through D with D frozen, then D's LSGAN loss is taken on
    the real and the (detached) generated slices. GPT-SoVITS alternates instead (D first, then G
    against the updated D), which under virtual batching would need a second generator forward
    per chunk.
    """

    stage = "s2"

    def __init__(self, pair: SoVITSPair, dataset: S2Dataset, device: torch.device,
                 precision: str = "fp32", loss_scale: float = 1.0) -> None:
        super().__init__(device, precision, loss_scale)
        self.pair = self.model = pair.to(device)
        self.dataset = dataset

    @property
    def generator(self) -> SynthesizerTrn:
        return self.pair.generator

    def parts(self) -> dict[str, nn.Module]:
        return {"generator": self.pair.generator, "discriminator": self.pair.discriminator}

    def optimizer(self, name: str, module: nn.Module, learning_rate: float) -> torch.optim.Optimizer:
        if name == "generator":
            groups = module.param_groups(learning_rate)
        else:
            groups = [{"params": [p for p in module.parameters() if p.requires_grad], "lr": learning_rate}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=S2_BETAS, eps=1e-9, weight_decay=0.01)

    def batch(self, dataset, indices: torch.Tensor, step_seed: int) -> tuple[S2Batch, torch.Tensor, torch.Tensor]:
        """The collated batch plus per-example slice starts and posterior noise."""
        examples = [dataset[int(i)] for i in indices]
        batch = collate_s2(examples)
        config = self.generator.config
        starts, noises = [], []
        for index, example in zip(indices, examples, strict=True):
            g = _example_generator(step_seed, int(index))
            frames = example.spec.shape[-1]
            high = max(frames - config.segment_frames + 1, 1)
            starts.append(int(torch.rand((), generator=g) * high))
            noises.append(torch.randn(config.inter_channels, frames, generator=g))
        noise = torch.zeros(len(examples), config.inter_channels, batch.spec.shape[-1])
        for row, n in enumerate(noises):
            noise[row, :, : n.shape[-1]] = n
        return batch.to(self.device), torch.tensor(starts, device=self.device), noise.to(self.device)

    def accumulate(self, wrapped, indices, step_seed):
        batch, starts, noise = self.batch(self.dataset, indices, step_seed)
        generator, discriminator = wrapped["generator"], wrapped["discriminator"]
        config = self.generator.config
        with autocast(self.device, self.precision):
            out = generator(batch, slice_starts=starts, posterior_noise=noise)
        # D stays frozen through G's backward too: its hooks must not fire on G's gradients.
        with frozen(discriminator):
            with autocast(self.device, self.precision):
                g_losses = generator_losses(discriminator, batch, out, config)
            self._backward(g_losses["total"], generator)
        with autocast(self.device, self.precision):
            d_loss = discriminator_losses(discriminator, batch, out, config)
        self._backward(d_loss, discriminator)
        sums = {f"g_{k}_sum": float(v.detach().float().sum()) for k, v in g_losses.items()}
        sums["loss_sum"] = sums["g_total_sum"]
        sums["d_loss_sum"] = float(d_loss.detach().float().sum())
        sums["examples"] = float(len(indices))
        return sums

    @torch.no_grad()
    def evaluate(self, dataset, indices):
        """Mel reconstruction and KL of held-out utterances (fixed randomness across rounds)."""
        self.pair.eval()
        try:
            batch, starts, noise = self.batch(dataset, indices, step_seed=0)
            with autocast(self.device, self.precision):
                out = self.generator(batch, slice_starts=starts, posterior_noise=noise)
                losses = generator_losses(self.pair.discriminator, batch, out, self.generator.config)
        finally:
            self.pair.train()
        return {
            "loss_sum": float((losses["mel"] + losses["kl"]).float().sum()),
            "mel_sum": float(losses["mel"].float().sum()),
            "kl_sum": float(losses["kl"].float().sum()),
            "examples": float(len(indices)),
        }


def _example_generator(step_seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((step_seed * 1_000_003 + index) % (2**63 - 1))


def mean_metrics(sums: dict[str, float], stage: str) -> dict[str, float]:
    """Per-example (and per-token) means from summed step or evaluation metrics."""
    examples = max(sums.get("examples", 0.0), 1.0)
    means = {k[: -len("_sum")]: v / examples for k, v in sums.items() if k.endswith("_sum")}
    if stage == "s1" and sums.get("tokens"):
        means["loss_per_token"] = sums["loss_sum"] / sums["tokens"]
        means["top3_accuracy"] = sums["top3_correct"] / max(sums["top3_total"], 1.0)
    return means


__all__ = ["S1Task", "S2Task", "Task", "autocast", "mean_metrics"]
