"""Opacus (hooks) per-sample gradients of the s1 decoder equal per-example autograd, exactly."""

from __future__ import annotations

import pytest
import torch

from fedvox.shared.models.config import s1_config
from fedvox.shared.models.s1 import Text2SemanticDecoder, s1_loss
from fedvox.shared.models.subsets import SubsetSpec, apply_subset
from tests.per_sample import assert_per_sample_grads_match
from tests.s1_batches import random_s1_batch

CONFIG = s1_config("tiny", dropout=0.0)


def _per_sample_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    return s1_loss(model, batch).per_sample


def _model(subset: SubsetSpec, checkpointing: bool) -> Text2SemanticDecoder:
    torch.manual_seed(0)
    model = Text2SemanticDecoder(CONFIG, attention_checkpointing=checkpointing)
    apply_subset(model, subset)
    with torch.no_grad():  # LoRA B starts at zero; give it values so every path carries gradient
        for name, param in model.named_parameters():
            if name.endswith("lora_B.weight"):
                param.normal_(0.0, 0.05)
    return model.double()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "attention-checkpointing"])
def test_full_subset_per_sample_grads_are_exact(checkpointing: bool) -> None:
    model = _model(SubsetSpec("full"), checkpointing)
    batch = random_s1_batch(CONFIG, [6, 3, 1], [8, 4, 0], seed=1, dtype=torch.float64, extra_padding=1)
    checked = assert_per_sample_grads_match(model, _per_sample_loss, batch, rtol=1e-5)
    assert checked == sum(1 for _ in model.parameters())


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "attention-checkpointing"])
def test_lora_subset_per_sample_grads_are_exact(checkpointing: bool) -> None:
    # LoRA adapters plus the embeddings and norms groups: Linear, Embedding, LayerNorm and the
    # positional alpha all go through Opacus's samplers.
    model = _model(
        SubsetSpec("lora", lora_rank=4, lora_alpha=8.0, groups=("embeddings", "norms")),
        checkpointing,
    )
    batch = random_s1_batch(CONFIG, [5, 2], [7, 3], seed=2, dtype=torch.float64)
    checked = assert_per_sample_grads_match(model, _per_sample_loss, batch, rtol=1e-5)
    adapters = CONFIG.layers * 6 * 2
    assert checked == adapters + 6 + CONFIG.layers * 4
