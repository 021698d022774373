"""Book-keeping clipping (client/dp/book_keeping.py) gives DP-SGD's exact clipped sums.

Each check runs the engine's clipping (``make_private``) on one batch and compares every
trainable tensor's clipped sum, and every per-sample norm, with per-example autograd in float64
(tests/per_sample.py), on both paths: ghost norms and weight-norm records, and the explicit
per-sample gradients the cost rule picks elsewhere.
"""

from __future__ import annotations

import pytest
import torch

from fedvox.client.dp import book_keeping
from fedvox.client.dp.engine import make_private
from fedvox.shared.models.config import s1_config, s2_config
from fedvox.shared.models.s1 import Text2SemanticDecoder, s1_loss
from fedvox.shared.models.s2 import frozen, generator_losses
from fedvox.shared.models.s2.gan import discriminator_losses
from fedvox.shared.models.subsets import SubsetSpec, apply_subset
from tests.per_sample import assert_clipped_sums_match
from tests.s1_batches import random_s1_batch
from tests.s2_batches import DiscriminatorStep, double_gan, single_thread  # noqa: F401

S1 = s1_config("tiny", dropout=0.0)
S2 = s2_config("tiny", p_dropout=0.0, style_dropout=0.0)
RTOL = 1e-6


def _s1_model(subset: SubsetSpec) -> Text2SemanticDecoder:
    torch.manual_seed(0)
    model = Text2SemanticDecoder(S1)
    apply_subset(model, subset)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B.weight"):
                param.normal_(0.0, 0.05)
    return model.double()


def _s1_loss(model, batch) -> torch.Tensor:
    return s1_loss(model, batch).per_sample


S1_BATCH = random_s1_batch(S1, [6, 3, 1], [8, 4, 0], seed=1, dtype=torch.float64, extra_padding=1)


@pytest.mark.parametrize("ghost", [True, False], ids=["ghost-norms", "explicit"])
def test_s1_clipped_sums_are_exact_on_either_path(ghost: bool, monkeypatch) -> None:
    if not ghost:
        monkeypatch.setattr(book_keeping, "GHOST_NORM_FACTOR", 0.0)
    model = _s1_model(SubsetSpec("full"))
    paths = assert_clipped_sums_match(model, _s1_loss, S1_BATCH, rtol=RTOL)
    assert sum(paths.values()) == sum(1 for _ in model.parameters())
    linears = sum(1 + (m.bias is not None) for m in model.modules() if type(m) is torch.nn.Linear)
    assert paths["book"] == (linears if ghost else 0)


def test_s1_lora_clipped_sums_are_exact() -> None:
    model = _s1_model(SubsetSpec("lora", lora_rank=4, groups=("embeddings", "norms")))
    paths = assert_clipped_sums_match(model, _s1_loss, S1_BATCH, rtol=RTOL)
    assert paths["book"] > 0 and paths["explicit"] > 0


@pytest.fixture(scope="module")
def s2_setup():
    return double_gan(S2)


def _book_kept_weight_normed(model: torch.nn.Module) -> int:
    """Tensors of the weight-normed convolutions large enough to keep books (the others' per-sample
    gradients are explicit, clipped in the optimizer's flat buffer of small tensors)."""
    layers = [
        m
        for m in model.modules()
        if hasattr(m, "parametrizations")
        and m.parametrizations.weight.original1.numel() > book_keeping.SMALL_TENSOR_NUMEL
    ]
    return sum(sum(1 for _ in m.parameters()) for m in layers)


SIZE_RULES = pytest.mark.parametrize("every_layer", [True, False], ids=["records-everywhere", "size-rule"])


def _size_rule(every_layer: bool, monkeypatch) -> None:
    if every_layer:  # every weight-normed conv keeps books, however small
        monkeypatch.setattr(book_keeping, "SMALL_TENSOR_NUMEL", 0)


@SIZE_RULES
def test_s2_generator_clipped_sums_are_exact(s2_setup, every_layer: bool, monkeypatch) -> None:
    _size_rule(every_layer, monkeypatch)
    generator, discriminator, step = s2_setup

    def loss(model, s) -> torch.Tensor:
        with frozen(discriminator):
            out = model(s.batch, slice_starts=s.slice_starts, posterior_noise=s.posterior_noise)
            return generator_losses(discriminator, s.batch, out, S2)["total"]

    paths = assert_clipped_sums_match(generator, loss, step, rtol=RTOL)
    assert paths["book"] >= _book_kept_weight_normed(generator) > 0
    assert paths["explicit"] > 0


@SIZE_RULES
def test_s2_discriminator_clipped_sums_are_exact(s2_setup, every_layer: bool, monkeypatch) -> None:
    _size_rule(every_layer, monkeypatch)
    generator, discriminator, step = s2_setup
    with torch.no_grad():
        out = generator(step.batch, slice_starts=step.slice_starts, posterior_noise=step.posterior_noise)

    paths = assert_clipped_sums_match(
        discriminator,
        lambda d, s: discriminator_losses(d, s.batch, s.out, S2),
        DiscriminatorStep(step.batch, out),
        rtol=RTOL,
    )
    every = sum(1 for _ in discriminator.parameters())
    assert paths["book"] == (every if every_layer else _book_kept_weight_normed(discriminator))
    assert paths["book"] + paths["explicit"] == every


def test_a_second_backward_before_the_step_is_refused() -> None:
    model = _s1_model(SubsetSpec("full"))
    private = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=1.0,
        clip_norm=1.0,
        expected_batch_size=3,
        noise_generator=torch.Generator().manual_seed(0),
    )
    try:
        for _ in range(2):
            private.module.backward(_s1_loss(private.module, S1_BATCH).sum())
        with pytest.raises(ValueError, match="step the optimizer after each physical batch"):
            private.optimizer.step()
    finally:
        private.close()


def test_the_cost_rule_follows_the_shapes() -> None:
    assert not book_keeping.ghost_norm_is_cheaper(191, 64, 256)  # s1 tiny at the benchmark length
    assert book_keeping.ghost_norm_is_cheaper(15, 64, 256)  # the short batches above
    assert book_keeping.ghost_norm_is_cheaper(100, 512, 2048) and not book_keeping.ghost_norm_is_cheaper(
        200, 512, 2048
    )  # s1 v2's feed-forward layer: the crossover is about 128 positions
