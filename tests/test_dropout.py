"""The CPU dropout: its rate, its scale, its gradient, its seed, and s1's attention path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedvox.shared.models.dropout import Dropout, dropout
from fedvox.shared.models.s1 import _attend, attention_bias

SCALE_0_1 = 65536 / (65536 - 6554)
"""1 / keep probability for p = 0.1 on the 2^-16 grid."""


def test_keep_rate_and_scale_match_the_drop_probability() -> None:
    torch.manual_seed(0)
    y = dropout(torch.ones(1000, 1000), 0.1)
    kept = y != 0
    # 10^6 Bernoulli(0.9) draws: standard deviation of the mean 3e-4
    assert abs(kept.float().mean().item() - 0.9) < 2e-3
    assert torch.all(y[kept] == torch.tensor(SCALE_0_1, dtype=torch.float32))
    # every 16-bit lane of the 64-bit words is uniform, not only the low ones
    lanes = kept.flatten().view(-1, 4).float().mean(0)
    assert torch.all((lanes - 0.9).abs() < 4e-3)


def test_dropout_keeps_scaled_values_drops_to_zero_and_is_unbiased() -> None:
    torch.manual_seed(1)
    x = torch.rand(400, 500) + 0.5
    y = dropout(x, 0.3)
    kept = y != 0
    scale = 65536 / (65536 - round(0.3 * 65536))
    torch.testing.assert_close(y[kept], x[kept] * scale, rtol=1e-7, atol=0)
    assert abs(kept.float().mean().item() - 0.7) < 5e-3
    assert abs(y.mean().item() / x.mean().item() - 1) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_flows_through_kept_elements_only(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    x = torch.randn(64, 64, dtype=dtype, requires_grad=True)
    y = dropout(x, 0.1)
    assert y.dtype == dtype
    y.backward(torch.full_like(y, 2.0))
    assert x.grad is not None
    expected = torch.where(y != 0, 2.0 * SCALE_0_1, 0.0).to(dtype)
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)


def test_seeded_masks_repeat_and_eval_mode_is_the_identity() -> None:
    x = torch.randn(32, 32)
    module = Dropout(0.2)
    torch.manual_seed(3)
    first = module(x)
    torch.manual_seed(3)
    assert torch.equal(module(x), first)
    assert not torch.equal(first, x)
    module.eval()
    assert module(x) is x
    assert dropout(x, 0.0) is x


def test_a_drop_probability_beyond_the_grid_falls_back_to_torch() -> None:
    """p within 2^-17 of 1 rounds to dropping every level: no scale exists, torch's dropout runs."""
    torch.manual_seed(5)
    assert torch.count_nonzero(dropout(torch.ones(1000), 1 - 1e-7)) == 0
    assert torch.count_nonzero(dropout(torch.ones(1000), 1.0)) == 0


def test_attention_math_path_equals_sdpa_when_nothing_is_dropped() -> None:
    """p below 2^-17 rounds to no drop: the CPU path must then be SDPA without dropout."""
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    mask = torch.rand(2, 1, 7, 7) > 0.3
    mask[..., 0] = True  # no empty row
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(_attend(q, k, v, mask, 1e-6), expected, rtol=1e-5, atol=1e-6)
    # the encoder hands its layers the mask as a bias, made once per pass
    torch.testing.assert_close(_attend(q, k, v, attention_bias(mask), 1e-6), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_attend(q, k, v, None, 1e-6), F.scaled_dot_product_attention(q, k, v))


def test_attention_bias_is_zero_where_attended_and_vanishes_under_softmax_elsewhere() -> None:
    mask = torch.tensor([[True, False, True], [False, True, False]])
    bias = attention_bias(mask)
    assert bias.dtype == torch.float32 and bool((bias[mask] == 0).all())
    probabilities = (torch.randn(2, 3) * 50 + bias).softmax(-1)
    assert bool((probabilities[~mask] == 0).all())
    scores = torch.randn(2, 3).bfloat16().add_(bias)  # as under autocast: in place, in bf16
    probabilities = scores.softmax(-1)
    assert not probabilities.isnan().any() and bool((probabilities[~mask] == 0).all())
