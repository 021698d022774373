"""The DP engine's per-sample state: the pruned backward computes exactly an ordinary one's, and no sums.

``PrivateGradSampleModule.backward`` asks autograd only for what reaches the per-sample hooks.
Each check runs the same forward twice on copies of one model: once with an ordinary
``loss.backward()``, once with the pruned backward, and requires identical per-sample gradients
and book-keeping records (the samplers are checked against per-example autograd in
tests/test_s1_per_sample.py and tests/test_s2_per_sample.py, the engine's clipped sums in
tests/test_dp_book_keeping.py), with no summed ``p.grad`` computed by the pruned one.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fedvox.client.dp.engine import make_private, run_logical_step
from fedvox.client.dp.grad_sample import PrivateGradSampleModule
from fedvox.shared.models.config import s1_config, s2_config
from fedvox.shared.models.s1 import Text2SemanticDecoder, s1_loss
from fedvox.shared.models.s2 import (
    discriminator_losses,
    frozen,
    generator_losses,
)
from fedvox.shared.models.subsets import SubsetSpec, apply_subset
from tests.per_sample import assert_clipped_sums_match
from tests.s1_batches import random_s1_batch
from tests.s2_batches import double_gan

S1 = s1_config("tiny", dropout=0.0)
S2 = s2_config("tiny", p_dropout=0.0, style_dropout=0.0)


def _grad_samples(model: torch.nn.Module, loss_fn, pruned: bool) -> dict[str, torch.Tensor]:
    gsm = PrivateGradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
    try:
        loss = loss_fn(gsm).sum()
        if pruned:
            gsm.backward(loss)
        else:
            loss.backward()
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if pruned:
            assert all(p.grad is None for p in trainable.values()), "the pruned backward computed p.grad"
        else:
            assert all(p.grad is not None for p in trainable.values())
        # per-sample gradients, or the book-keeping record the per-sample norms and sums come from
        return {
            n: [p.grad_sample] if p.grad_sample is not None else [t.clone() for t in p.book.samples]
            for n, p in trainable.items()
        }
    finally:
        gsm._close()


def _assert_pruned_equals_opacus(model: torch.nn.Module, loss_fn) -> None:
    expected = _grad_samples(copy.deepcopy(model), loss_fn, pruned=False)
    actual = _grad_samples(copy.deepcopy(model), loss_fn, pruned=True)
    assert actual.keys() == expected.keys() and expected
    for name, value in expected.items():
        assert len(actual[name]) == len(value) and all(map(torch.equal, actual[name], value)), name


def _s1_model(subset: SubsetSpec, checkpointing: bool = False) -> Text2SemanticDecoder:
    torch.manual_seed(0)
    model = Text2SemanticDecoder(S1, attention_checkpointing=checkpointing)
    apply_subset(model, subset)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B.weight"):
                param.normal_(0.0, 0.05)
    return model.double()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "attention-checkpointing"])
@pytest.mark.parametrize(
    "subset", [SubsetSpec("full"), SubsetSpec("lora", lora_rank=4, groups=("norms",))], ids=["full", "lora+norms"]
)
def test_s1_pruned_backward_gives_opacus_per_sample_gradients(subset, checkpointing) -> None:
    batch = random_s1_batch(S1, [6, 3, 1], [8, 4, 0], seed=1, dtype=torch.float64, extra_padding=1)
    _assert_pruned_equals_opacus(_s1_model(subset, checkpointing), lambda m: s1_loss(m, batch).per_sample)


def test_s1_private_module_matches_per_example_autograd() -> None:
    batch = random_s1_batch(S1, [5, 2], [7, 3], seed=2, dtype=torch.float64)
    model = _s1_model(SubsetSpec("full"))
    paths = assert_clipped_sums_match(model, lambda m, b: s1_loss(m, b).per_sample, batch, rtol=1e-5)
    assert sum(paths.values()) == sum(1 for _ in model.parameters())


@pytest.fixture(scope="module")
def s2_models():
    return double_gan(S2)


def test_s2_generator_pruned_backward_gives_opacus_per_sample_gradients(s2_models) -> None:
    generator, discriminator, step = s2_models

    def loss(model):
        with frozen(discriminator):
            out = model(step.batch, slice_starts=step.slice_starts, posterior_noise=step.posterior_noise)
            return generator_losses(discriminator, step.batch, out, S2)["total"]

    _assert_pruned_equals_opacus(generator, loss)


def test_s2_discriminator_pruned_backward_gives_opacus_per_sample_gradients(s2_models) -> None:
    generator, discriminator, step = s2_models
    with torch.no_grad():
        out = generator(step.batch, slice_starts=step.slice_starts, posterior_noise=step.posterior_noise)
    _assert_pruned_equals_opacus(discriminator, lambda d: discriminator_losses(d, step.batch, out, S2))


def test_an_ordinary_backward_still_works_and_keeps_no_outputs_alive() -> None:
    model = _s1_model(SubsetSpec("full"))
    batch = random_s1_batch(S1, [4, 2], [5, 3], seed=3, dtype=torch.float64)
    gsm = PrivateGradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
    try:
        s1_loss(gsm, batch).per_sample.sum().backward()
        assert gsm._targets == []
        assert all(p.grad_sample is not None or p.book is not None for p in model.parameters())
    finally:
        gsm._close()


def _linear_step(physical: int, fail_once_after_forward: bool) -> list[torch.Tensor]:
    """One DP step of a small MLP; optionally the first attempt dies between forward and backward."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 6, generator=g), torch.randn(12, 3, generator=g)
    private = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=1.0,
        clip_norm=0.5,
        expected_batch_size=12,
        noise_generator=torch.Generator().manual_seed(7),
    )
    failures = [fail_once_after_forward]

    def accumulate(idx):
        per_sample = (private.module(x[idx]) - y[idx]).pow(2).sum(dim=1)
        if failures.pop() if failures else False:
            raise torch.OutOfMemoryError("simulated, after the forward pass")
        private.module.backward(per_sample.sum())
        return {}

    outcome = run_logical_step(torch.arange(12), physical, accumulate, [private.optimizer])
    assert outcome.oom_retries == int(fail_once_after_forward)
    private.close()
    return [p.detach().clone() for p in model.parameters()]


def test_out_of_memory_between_forward_and_backward_retries_cleanly() -> None:
    """The hooks' half-done state (activations, counters, recorded outputs) is reset on retry."""
    clean = _linear_step(6, fail_once_after_forward=False)
    retried = _linear_step(12, fail_once_after_forward=True)  # 12 fails, 6 + 6 succeeds
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(clean, retried, strict=True))
