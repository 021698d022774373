"""SoVITS (GPT-SoVITS stage 2): generator, multi-period discriminator, per-sample losses, interop."""

from fedvox.shared.models.s2.discriminator import MultiPeriodDiscriminator
from fedvox.shared.models.s2.gan import discriminator_losses, frozen, generator_losses
from fedvox.shared.models.s2.generator import S2Forward, SynthesizerTrn, draw_randomness, draw_slice_starts

__all__ = [
    "MultiPeriodDiscriminator",
    "S2Forward",
    "SynthesizerTrn",
    "discriminator_losses",
    "draw_randomness",
    "draw_slice_starts",
    "frozen",
    "generator_losses",
]
