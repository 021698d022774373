"""s2 fine-tuning reaches the voice: a few LoRA steps move the held-out mel loss.

The validation mel loss decodes the posterior latent (``enc_q`` -> ``dec``) in the voice of the
utterance's own ``ref_enc`` embedding, so a subset without the decoder and the speaker
conditioning leaves it exactly unchanged (a device owner saw the same figure at 5 checkpoints).
"""

from __future__ import annotations

import pytest
import torch

from fedvox.client.data.datasets import S2Dataset
from fedvox.client.stages.s2 import S2Task
from fedvox.shared.models.factory import build_model
from fedvox.shared.models.subsets import SubsetSpec, trainable_state_dict
from fedvox.simulations.pretrain.train import StagePlan, _step, evaluate
from tests.prepared import prepared_cache


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> S2Dataset:
    return S2Dataset(prepared_cache(tmp_path_factory.mktemp("s2ft"), repeat=1))


def test_lora_reaches_the_decoder_and_the_speaker_conditioning():
    pair = build_model("s2", "tiny", SubsetSpec(kind="lora"))
    trained = {name.split(".")[0] for name in trainable_state_dict(pair.generator)}
    assert {"dec", "enc_p", "flow"} <= trained
    assert any(name.startswith("dec.cond") for name in trainable_state_dict(pair.generator))


def test_decoder_lora_adapts_only_the_decoder_and_no_adversary_freezes_the_discriminator():
    pair = build_model("s2", "tiny", SubsetSpec(kind="lora", lora_groups=("decoder",), adversary=False))
    trained = trainable_state_dict(pair.generator)
    assert trained and all(name.startswith("dec.") for name in trained)
    assert any(name.startswith("dec.cond") for name in trained)
    assert not trainable_state_dict(pair.discriminator)
    every = trainable_state_dict(build_model("s2", "tiny", SubsetSpec(kind="lora")).generator)
    assert set(trained) == {name for name in every if name.startswith("dec.")}


def test_a_few_lora_steps_change_the_validation_mel_loss(dataset: S2Dataset):
    pair = build_model("s2", "tiny", SubsetSpec(kind="lora"), seed=3)
    task = S2Task(pair, dataset, torch.device("cpu"))
    plan = StagePlan("s2", model_config="tiny", steps=3, batch_size=2, learning_rate=1e-2, warmup=1, disc_start=3)
    optimizers = {name: task.optimizer(name, module, plan.learning_rate) for name, module in task.parts().items()}
    indices = torch.arange(len(dataset))
    before = evaluate(task, dataset, indices)["mel"]
    for step in range(plan.steps):
        _step(task, optimizers, plan, step, len(dataset))
    after = evaluate(task, dataset, indices)["mel"]
    assert after != before
