"""Trainable subsets: what each kind trains, that applying one changes nothing, wire state."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from fedvox.shared.errors import CheckpointError, ConfigError
from fedvox.shared.models.config import s1_config
from fedvox.shared.models.s1 import Text2SemanticDecoder, s1_loss
from fedvox.shared.models.subsets import (
    SubsetSpec,
    apply_subset,
    load_trainable_state_dict,
    merged_state_dict,
    trainable_state_dict,
)
from tests.s1_batches import random_s1_batch

CONFIG = s1_config("tiny")
BATCH = random_s1_batch(CONFIG, [6, 3], [7, 4], seed=0)


def _model(seed: int = 0) -> Text2SemanticDecoder:
    torch.manual_seed(seed)
    return Text2SemanticDecoder(CONFIG)


def _trainable(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


class _WithFrozenQuantizer(nn.Module):
    """A model with a module fedvox never trains, like s2's VQ quantizer."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.quantizer = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def module_groups(self) -> dict[str, tuple[str, ...]]:
        return {"encoder": ("encoder",), "head": ("head",)}

    def lora_targets(self) -> tuple[str, ...]:
        return (r"encoder|quantizer",)

    def frozen_prefixes(self) -> tuple[str, ...]:
        return ("quantizer",)


def test_full_trains_everything_but_frozen_prefixes() -> None:
    assert len(_trainable(apply_subset(_model(), SubsetSpec("full")))) == len(list(_model().parameters()))
    model = apply_subset(_WithFrozenQuantizer(), SubsetSpec("full"))
    assert _trainable(model) == ["encoder.weight", "encoder.bias", "head.weight", "head.bias"]


def test_lora_trains_only_adapters_of_the_targets() -> None:
    model = apply_subset(_model(), SubsetSpec("lora", lora_rank=4, lora_alpha=8.0))
    names = _trainable(model)
    assert len(names) == CONFIG.layers * 6 * 2
    assert all(".lora_A." in n or ".lora_B." in n for n in names)
    assert "h.layers.1.self_attn.out_proj.lora_B.weight" in names
    assert "h.layers.0.linear2.lora_A.weight" in names
    frozen = apply_subset(_WithFrozenQuantizer(), SubsetSpec("lora", lora_rank=2, groups=("head",)))
    assert _trainable(frozen) == [
        "encoder.lora_A.weight",
        "encoder.lora_B.weight",
        "head.weight",
        "head.bias",
    ]
    assert isinstance(frozen.quantizer, nn.Linear)  # frozen prefixes never get adapters


def test_groups_train_exactly_their_modules() -> None:
    model = apply_subset(_model(), SubsetSpec("groups", groups=("norms", "head")))
    names = _trainable(model)
    assert names[-1] == "ar_predict_layer.weight"
    assert len(names) == CONFIG.layers * 4 + 1
    assert all(".norm" in n for n in names[:-1])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (SubsetSpec("groups", groups=("decoder",)), "unknown module group"),
        (SubsetSpec("lora", groups=("attention",)), "contain LoRA targets"),
        (SubsetSpec("lora", lora_groups=("decoder",)), "unknown module group"),
        (SubsetSpec("lora", lora_groups=("norms",)), "inside groups"),
    ],
)
def test_bad_subsets_are_refused(spec: SubsetSpec, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_subset(_model(), spec)


def test_spec_validation_and_protocol_check() -> None:
    with pytest.raises(ConfigError, match="unknown subset kind"):
        SubsetSpec("adapters")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="at least one group"):
        SubsetSpec("groups")
    with pytest.raises(ConfigError, match="only narrows a 'lora' subset"):
        SubsetSpec("full", lora_groups=("head",))
    with pytest.raises(ConfigError, match="module_groups"):
        apply_subset(nn.Linear(2, 2), SubsetSpec("full"))
    model = apply_subset(_model(), SubsetSpec("lora"))
    with pytest.raises(ConfigError, match="already"):
        apply_subset(model, SubsetSpec("lora"))


@pytest.mark.parametrize("spec", [SubsetSpec("lora"), SubsetSpec("groups", groups=("head",))])
def test_applying_a_subset_changes_no_output_in_train_or_eval_mode(spec: SubsetSpec) -> None:
    model = _model()
    outputs = []
    for candidate in (model, apply_subset(copy.deepcopy(model), spec)):
        for train in (True, False):
            candidate.train(train)
            torch.manual_seed(5)  # same dropout masks
            outputs.append(s1_loss(candidate, BATCH).per_sample.detach())
    torch.testing.assert_close(outputs[2], outputs[0])
    torch.testing.assert_close(outputs[3], outputs[1])
    assert not torch.equal(outputs[0], outputs[1])  # dropout really was active in train mode


def test_trainable_state_round_trips_between_models() -> None:
    spec = SubsetSpec("lora", lora_rank=2, groups=("norms",))
    sender, receiver = apply_subset(_model(0), spec), apply_subset(_model(0), spec)
    with torch.no_grad():
        for p in sender.parameters():
            if p.requires_grad:
                p.normal_()
    state = trainable_state_dict(sender)
    assert list(state) == _trainable(sender)
    load_trainable_state_dict(receiver, {k: v.half() for k, v in state.items()})  # fp16 wire
    received = trainable_state_dict(receiver)
    assert all(torch.equal(received[k], v.half().float()) for k, v in state.items())
    load_trainable_state_dict(receiver, state)
    sender.eval()
    receiver.eval()
    torch.testing.assert_close(s1_loss(receiver, BATCH).per_sample, s1_loss(sender, BATCH).per_sample)
    snapshot = {k: v.clone() for k, v in state.items()}
    with torch.no_grad():
        for p in sender.parameters():
            p.add_(1.0)
    assert all(torch.equal(state[k], snapshot[k]) for k in state)  # copies, not views of the model
    wrapped = GradSampleModule(sender)
    assert list(trainable_state_dict(wrapped)) == list(state)
    wrapped._close()


def test_loading_a_mismatched_state_fails_clearly() -> None:
    model = apply_subset(_model(), SubsetSpec("lora", lora_rank=2))
    state = trainable_state_dict(model)
    name = next(iter(state))
    with pytest.raises(CheckpointError, match="1 missing"):
        load_trainable_state_dict(model, {k: v for k, v in state.items() if k != name})
    with pytest.raises(CheckpointError, match="1 unexpected"):
        load_trainable_state_dict(model, {**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=rf"{name}: expected shape"):
        load_trainable_state_dict(model, {**state, name: torch.zeros(3, 3)})


def test_merged_state_loads_into_a_plain_model_with_the_same_outputs() -> None:
    plain = _model()
    adapted = apply_subset(copy.deepcopy(plain), SubsetSpec("lora", lora_rank=4))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.1)
    merged = merged_state_dict(adapted)
    assert list(merged) == list(plain.state_dict())
    plain.load_state_dict(merged, strict=True)
    plain.eval()
    adapted.eval()
    torch.testing.assert_close(
        s1_loss(plain, BATCH).per_sample, s1_loss(adapted, BATCH).per_sample, rtol=1e-5, atol=1e-4
    )
