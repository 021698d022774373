"""s1 examples as inference uses the model: a reference utterance of the speaker, then the target.

GPT-SoVITS prompts s1 with the reference's phonemes followed by the target's, and the reference's
semantic codes: the model continues the codes through the target's phonemes. A base trained only
on single utterances has never seen a sequence that long nor a second sentence after a first, and
ended its continuation early: on the default simulation's clients its prompted output had a
median of 19 % of the sentence's tokens (71 % unprompted), so most of each sentence was never
said. :class:`PromptedPairs` adds those sequences to pretraining: two utterances of one speaker,
concatenated in phonemes, BERT features and codes, the loss on both (the first stands for the
prompt; its codes are those the reference's own encoding gives).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torch.utils.data import Dataset

from fedvox.client.data.datasets import S1Dataset, S1Example
from fedvox.shared.bert import BERT_DIM


class PromptedPairs(Dataset):
    """``dataset``'s utterances alone (indices ``0..n-1``) and, ``variants`` times over, each
    prompted by another utterance of its speaker (index ``k*n + j``, ``k >= 1``: utterance ``j``
    after a partner drawn by ``(seed, j, k)``). A speaker with one utterance has no partner: its
    "pair" is the utterance alone."""

    def __init__(self, dataset: S1Dataset, variants: int, seed: int) -> None:
        self.dataset = dataset
        self.variants = variants
        self.seed = seed
        self._by_speaker: dict[str, list[int]] = defaultdict(list)
        for i, item in enumerate(dataset.items):
            self._by_speaker[item.speaker].append(i)

    def __len__(self) -> int:
        return len(self.dataset) * (1 + self.variants)

    def partner(self, index: int) -> int | None:
        """The prompting utterance of ``index`` (None for a single utterance)."""
        variant, j = divmod(index, len(self.dataset))
        others = [i for i in self._by_speaker[self.dataset.items[j].speaker] if i != j]
        if variant == 0 or not others:
            return None
        return others[int(np.random.default_rng([self.seed, j, variant]).integers(len(others)))]

    def __getitem__(self, index: int) -> S1Example:
        target = self.dataset[index % len(self.dataset)]
        partner = self.partner(index)
        if partner is None:
            return target
        prompt = self.dataset[partner]
        bert = None
        if prompt.bert_features is not None or target.bert_features is not None:
            bert = torch.cat([_bert(prompt), _bert(target)])
        return S1Example(
            torch.cat([prompt.phoneme_ids, target.phoneme_ids]),
            torch.cat([prompt.semantic_ids, target.semantic_ids]),
            bert,
        )


def _bert(example: S1Example) -> torch.Tensor:
    if example.bert_features is not None:
        return example.bert_features
    return torch.zeros(len(example.phoneme_ids), BERT_DIM)


__all__ = ["PromptedPairs"]
