"""Opacus (hooks) per-sample gradients of the SoVITS generator and discriminator are exact.

Every trainable tensor of a tiny G (everything upstream fine-tunes: all of G but the codebook and
the unused ``ssl_proj``) and of a tiny D is compared with per-example autograd in float64. Dropout
is off for the check: Opacus recomputes nothing, but the reference would draw other masks.

Both ways of wrapping are checked: plain ``GradSampleModule`` (weight-normed convs through
Opacus's functorch fallback) and ``DirectGradSampleModule`` (our direct formulas).
"""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule

from fedvox.client.dp.grad_sample import DirectGradSampleModule
from fedvox.shared.models.config import s2_config
from fedvox.shared.models.s2 import (
    MultiPeriodDiscriminator,
    SynthesizerTrn,
    frozen,
    generator_losses,
)
from fedvox.shared.models.s2.gan import discriminator_losses
from fedvox.shared.models.subsets import SubsetSpec, apply_subset
from tests.per_sample import assert_per_sample_grads_match
from tests.s2_batches import (
    DiscriminatorStep,
    GeneratorStep,
    fixed_randomness,
    random_s2_batch,
    single_thread,  # noqa: F401  (autouse: one CPU thread)
)

RTOL = 1e-5
CONFIG = s2_config("tiny", p_dropout=0.0, style_dropout=0.0)


@pytest.fixture(scope="module")
def models() -> tuple[SynthesizerTrn, MultiPeriodDiscriminator]:
    torch.manual_seed(0)
    generator = SynthesizerTrn(CONFIG).double()
    discriminator = MultiPeriodDiscriminator(CONFIG).double()
    apply_subset(generator, SubsetSpec(kind="full"))
    return generator, discriminator


@pytest.fixture(scope="module")
def step() -> GeneratorStep:
    # lengths differ so padding, masks and a too-short utterance (3 < 8 frames / 2) are covered
    batch = random_s2_batch(CONFIG, [6, 5, 3], [7, 4, 2], seed=1, dtype=torch.float64)
    return fixed_randomness(batch, CONFIG, seed=2, dtype=torch.float64)


def _generator_loss(discriminator: MultiPeriodDiscriminator):
    def loss(model: torch.nn.Module, step: GeneratorStep) -> torch.Tensor:
        with frozen(discriminator):
            out = model(step.batch, slice_starts=step.slice_starts, posterior_noise=step.posterior_noise)
            return generator_losses(discriminator, step.batch, out, CONFIG)["total"]

    return loss


WRAPPERS = pytest.mark.parametrize("gsm_class", [GradSampleModule, DirectGradSampleModule])


@WRAPPERS
def test_generator_per_sample_gradients_are_exact(models, step, gsm_class) -> None:
    generator, discriminator = models
    trainable = {n for n, p in generator.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("ssl_proj.", "quantizer.")) for n in trainable)
    assert any("emb_rel_k" in n for n in trainable) and any("original0" in n for n in trainable)
    checked = assert_per_sample_grads_match(
        generator, _generator_loss(discriminator), step, rtol=RTOL, gsm_class=gsm_class
    )
    assert checked == len(trainable)
    assert not any(p.grad is not None for p in discriminator.parameters())


@WRAPPERS
def test_discriminator_per_sample_gradients_are_exact(models, step, gsm_class) -> None:
    generator, discriminator = models
    with torch.no_grad():
        out = generator(step.batch, slice_starts=step.slice_starts, posterior_noise=step.posterior_noise)
    checked = assert_per_sample_grads_match(
        discriminator,
        lambda d, s: discriminator_losses(d, s.batch, s.out, CONFIG),
        DiscriminatorStep(step.batch, out),
        rtol=RTOL,
        gsm_class=gsm_class,
    )
    assert checked == len(list(discriminator.parameters()))


def test_lora_generator_per_sample_gradients_are_exact(step) -> None:
    torch.manual_seed(1)
    generator = SynthesizerTrn(CONFIG).double()
    discriminator = MultiPeriodDiscriminator(CONFIG).double()
    apply_subset(generator, SubsetSpec(kind="lora", lora_rank=2, groups=("ref_enc",)))
    for name, param in generator.named_parameters():  # non-zero B so every adapter gets a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    trainable = [n for n, p in generator.named_parameters() if p.requires_grad]
    assert any("flow" in n and "lora_A" in n for n in trainable)
    assert any("mrte" in n and "lora_B" in n for n in trainable)
    checked = assert_per_sample_grads_match(
        generator, _generator_loss(discriminator), step, rtol=RTOL, gsm_class=DirectGradSampleModule
    )
    assert checked == len(trainable)


def test_pro_extras_per_sample_gradients_are_exact() -> None:
    """v2Pro's sv_emb / PReLU / ge_to512 path on a tiny-sized Pro config."""
    config = s2_config("tiny", p_dropout=0.0, style_dropout=0.0, sv_dim=64, mrte_hidden=16)
    torch.manual_seed(2)
    generator = SynthesizerTrn(config).double()
    discriminator = MultiPeriodDiscriminator(config).double()
    apply_subset(generator, SubsetSpec(kind="groups", groups=("speaker", "ref_enc")))
    batch = random_s2_batch(config, [5, 4], [3, 6], seed=3, dtype=torch.float64)
    step = fixed_randomness(batch, config, seed=4, dtype=torch.float64)

    def loss(model: torch.nn.Module, s: GeneratorStep) -> torch.Tensor:
        with frozen(discriminator):
            out = model(s.batch, slice_starts=s.slice_starts, posterior_noise=s.posterior_noise)
            return generator_losses(discriminator, s.batch, out, config)["total"]

    checked = assert_per_sample_grads_match(generator, loss, step, rtol=RTOL, gsm_class=DirectGradSampleModule)
    assert checked == 5 + len(list(generator.ref_enc.parameters()))


def test_weight_norm_wrapper_needs_no_functorch_fallback(models) -> None:
    """Every G and D layer (tiny, v2 structure) has a direct sampler: none goes through vmap."""
    for model in models:
        wrapped = DirectGradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
        try:
            fallback = [n for n, m in model.named_modules() if hasattr(m, "ft_compute_sample_grad")]
            assert fallback == []
        finally:
            wrapped._close()


def test_gan_step_with_both_networks_wrapped_charges_each_network_its_own_loss(step) -> None:
    """The documented protocol: G's loss forward *and* backward inside ``frozen(D)``."""
    torch.manual_seed(3)
    g_model, d_model = SynthesizerTrn(CONFIG), MultiPeriodDiscriminator(CONFIG)
    apply_subset(g_model, SubsetSpec(kind="full"))
    batch = step.batch.select(torch.tensor([0, 1]))
    batch.spec, batch.wave = batch.spec.float(), batch.wave.float()
    g = DirectGradSampleModule(g_model, batch_first=True, loss_reduction="sum", strict=True)
    d = DirectGradSampleModule(d_model, batch_first=True, loss_reduction="sum", strict=True)
    try:
        out = g(batch, slice_starts=step.slice_starts[:2], posterior_noise=step.posterior_noise[:2].float())
        with frozen(d):
            generator_losses(d, batch, out, CONFIG)["total"].sum().backward()
        assert all(p.grad_sample is None and p.grad is None for p in d_model.parameters())
        assert all(p.grad_sample.shape[0] == 2 for p in g_model.parameters() if p.requires_grad)
        discriminator_losses(d, batch, out, CONFIG).sum().backward()
        assert all(p.grad_sample.shape[0] == 2 for p in d_model.parameters())
    finally:
        g._close()
        d._close()
