"""A kept base model (client.warm) trains exactly as a freshly built one."""

from __future__ import annotations

import pytest
import torch

from fedvox.client import warm
from fedvox.client.data.datasets import S1Dataset
from fedvox.client.dp.trainer import PrivacyPlan, RoundPlan, Trainer
from fedvox.client.stages.s1 import S1Task
from fedvox.shared.models.factory import build_model
from fedvox.shared.models.subsets import SubsetSpec, load_trainable_state_dict, trainable_state_dict
from fedvox.shared.privacy.ledger import Ledger
from tests.prepared import prepared_cache

SPEC = SubsetSpec(kind="lora", lora_rank=4)
PLAN = RoundPlan(steps=2, logical_batch=6, learning_rate=1e-2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return prepared_cache(tmp_path_factory.mktemp("warm"))


@pytest.fixture(autouse=True)
def nothing_kept():
    warm.forget()
    yield
    warm.forget()


def _release(model, cache, ledger_dir) -> dict[str, torch.Tensor]:
    trainer = Trainer(
        S1Task(model, S1Dataset(cache), torch.device("cpu")),
        Ledger(ledger_dir),
        "client-a",
        PrivacyPlan(noise_multiplier=1.0, budget_epsilon=50.0),
        physical_batch=4,
        noise_seed=3,
        sample_seed=3,
    )
    try:
        return trainer.train(PLAN, run_id="run", round=1).state
    finally:
        trainer.close()
        trainer.ledger.close()


def test_a_kept_model_is_handed_out_as_built(cache, tmp_path):
    model = warm.base_model("s1", "tiny", SPEC, seed=0, pretrained=None)
    built = {k: v.clone() for k, v in model.state_dict().items()}
    _release(model, cache, tmp_path / "first")  # gradients, per-sample attributes, train mode
    load_trainable_state_dict(model, {k: v + 1.0 for k, v in trainable_state_dict(model).items()})
    again = warm.base_model("s1", "tiny", SPEC, seed=0, pretrained=None)
    assert again is model
    assert all(torch.equal(v, built[k]) for k, v in again.state_dict().items())
    assert all(p.grad is None and not hasattr(p, "grad_sample") for p in again.parameters())
    assert warm.base_model("s1", "tiny", SPEC, seed=1, pretrained=None) is not model  # another seed: another model


def test_a_release_on_a_kept_model_equals_one_on_a_fresh_model(cache, tmp_path):
    used = warm.base_model("s1", "tiny", SPEC, seed=0, pretrained=None)
    _release(used, cache, tmp_path / "earlier")  # another message ran on it before
    kept = _release(warm.base_model("s1", "tiny", SPEC, seed=0, pretrained=None), cache, tmp_path / "kept")
    fresh = _release(build_model("s1", "tiny", SPEC, seed=0), cache, tmp_path / "fresh")
    assert kept.keys() == fresh.keys()
    assert all(torch.equal(kept[k], fresh[k]) for k in fresh)
