"""The voice the speech-quality scoring and the sample speak with: plain models, the trained state folded in."""

from __future__ import annotations

import pytest
import torch

from fedvox.shared.models.factory import build_model
from fedvox.shared.models.lora import LoRAConv1d, LoRALinear
from fedvox.shared.models.subsets import load_trainable_state_dict, merged_state_dict, trainable_state_dict
from fedvox.shared.runconfig import RunConfig
from fedvox.simulations.sample import build_voice


@pytest.mark.parametrize("stage", ["s1", "s2"])
def test_a_voice_speaks_with_plain_models_holding_the_state_it_was_given_last(stage):
    config = RunConfig().with_overrides({"model-config": "tiny", "pretrained": "", "stage": stage})
    trained = build_model(stage, "tiny", config.subset_spec, seed=config.model_seed)
    generator = torch.Generator().manual_seed(0)
    states = [
        {k: torch.randn(v.shape, generator=generator) for k, v in trainable_state_dict(trained).items()}
        for _ in range(2)
    ]
    for state in states:
        voice = build_voice(config, state)
        load_trainable_state_dict(trained, state)
        merged = merged_state_dict(trained)
        if stage == "s2":  # the voice speaks with the pair's generator
            merged = {k.removeprefix("generator."): v for k, v in merged.items() if k.startswith("generator.")}
        spoken = getattr(voice, stage).state_dict()
        assert spoken.keys() == merged.keys()
        assert all(torch.equal(spoken[k], merged[k]) for k in merged)
        assert not any(isinstance(m, LoRALinear | LoRAConv1d) for s in (voice.s1, voice.s2) for m in s.modules())
