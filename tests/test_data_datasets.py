"""Datasets over the cache and their collate functions: the S1Batch / S2Batch contract, no duplicates."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from fedvox.client.data.cache import CachedItem, FeatureCache
from fedvox.client.data.datasets import S1Dataset, S2Dataset, collate_s1, collate_s2
from fedvox.client.data.prepare import prepare
from fedvox.client.data.split import holdout_split
from fedvox.client.dp.engine import poisson_sample
from fedvox.shared.audio import linear_spectrogram
from fedvox.shared.errors import ConfigError, DataError
from fedvox.shared.models.batches import S1Batch, S2Batch
from fedvox.shared.models.config import EOS, s1_config, s2_config
from fedvox.shared.models.s1 import Text2SemanticDecoder, s1_loss
from fedvox.shared.models.s2 import SynthesizerTrn
from fedvox.shared.semantic import tokenizer_spec
from tests.data_fixtures import write_good_set


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> FeatureCache:
    root = tmp_path_factory.mktemp("cache")
    list_file = write_good_set(root / "data", source="pseudo", repeat=2)
    prepare(list_file, root / "out", tokenizer=tokenizer_spec(), symbols_version="v2", workers=1, show_progress=False)
    return FeatureCache(root / "out")


def test_each_prepared_utterance_appears_exactly_once(cache):
    index = cache.read_index()
    s1, s2 = S1Dataset(cache), S2Dataset(cache.root)
    assert len(index.items) == 12 and len(s2) == 12 and len(s1) == 12
    assert len({item.id for item in s2.items}) == 12
    assert s1.tokenizer == s2.tokenizer == index.settings.tokenizer
    with pytest.raises(DataError, match="not in the feature cache"):
        S1Dataset(cache, [CachedItem("f" * 32, "x.wav", 1, "s", "en", 1.0, 25, 10)])
    with pytest.raises(DataError, match="run `fedvox-client prepare"):
        S1Dataset(cache.root / "nothing-here")


def test_s1_drops_what_gpt_sovits_s1_drops(cache):
    item = cache.read_index().items[0]
    seconds = item.semantic_tokens / 25
    odd = [
        replace(item, phonemes=int(30 * seconds)),
        replace(item, phonemes=int(2 * seconds)),
        replace(item, semantic_tokens=55 * 25, phonemes=200),
        item,
    ]
    assert S1Dataset(cache, odd).items == (item,)


def test_s1_batches_left_pad_phonemes_and_end_semantics_with_eos(cache):
    dataset = S1Dataset(cache)
    examples = [dataset[i] for i in range(4)]
    batch = collate_s1(examples)
    assert isinstance(batch, S1Batch)
    width = max(len(e.phoneme_ids) for e in examples)
    assert batch.phoneme_ids.shape == (4, width) and batch.bert_features.shape == (4, width, 1024)
    assert not batch.bert_features.any()
    for row, example in enumerate(examples):
        n, t = len(example.phoneme_ids), len(example.semantic_ids)
        assert batch.phoneme_lengths[row] == n and batch.semantic_lengths[row] == t
        assert torch.equal(batch.phoneme_ids[row, width - n :], example.phoneme_ids)
        assert not batch.phoneme_ids[row, : width - n].any()
        assert torch.equal(batch.semantic_ids[row, :t], example.semantic_ids)
        assert (batch.semantic_ids[row, t:] == EOS).all()
    losses = s1_loss(Text2SemanticDecoder(s1_config("tiny")), batch).per_sample
    assert losses.shape == (4,) and torch.isfinite(losses).all()


def test_s2_batches_carry_two_spectrogram_frames_per_token(cache):
    dataset = S2Dataset(cache)
    examples = [dataset[i] for i in (0, 5, 7)]
    for example in examples:
        tokens = len(example.semantic_ids)
        assert example.spec.shape == (1025, 2 * tokens) and example.wave.shape == (1, 1280 * tokens)
        torch.testing.assert_close(example.spec, linear_spectrogram(example.wave[0]))
    batch = collate_s2(examples)
    assert isinstance(batch, S2Batch) and batch.sv_embedding is None
    assert torch.equal(batch.spec_lengths, 2 * batch.semantic_lengths)
    assert torch.equal(batch.wave_lengths, 640 * batch.spec_lengths)
    assert (
        batch.spec.shape[-1] == 2 * batch.semantic_ids.shape[-1] and batch.wave.shape[-1] == 640 * batch.spec.shape[-1]
    )
    for row, example in enumerate(examples):
        t, x = len(example.semantic_ids), len(example.phoneme_ids)
        assert torch.equal(batch.semantic_ids[row, :t], example.semantic_ids) and not batch.semantic_ids[row, t:].any()
        assert torch.equal(batch.spec[row, :, : 2 * t], example.spec) and not batch.spec[row, :, 2 * t :].any()
        assert torch.equal(batch.wave[row, :, : 1280 * t], example.wave) and not batch.wave[row, :, 1280 * t :].any()
        assert torch.equal(batch.phoneme_ids[row, :x], example.phoneme_ids) and not batch.phoneme_ids[row, x:].any()
    out = SynthesizerTrn(s2_config("tiny"))(batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.wave_hat).all()


def test_poisson_batches_index_the_datasets_directly(cache):
    dataset = S2Dataset(cache)
    drawn = poisson_sample(len(dataset), 0.5, torch.Generator().manual_seed(3))
    batch = collate_s2([dataset[int(i)] for i in drawn])
    assert len(batch) == len(drawn) > 0


def test_holdout_split_is_disjoint_deterministic_and_order_free(cache):
    items = list(cache.read_index().items)
    train, val = holdout_split(items, fraction=0.25)
    assert len(val) == 3 and len(train) == 9
    assert {i.id for i in train}.isdisjoint({i.id for i in val})
    assert {i.id for i in train} | {i.id for i in val} == {i.id for i in items}
    assert [i.line for i in train] == sorted(i.line for i in train)
    shuffled = items[:]
    random.Random(1).shuffle(shuffled)
    assert {i.id for i in holdout_split(shuffled, fraction=0.25)[1]} == {i.id for i in val}
    assert {i.id for i in holdout_split(items, fraction=0.25, seed=1)[1]} != {i.id for i in val}
    assert len(holdout_split(items[:2], fraction=0.01)[1]) == 1
    assert holdout_split(items[:1], fraction=0.5) == (items[:1], [])
    assert holdout_split(items, fraction=0.0) == (items, [])
    with pytest.raises(ConfigError):
        holdout_split(items, fraction=1.0)
    train_set, val_set = S2Dataset(cache, train), S2Dataset(cache, val)
    assert len(train_set) + len(val_set) == len(items)
