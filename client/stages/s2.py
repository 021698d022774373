"""s2, the SoVITS GAN stage, on the client: its DP training task."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fedvox.client.data.datasets import S2Dataset, S2Example, collate_s2
from fedvox.client.dp.task import Examples, Task, adamw, autocast
from fedvox.client.profiles import ResourceProfile
from fedvox.client.stages import ClientStage
from fedvox.shared.models.batches import S2Batch
from fedvox.shared.models.factory import SoVITSPair
from fedvox.shared.models.s2 import discriminator_losses, frozen, generator_losses
from fedvox.shared.models.s2.gan import real_slices
from fedvox.shared.models.s2.generator import SynthesizerTrn
from fedvox.shared.models.s2.losses import kl_loss, mel_loss

S2_BETAS = (0.8, 0.99)
"""GPT-SoVITS's AdamW betas for s2 (eps 1e-9)."""


class S2Task(Task):
    """SoVITS GAN: generator and discriminator losses per utterance, on the same examples.

    Both networks are updated from their parameters at the start of the step (simultaneous
    updates): G's adversarial terms go through D with D frozen, then D's LSGAN loss is taken on
    the real and the (detached) generated slices. GPT-SoVITS alternates instead (D first, then G
    against the updated D), which under virtual batching would need a second generator forward
    per chunk.
    """

    stage = "s2"

    def __init__(
        self,
        pair: SoVITSPair,
        dataset: Examples,
        device: torch.device,
        precision: str = "fp32",
        loss_scale: float = 1.0,
    ) -> None:
        super().__init__(device, precision, loss_scale)
        self.pair = self.model = pair.to(device)
        self.dataset = dataset

    @classmethod
    def for_profile(cls, pair: nn.Module, dataset: Examples, profile: ResourceProfile) -> S2Task:
        """The task on the profile's device and precision."""
        if not isinstance(pair, SoVITSPair):
            raise TypeError(f"the s2 task trains a SoVITSPair, not a {type(pair).__name__}")
        return cls(pair, dataset, torch.device(profile.device), profile.precision, profile.loss_scale)

    @property
    def generator(self) -> SynthesizerTrn:
        return self.pair.generator

    @property
    def adversarial(self) -> bool:
        """Whether the discriminator trains (the run's subset says so, ``SubsetSpec.adversary``).
        Without it the generator trains on its reconstruction losses alone: one DP release per
        step instead of two, so the same epsilon leaves it less noise, and no discriminator pass."""
        return any(p.requires_grad for p in self.pair.discriminator.parameters())

    def parts(self) -> dict[str, nn.Module]:
        if not self.adversarial:
            return {"generator": self.pair.generator}
        return {"generator": self.pair.generator, "discriminator": self.pair.discriminator}

    def optimizer(self, name: str, module: nn.Module, learning_rate: float) -> torch.optim.Optimizer:
        groups: list[dict]
        if isinstance(module, SynthesizerTrn):  # the generator's own learning-rate groups
            groups = module.param_groups(learning_rate)
        else:
            groups = [{"params": [p for p in module.parameters() if p.requires_grad], "lr": learning_rate}]
        return adamw(groups, learning_rate, betas=S2_BETAS, eps=1e-9, weight_decay=0.01)

    def batch(
        self, dataset: Examples, indices: torch.Tensor, step_seed: int
    ) -> tuple[S2Batch, torch.Tensor, torch.Tensor]:
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

    def accumulate(self, wrapped: Mapping[str, nn.Module], indices: torch.Tensor, step_seed: int) -> dict[str, float]:
        if "discriminator" not in wrapped:
            return self._reconstruct(wrapped["generator"], indices, step_seed)
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

    def accumulate_without_adversary(self, indices: torch.Tensor, step_seed: int) -> tuple[dict[str, float], list[str]]:
        """The generator alone on its reconstruction losses (the discriminator has not joined
        yet): non-private pretraining's first ``disc_start`` steps."""
        return self._reconstruct(self.generator, indices, step_seed), ["generator"]

    def _reconstruct(self, generator: nn.Module, indices: torch.Tensor, step_seed: int) -> dict[str, float]:
        """Forward + backward of mel L1, KL and the commitment loss through ``generator`` (the
        model itself, or its DP wrapper) only."""
        batch, starts, noise = self.batch(self.dataset, indices, step_seed)
        config = self.generator.config
        with autocast(self.device, self.precision):
            out = generator(batch, slice_starts=starts, posterior_noise=noise)
            _, spec = real_slices(batch, out, config)
            mel = mel_loss(spec, out.wave_hat) * config.c_mel
            kl = kl_loss(out.z_p, out.logs_q, out.m_p, out.logs_p, out.mask) * config.c_kl
            total = mel + kl + out.commitment
        self._backward(total, generator)
        return {
            "loss_sum": float(total.detach().float().sum()),
            "g_mel_sum": float(mel.detach().float().sum()),
            "g_kl_sum": float(kl.detach().float().sum()),
            "examples": float(len(indices)),
        }

    @torch.no_grad()
    def evaluate(self, dataset: Examples, indices: torch.Tensor) -> dict[str, float]:
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


CLIENT_STAGE = ClientStage(example=S2Example, dataset=S2Dataset, task=S2Task)

__all__ = ["CLIENT_STAGE", "S2_BETAS", "S2Task"]
