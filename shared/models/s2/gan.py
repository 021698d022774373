"""One SoVITS GAN step's per-sample losses, and how to keep D out of G's gradients.

A training step (as ``s2_train.py``, with per-sample losses for DP-SGD):

1. ``out = G(batch)``.
2. D step: ``discriminator_losses(D, batch, out, config).sum().backward()``; D is called once on
   the real slices and once on the detached generated ones, never on a concatenated 2B batch.
3. G step, with D frozen for both the forward and the backward::

       with frozen(D):
           losses = generator_losses(D, batch, out, config)
           losses["total"].sum().backward()

   :func:`frozen` stops D's parameters from requiring gradients and, when ``D`` is an Opacus
   ``GradSampleModule``, disables its hooks: with hooks on, D would try to compute per-sample
   gradients from activations it never recorded (and would charge G's data to D).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from fedvox.shared.models.batches import S2Batch
from fedvox.shared.models.config import S2Config
from fedvox.shared.models.s2.generator import S2Forward, slice_frames
from fedvox.shared.models.s2.losses import (
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    kl_loss,
    mel_loss,
    total,
)


def real_slices(batch: S2Batch, out: S2Forward, config: S2Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The real waveform ``[B, 1, segment_samples]`` and spectrogram ``[B, 1025, segment]`` slices
    that ``out.wave_hat`` is compared with."""
    wave = slice_frames(batch.wave, out.slice_starts * config.hop_length, config.segment_samples)
    spec = slice_frames(batch.spec, out.slice_starts, config.segment_frames)
    return wave, spec


def discriminator_losses(discriminator: nn.Module, batch: S2Batch, out: S2Forward, config: S2Config) -> torch.Tensor:
    """Per-sample LSGAN loss of D ``[B]`` (generated waves detached: this step trains D only)."""
    wave, _ = real_slices(batch, out, config)
    real, _ = discriminator(wave)
    fake, _ = discriminator(out.wave_hat.detach())
    return discriminator_loss(real, fake)


def generator_losses(
    discriminator: nn.Module, batch: S2Batch, out: S2Forward, config: S2Config
) -> dict[str, torch.Tensor]:
    """Per-sample G losses ``[B]`` by name, weighted as upstream, plus their sum under ``"total"``.

    Call inside :func:`frozen` ``(discriminator)`` and back-propagate inside the same block: an
    Opacus-wrapped D's backward hooks fire during G's backward and fail (``No activations
    detected``) once its hooks are enabled again.
    """
    wave, spec = real_slices(batch, out, config)
    with torch.no_grad():
        _, fmap_real = discriminator(wave)
    fake, fmap_fake = discriminator(out.wave_hat)
    losses = {
        "adversarial": generator_adversarial_loss(fake),
        "feature_matching": feature_matching_loss(fmap_real, fmap_fake) * config.c_fm,
        "mel": mel_loss(spec, out.wave_hat) * config.c_mel,
        "kl": kl_loss(out.z_p, out.logs_q, out.m_p, out.logs_p, out.mask) * config.c_kl,
        "commitment": out.commitment,
    }
    losses["total"] = total(losses.values())
    return losses


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block ``module``'s parameters get no gradient (and Opacus hooks, if any, are off)."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    hooks_were_on = getattr(module, "hooks_enabled", False)
    for p in trainable:
        p.requires_grad_(False)
    if hooks_were_on:
        module.disable_hooks()  # type: ignore[operator]  # Opacus's GradSampleModule
    try:
        yield module
    finally:
        for p in trainable:
            p.requires_grad_(True)
        if hooks_were_on:
            module.enable_hooks()  # type: ignore[operator]


__all__ = ["discriminator_losses", "frozen", "generator_losses", "real_slices"]
