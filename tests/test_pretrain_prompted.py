"""Prompted pairs: s1 pretraining sequences shaped as inference prompts the model (a reference
utterance of the same speaker, then the target), and a run that adds them when it resumes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedvox.client.data.datasets import S1Dataset
from fedvox.shared.errors import ConfigError
from fedvox.simulations.pretrain.prompted import PromptedPairs
from fedvox.simulations.pretrain.train import StagePlan, read_state, train_stage
from tests.prepared import prepared_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return prepared_cache(tmp_path_factory.mktemp("prompted"), repeat=1)


def test_each_utterance_is_also_prompted_by_another_of_its_own_speaker(cache):
    singles = S1Dataset(cache)
    n = len(singles)
    pairs = PromptedPairs(singles, variants=2, seed=0)
    assert len(pairs) == 3 * n
    for i in range(n):
        alone = singles[i]
        assert pairs.partner(i) is None and torch.equal(pairs[i].semantic_ids, alone.semantic_ids)
        for k in (1, 2):
            partner = pairs.partner(k * n + i)
            assert partner != i and singles.items[partner].speaker == singles.items[i].speaker
            paired, prompt = pairs[k * n + i], singles[partner]
            assert torch.equal(paired.phoneme_ids, torch.cat([prompt.phoneme_ids, alone.phoneme_ids]))
            assert torch.equal(paired.semantic_ids, torch.cat([prompt.semantic_ids, alone.semantic_ids]))
    assert [pairs.partner(j) for j in range(len(pairs))] == [
        PromptedPairs(singles, 2, seed=0).partner(j) for j in range(len(pairs))
    ]
    lonely = S1Dataset(cache, [item for item in singles.items if item.speaker != "spkC"] + [singles.items[-1]])
    last = len(lonely) - 1  # the only utterance of its speaker: no partner, the utterance alone
    assert PromptedPairs(lonely, 1, seed=0).partner(len(lonely) + last) is None


def _unbeatable_best(folder: Path) -> None:
    """Mark the saved best as lower than any loss: only a reset lets a later step replace it."""
    saved = torch.load(folder / "state.pt", weights_only=False)
    saved["best"] = {"step": saved["step"], "valid_loss": -1.0}
    torch.save(saved, folder / "state.pt")


def test_a_resumed_s1_run_may_add_prompted_pairs_and_then_validates_on_them(cache, tmp_path):
    common = {"model_config": "tiny", "batch_size": 2, "eval_every": 1, "eval_utterances": 2}
    train_stage(StagePlan("s1", steps=1, **common), cache, cache, tmp_path, torch.device("cpu"))
    _unbeatable_best(tmp_path)
    paired = StagePlan("s1", steps=2, prompt_pairs=1, **common)
    resumed = train_stage(paired, cache, cache, tmp_path, torch.device("cpu"))
    # validation changed (each utterance after a partner): the best so far starts over at step 2
    assert resumed.best == {"step": 2, "valid_loss": resumed.history[1]["valid"]["loss"]}
    plan, _ = read_state(tmp_path)
    assert plan.prompt_pairs == 1
    _unbeatable_best(tmp_path)  # same validation when resumed with the same pairs: the best stands
    again = train_stage(replace(paired, steps=3), cache, cache, tmp_path, torch.device("cpu"))
    assert again.best == {"step": 2, "valid_loss": -1.0}
    with pytest.raises(ConfigError, match="s1 only"):
        train_stage(
            StagePlan("s2", steps=1, prompt_pairs=1, **common), cache, cache, tmp_path / "s2", torch.device("cpu")
        )
