"""fedvox's linear and LayerNorm per-sample formulas against per-example autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.grad_sample.linear import compute_linear_grad_sample
from torch import nn

from fedvox.client.dp.samplers import dense, sampler_key


def per_example(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each sample's gradient of ``sum(layer(x_i) * dy_i)``, by autograd one sample at a time."""
    grads: dict[str, list[torch.Tensor]] = {name: [] for name, _ in layer.named_parameters()}
    for i in range(x.shape[0]):
        layer.zero_grad()
        (layer(x[i : i + 1]) * dy[i : i + 1]).sum().backward()
        for name, p in layer.named_parameters():
            grads[name].append(p.grad.clone())
    return {name: torch.stack(g) for name, g in grads.items()}


@pytest.mark.parametrize("shape", [(5, 6), (5, 7, 6), (5, 3, 4, 6)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_per_sample_gradients_are_exact(shape, bias) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 4, bias=bias).double()
    x = torch.randn(shape, dtype=torch.float64)
    dy = torch.randn(*shape[:-1], 4, dtype=torch.float64)
    got = dense.linear_grad_sample(layer, [x], dy)
    want = per_example(layer, x, dy)
    assert torch.allclose(got[layer.weight], want["weight"])
    if bias:
        assert torch.allclose(got[layer.bias], want["bias"])
    else:
        assert len(got) == 1


@pytest.mark.parametrize("normalized_shape", [(6,), (3, 6)])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_per_sample_gradients_are_exact(normalized_shape, bias) -> None:
    torch.manual_seed(0)
    layer = nn.LayerNorm(normalized_shape, eps=1e-3, bias=bias).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 5, *normalized_shape, dtype=torch.float64) * 3 + 1
    dy = torch.randn_like(x)
    got = dense.layer_norm_grad_sample(layer, [x], dy)
    want = per_example(layer, x, dy)
    assert torch.allclose(got[layer.weight], want["weight"])
    assert (layer.bias in got) == bias
    if bias:
        assert torch.allclose(got[layer.bias], want["bias"])


def test_linear_gradients_take_the_output_gradients_dtype() -> None:
    """Under bf16 autocast a layer after a LayerNorm gets float32 inputs and bf16 output gradients:
    the product runs in bf16, as autocast's own weight gradient and Opacus's formula do."""
    layer = nn.Linear(8, 4)
    x, dy = torch.randn(2, 3, 8), torch.randn(2, 3, 4)
    got = dense.linear_grad_sample(layer, [x], dy.bfloat16())
    assert got[layer.weight].dtype == torch.bfloat16
    want = dense.linear_grad_sample(layer, [x.bfloat16().float()], dy.bfloat16().float())[layer.weight]
    torch.testing.assert_close(got[layer.weight].float(), want, rtol=2e-2, atol=2e-2)


def test_layer_norm_gradients_stay_in_float32_under_bf16_inputs() -> None:
    layer = nn.LayerNorm(8)
    x, dy = torch.randn(2, 3, 8).bfloat16(), torch.randn(2, 3, 8).bfloat16()
    assert dense.layer_norm_grad_sample(layer, [x], dy)[layer.weight].dtype == torch.float32


def test_normalized_is_layer_norm_without_affine() -> None:
    x = torch.randn(3, 9, 16) * 5 - 2
    assert torch.allclose(dense.normalized(x, (-1,), 1e-5), F.layer_norm(x, (16,), eps=1e-5), atol=1e-5)


def test_stock_opacus_keeps_its_own_formulas() -> None:
    """Only fedvox's modules look the new keys up; ``GradSampleModule`` still finds Opacus's."""
    assert GradSampleModule.GRAD_SAMPLERS[nn.Linear] is compute_linear_grad_sample
    assert sampler_key(nn.Linear(2, 2)) is not nn.Linear
    assert sampler_key(nn.LayerNorm(2)) is not nn.LayerNorm
    assert GradSampleModule.GRAD_SAMPLERS[sampler_key(nn.Linear(2, 2))] is dense.linear_grad_sample
