"""Black-box canaries for s1: random semantic-token sequences for fixed texts.

Each canary is an ordinary s1 training example (phonemes of a fixed sentence, then semantic
tokens drawn uniformly from the 1024 codes) that joins the training set when it is IN. Random
tokens are far out of distribution, so only having trained on a canary explains a low loss on
it. The score is the loss drop from the initial to the final model (a difference attack, which
cancels how hard each sequence is for the untrained model); only those two models are looked
at, never the iterates, which is why black-box bounds sit far below the accountant's epsilon.
"""

from __future__ import annotations

import torch

from fedvox.client.data.datasets import S1Example, collate_s1
from fedvox.client.dp.task import autocast
from fedvox.shared.models.config import SEMANTIC_CODES
from fedvox.shared.models.s1 import s1_loss
from fedvox.shared.text import phonemize

CANARY_TEXTS = (
    "A yellow kite drifted over the quiet harbour.",
    "Seven green apples rolled under the kitchen table.",
    "The old clock in the hall stopped at noon.",
    "Please bring the blue umbrella when you leave.",
    "Small boats waited for the morning tide.",
    "Her brother painted the fence on Sunday.",
    "We counted the stars until the fire went out.",
    "A cold wind carried the smell of rain.",
)
"""Fixed English sentences (written for fedvox); canary ``i`` speaks sentence ``i mod 8``."""

TOKENS_PER_PHONEME = 2
"""About 12.5 phonemes per second at 25 Hz: an ordinary speaking rate."""


class BlackBoxCanaries:
    """``len(member)`` canary examples; ``member[i]`` says whether canary ``i`` is IN."""

    def __init__(self, examples: list[S1Example], member: torch.Tensor) -> None:
        self.examples = examples
        self.member = member.bool()

    @classmethod
    def draw(cls, member: torch.Tensor, symbols_version: str, generator: torch.Generator) -> BlackBoxCanaries:
        """One canary per entry of ``member``, tokens from ``generator``."""
        texts = [torch.tensor(phonemize(t, "en", symbols_version).ids, dtype=torch.long) for t in CANARY_TEXTS]
        examples = []
        for i in range(len(member)):
            phonemes = texts[i % len(texts)]
            tokens = torch.randint(0, SEMANTIC_CODES, (TOKENS_PER_PHONEME * len(phonemes),), generator=generator)
            examples.append(S1Example(phonemes, tokens))
        return cls(examples, member)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def included_examples(self) -> list[S1Example]:
        return [e for e, m in zip(self.examples, self.member, strict=True) if m]

    def phoneme_ids(self) -> set[int]:
        return {int(i) for e in self.examples for i in e.phoneme_ids}

    @torch.no_grad()
    def losses(
        self, model: torch.nn.Module, device: torch.device, precision: str, batch_size: int = 32
    ) -> torch.Tensor:
        """Each canary's summed cross-entropy (its tokens and EOS) under ``model`` in eval mode."""
        was_training = model.training
        model.eval()
        try:
            out = []
            for start in range(0, len(self.examples), batch_size):
                batch = collate_s1(self.examples[start : start + batch_size]).to(device)
                with autocast(device, precision):
                    out.append(s1_loss(model, batch).per_sample.double().cpu())
        finally:
            model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
