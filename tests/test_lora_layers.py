"""LoRA wrappers: neutral at init, merge exactly (also weight-normed convs), train under DP-SGD."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from fedvox.shared.errors import ConfigError
from fedvox.shared.models.config import s1_config
from fedvox.shared.models.lora import LoRAConv1d, LoRALinear, merged_base_state, wrap_with_lora
from fedvox.shared.models.s1 import Text2SemanticDecoder, s1_loss
from fedvox.shared.models.subsets import SubsetSpec, apply_subset
from tests.per_sample import assert_per_sample_grads_match
from tests.s1_batches import random_s1_batch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _randomise_adapters(layer: LoRALinear | LoRAConv1d) -> None:
    with torch.no_grad():
        layer.lora_A.weight.normal_()
        layer.lora_B.weight.normal_(0.0, 0.5)


def _convs() -> list[nn.Conv1d]:
    torch.manual_seed(0)
    return [
        nn.Conv1d(6, 5, 5, stride=2, padding=3, dilation=2),
        nn.Conv1d(6, 5, 3, padding="same", padding_mode="reflect", bias=False),
        weight_norm(nn.Conv1d(6, 5, 3, padding=1)),
    ]


def test_linear_starts_neutral_and_merges_exactly() -> None:
    torch.manual_seed(0)
    base = nn.Linear(7, 4)
    x = torch.randn(3, 2, 7)
    before = base(x)
    layer = wrap_with_lora(base, rank=3, alpha=6.0)
    assert isinstance(layer, LoRALinear) and layer.scaling == 2.0
    torch.testing.assert_close(layer(x), before)
    _randomise_adapters(layer)
    merged = nn.Linear(7, 4)
    merged.load_state_dict(merged_base_state(layer))
    torch.testing.assert_close(merged(x), layer(x))
    assert not layer.base.weight.requires_grad and layer.lora_A.weight.requires_grad


@pytest.mark.parametrize("index", [0, 1, 2], ids=["strided-dilated", "same-reflect", "weight-normed"])
def test_conv1d_starts_neutral_and_merges_exactly(index: int) -> None:
    base = _convs()[index]
    fresh = _convs()[index]  # same geometry and parametrization, to load the merged state into
    x = torch.randn(2, 6, 17)
    before = base(x)
    layer = wrap_with_lora(base, rank=2, alpha=2.0)
    assert isinstance(layer, LoRAConv1d)
    torch.testing.assert_close(layer(x), before)
    _randomise_adapters(layer)
    fresh.load_state_dict(merged_base_state(layer), strict=True)
    torch.testing.assert_close(fresh(x), layer(x), rtol=1e-5, atol=1e-5)


def test_unsupported_layers_are_refused() -> None:
    with pytest.raises(ConfigError, match="grouped Conv1d"):
        wrap_with_lora(nn.Conv1d(4, 4, 3, groups=2), rank=2, alpha=2.0)
    with pytest.raises(ConfigError, match=r"nn\.Linear and nn\.Conv1d"):
        wrap_with_lora(nn.Embedding(5, 3), rank=2, alpha=2.0)
    with pytest.raises(ConfigError, match="rank"):
        wrap_with_lora(nn.Linear(3, 3), rank=0, alpha=2.0)


@dataclass
class _Batch:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def select(self, index: torch.Tensor) -> _Batch:
        return _Batch(self.x[index], self.y[index])


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = wrap_with_lora(weight_norm(nn.Conv1d(3, 8, 5, padding=4, dilation=2)), rank=2, alpha=4.0)
        self.proj = wrap_with_lora(nn.Linear(8, 2), rank=2, alpha=4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.conv(x)).transpose(1, 2))


def test_conv_and_linear_adapters_have_exact_per_sample_grads() -> None:
    torch.manual_seed(0)
    model = _ConvNet()
    for layer in (model.conv, model.proj):
        _randomise_adapters(layer)
    model.double()
    batch = _Batch(torch.randn(4, 3, 11, dtype=torch.float64), torch.randn(4, 11, 2, dtype=torch.float64))

    def loss(m: nn.Module, b: _Batch) -> torch.Tensor:
        return (m(b.x) - b.y).pow(2).sum(dim=(1, 2))

    assert assert_per_sample_grads_match(model, loss, batch, rtol=1e-5) == 4


@pytest.mark.parametrize("noise_multiplier", [0.0, 1.0])
def test_adapters_change_after_one_dp_step_even_when_moved_after_wrapping(
    noise_multiplier: float,
) -> None:
    torch.manual_seed(0)
    model = apply_subset(Text2SemanticDecoder(s1_config("tiny")), SubsetSpec("lora", lora_rank=4))
    model = model.to(torch.float64)  # moved after the adapters exist (opacus#820 pattern)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    optimizer = DPOptimizer(
        torch.optim.SGD(trainable, lr=0.1),
        noise_multiplier=noise_multiplier,
        max_grad_norm=1.0,
        expected_batch_size=3,
        loss_reduction="sum",
    )
    batch = random_s1_batch(s1_config("tiny"), [5, 3, 4], [6, 2, 5], seed=3, dtype=torch.float64)
    optimizer.zero_grad()
    s1_loss(gsm, batch).per_sample.sum().backward()
    optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        if "lora_B" in name:
            assert changed, f"{name} did not move"
        elif "lora_A" in name:  # zero B gives A no gradient: only noise moves it on step one
            assert changed == (noise_multiplier > 0), name
        else:
            assert not changed, f"frozen {name} moved"
