"""s1 decoder: official sizes, the padding contract, the per-sample loss, precision, training."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedvox.shared.models.config import EOS, s1_config
from fedvox.shared.models.s1 import S1Loss, Text2SemanticDecoder, prefix_lm_mask, s1_loss
from fedvox.shared.models.subsets import SubsetSpec, apply_subset
from tests.s1_batches import random_s1_batch, unpadded

TINY = s1_config("tiny")


@pytest.mark.parametrize(
    ("name", "expected"),
    [("v1", 77_493_762), ("v2", 77_606_402), ("v2Pro", 77_606_402), ("v2ProPlus", 77_606_402)],
)
def test_parameter_count_equals_official(name: str, expected: int) -> None:
    with torch.device("meta"):
        model = Text2SemanticDecoder(s1_config(name))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert not list(model.buffers())  # Opacus needs trainable modules without buffers


def test_prefix_lm_mask_structure() -> None:
    # one sample: 2 of 3 phoneme columns real (left-padded), 2 of 3 semantic columns real
    mask = prefix_lm_mask(torch.tensor([2]), 3, torch.tensor([2]), 3)[0, 0]
    expected = torch.tensor(
        [  # keys: pad, p0, p1 | s0, s1, pad
            [0, 1, 1, 0, 0, 0],  # padded phoneme row still sees real phonemes (no empty row)
            [0, 1, 1, 0, 0, 0],
            [0, 1, 1, 0, 0, 0],
            [0, 1, 1, 1, 0, 0],
            [0, 1, 1, 1, 1, 0],
            [0, 1, 1, 1, 1, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_per_sample_loss_does_not_depend_on_batch_padding() -> None:
    torch.manual_seed(0)
    model = Text2SemanticDecoder(TINY).double().eval()
    batch = random_s1_batch(TINY, [9, 4, 1], [12, 5, 0], seed=1, dtype=torch.float64, extra_padding=3)
    together = s1_loss(model, batch).per_sample
    for i in range(len(batch)):
        alone = s1_loss(model, unpadded(batch, i)).per_sample
        torch.testing.assert_close(alone[0], together[i], rtol=1e-12, atol=1e-10)


def test_loss_ignores_padding_values_and_counts_real_targets() -> None:
    torch.manual_seed(0)
    model = Text2SemanticDecoder(TINY).eval()
    batch = random_s1_batch(TINY, [6, 3], [7, 2], seed=2, extra_padding=2)
    reference = s1_loss(model, batch)
    noisy = copy.deepcopy(batch)
    noisy.phoneme_ids[1, :5] = 17  # padded phoneme columns of sample 1
    noisy.bert_features[1, :5] = 3.0
    noisy.semantic_ids[1, 2:] = 5  # padded semantic columns of sample 1
    changed = s1_loss(model, noisy)
    torch.testing.assert_close(changed.per_sample, reference.per_sample)
    assert reference.tokens.tolist() == [8, 3]  # tokens + EOS
    assert reference.top3_total.item() == 7 + 2  # EOS targets are not counted


class _FixedLogits(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.logits


def test_targets_and_top3_accuracy() -> None:
    batch = random_s1_batch(TINY, [2, 2], [2, 1], seed=3)
    targets = [
        [*batch.semantic_ids[0, :2].tolist(), EOS],
        [batch.semantic_ids[1, 0].item(), EOS, EOS],
    ]
    logits = torch.zeros(2, 3, EOS + 1)
    logits[0, 0, targets[0][0]] = 10.0  # rank 1: hit
    logits[0, 1, :4] = 10.0  # target ranked below four others: miss (unless it is one of them)
    logits[1, 0, targets[1][0]] = 10.0  # hit
    logits[1, 2] = float("nan")  # padded position: must not reach the loss
    result = s1_loss(_FixedLogits(logits), batch)
    assert isinstance(result, S1Loss)
    expected_ce = [
        sum(-torch.log_softmax(logits[0, t], -1)[targets[0][t]] for t in range(3)),
        sum(-torch.log_softmax(logits[1, t], -1)[targets[1][t]] for t in range(2)),
    ]
    torch.testing.assert_close(result.per_sample, torch.stack(expected_ce))
    assert result.top3_total.item() == 3
    second_hit = int(targets[0][1] < 4)
    assert result.top3_correct.item() == 2 + second_hit


@pytest.mark.parametrize("subset", [None, SubsetSpec("lora", lora_rank=2)], ids=["plain", "lora"])
def test_deepcopy_is_independent(subset: SubsetSpec | None) -> None:
    torch.manual_seed(0)
    model = Text2SemanticDecoder(TINY, attention_checkpointing=True).eval()
    if subset is not None:
        apply_subset(model, subset)
    batch = random_s1_batch(TINY, [5, 3], [4, 6], seed=4)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(s1_loss(twin, batch).per_sample, s1_loss(model, batch).per_sample)
    assert twin.h.layers[0].self_attn.checkpoint
    with torch.no_grad():
        for param in twin.parameters():
            param.add_(1.0)
    assert all(not torch.equal(a, b) for a, b in zip(twin.parameters(), model.parameters(), strict=True))


def test_bf16_autocast_forward_and_backward() -> None:
    torch.manual_seed(0)
    model = Text2SemanticDecoder(TINY).eval()
    batch = random_s1_batch(TINY, [8, 5], [10, 6], seed=5)
    reference = s1_loss(model, batch).per_sample
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = s1_loss(model, batch).per_sample
    loss.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(loss, reference, rtol=3e-2, atol=0.0)


def test_attention_checkpointing_gives_identical_gradients() -> None:
    torch.manual_seed(0)
    model = Text2SemanticDecoder(TINY)  # train mode: dropout on, RNG replayed by the checkpoint
    batch = random_s1_batch(TINY, [7, 4], [9, 3], seed=6)
    grads = []
    for enabled in (False, True):
        model.set_attention_checkpointing(enabled)
        model.zero_grad()
        torch.manual_seed(1)
        s1_loss(model, batch).per_sample.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_tiny_model_overfits_fixed_batches() -> None:
    torch.manual_seed(0)
    model = Text2SemanticDecoder(s1_config("tiny", dropout=0.0))
    batches = [random_s1_batch(TINY, [6, 4], [12, 8], seed=s) for s in (7, 8)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(s1_loss(model, b).per_sample.sum().item() for b in batches) / len(batches)

    before = mean_loss()
    for _ in range(30):
        for batch in batches:
            optimizer.zero_grad()
            s1_loss(model, batch).per_sample.sum().backward()
            optimizer.step()
    after = mean_loss()
    assert after < 0.2 * before, (before, after)
    result = s1_loss(model.eval(), batches[0])
    assert result.top3_correct.item() == result.top3_total.item()
