"""The CPU dropout's mask: its rate, its scale, its gradient, its seed, and s1's attention path."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedvox.shared.models.dropout import Dropout, dropout, keep_mask
from fedvox.shared.models.s1 import _attend


def test_keep_rate_and_scale_match_the_drop_probability() -> None:
    torch.manual_seed(0)
    keep, scale = keep_mask(torch.Size([1000, 1000]), 0.1, torch.device("cpu"))
    # 10^6 Bernoulli(0.9) draws: standard deviation of the mean 3e-4
    assert abs(keep.float().mean().item() - 0.9) < 2e-3
    assert scale == 65536 / (65536 - 6554)
    # every 16-bit lane of the 64-bit words is uniform, not only the low ones
    lanes = keep.flatten()[: 4 * (keep.numel() // 4)].view(-1, 4).float().mean(0)
    assert torch.all((lanes - 0.9).abs() < 4e-3)


def test_dropout_keeps_scaled_values_drops_to_zero_and_is_unbiased() -> None:
    torch.manual_seed(1)
    x = torch.rand(400, 500) + 0.5
    y = dropout(x, 0.3)
    kept = y != 0
    _, scale = keep_mask(torch.Size([1]), 0.3, x.device)
    torch.testing.assert_close(y[kept], x[kept] * scale, rtol=0, atol=0)
    assert abs(kept.float().mean().item() - 0.7) < 5e-3
    assert abs(y.mean().item() / x.mean().item() - 1) < 1e-2


def test_gradient_flows_through_kept_elements_only() -> None:
    torch.manual_seed(2)
    x = torch.randn(64, 64, requires_grad=True)
    y = dropout(x, 0.5)
    y.sum().backward()
    assert x.grad is not None
    _, scale = keep_mask(torch.Size([1]), 0.5, x.device)
    expected = torch.where(y != 0, torch.tensor(scale), torch.tensor(0.0))
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


def test_attention_math_path_equals_sdpa_when_nothing_is_dropped() -> None:
    """p below 2^-17 rounds to no drop: the CPU path must then be SDPA without dropout."""
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    mask = torch.rand(2, 1, 7, 7) > 0.3
    mask[..., 0] = True  # no empty row
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(_attend(q, k, v, mask, 1e-6), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_attend(q, k, v, None, 1e-6), F.scaled_dot_product_attention(q, k, v))
