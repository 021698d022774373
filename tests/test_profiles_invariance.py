"""Profiles change how a step runs, never what it computes: two profiles, one DP update."""

from __future__ import annotations

import torch

from fedvox.client.device import REFERENCE_DEVICES
from fedvox.client.dp.engine import make_private, poisson_sample, run_logical_step
from fedvox.client.profiles import ProfileOverrides, ResourceProfile, select_profile
from fedvox.shared.models.config import s1_config
from fedvox.shared.models.s1 import Text2SemanticDecoder, s1_loss
from fedvox.shared.models.subsets import SubsetSpec, apply_subset
from tests.s1_batches import random_s1_batch

EXAMPLES = 12
# Dropout off: masks are drawn per physical batch from the global RNG, so with dropout two
# splits of one logical batch are equal in distribution, not sample for sample.
CONFIG = s1_config("tiny", dropout=0.0)


def build() -> Text2SemanticDecoder:
    torch.manual_seed(0)
    model = apply_subset(Text2SemanticDecoder(CONFIG), SubsetSpec("lora", lora_rank=4))
    for name, param in model.named_parameters():  # non-zero B, so A gets gradients too
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model


def one_logical_step(profile: ResourceProfile, indices: torch.Tensor) -> list[torch.Tensor]:
    model = build()
    model.set_attention_checkpointing(profile.checkpointing)
    model.to(profile.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    private = make_private(
        model,
        torch.optim.SGD(trainable, lr=1.0),
        noise_multiplier=1.0,
        clip_norm=0.5,
        expected_batch_size=EXAMPLES * 0.5,
        noise_generator=torch.Generator().manual_seed(7),
        loss_scale=profile.loss_scale,
    )
    data = random_s1_batch(
        CONFIG, [5, 9, 3, 7, 4, 8, 6, 5, 9, 2, 7, 3], [11, 6, 14, 8, 9, 12, 5, 10, 7, 13, 6, 9], seed=1
    )

    def accumulate(chunk: torch.Tensor) -> dict[str, float]:
        dtype = profile.autocast_dtype
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            per_sample = s1_loss(private.module, data.select(chunk).to(profile.device)).per_sample
        (per_sample.sum() * profile.loss_scale).backward()
        return {"loss": float(per_sample.sum())}

    run_logical_step(indices, profile.physical_batch, accumulate, [private.optimizer])
    private.close()
    return [p.detach().clone() for p in trainable]


def test_two_profiles_give_the_same_update():
    roomy = select_profile(REFERENCE_DEVICES["x86-avx2"], "s1", "tiny", "lora", logical_batch=6)
    small = select_profile(
        REFERENCE_DEVICES["raspberry-pi5"],
        "s1",
        "tiny",
        "lora",
        ProfileOverrides(physical_batch=2, checkpointing=True),
        logical_batch=6,
    )
    assert roomy.precision == small.precision == "fp32" and not roomy.checkpointing
    indices = poisson_sample(EXAMPLES, 0.5, torch.Generator().manual_seed(3))
    assert small.physical_batch < len(indices) <= roomy.physical_batch  # one chunk vs several
    a, b = one_logical_step(roomy, indices), one_logical_step(small, indices)
    assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(a, b, strict=True))
    before = [p.detach() for p in build().parameters() if p.requires_grad]
    assert all(not torch.allclose(x, y) for x, y in zip(a, before, strict=True)), "the step must change every adapter"
