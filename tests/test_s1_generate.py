"""s1 inference: KV-cache decoding agrees with the training forward, stops, and is reproducible."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from fedvox.shared.errors import DataError
from fedvox.shared.models.config import EOS, s1_config
from fedvox.shared.models.s1 import Text2SemanticDecoder, generate

CONFIG = s1_config("tiny")


@pytest.fixture()
def model() -> Text2SemanticDecoder:
    torch.manual_seed(0)
    return Text2SemanticDecoder(CONFIG)


def _inputs(seed: int = 0, phonemes: int = 12, prompt: int = 9) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(1, CONFIG.phoneme_vocab_size, (phonemes,), generator=g),
        torch.randn(phonemes, CONFIG.bert_dim, generator=g),
        torch.randint(0, EOS, (prompt,), generator=g),
    )


def _always_eos(model: Text2SemanticDecoder) -> None:
    """Make every position's hidden state constant and EOS its clear favourite."""
    with torch.no_grad():
        last = model.h.layers[-1].norm2
        last.weight.zero_()
        last.bias.fill_(1.0)
        model.ar_predict_layer.weight.zero_()
        model.ar_predict_layer.weight[EOS] = 1.0


def test_greedy_decoding_with_kv_cache_matches_full_forward(model: Text2SemanticDecoder) -> None:
    phonemes, bert, prompt = _inputs()
    tokens = generate(
        model,
        phonemes,
        bert,
        prompt,
        max_new_tokens=15,
        top_k=1,
        repetition_penalty=1.0,
        min_new_tokens=15,
    )
    assert tokens.shape == (15,)
    sequence = torch.cat([prompt, tokens]).unsqueeze(0)
    with torch.no_grad():
        logits = model.eval()(
            phonemes.unsqueeze(0),
            torch.tensor([phonemes.numel()]),
            bert.unsqueeze(0),
            sequence,
            torch.tensor([sequence.shape[1]]),
        )
    # row t predicts semantic token t; the new tokens start at row len(prompt)
    predicted = logits[0, prompt.numel() : -1, :EOS].argmax(-1)
    assert torch.equal(predicted, tokens)


def test_stops_at_eos_once_allowed(model: Text2SemanticDecoder) -> None:
    _always_eos(model)
    phonemes, bert, prompt = _inputs()
    assert generate(model, phonemes, bert, prompt, min_new_tokens=0).numel() == 0
    tokens = generate(model, phonemes, bert, prompt, min_new_tokens=3, generator=torch.Generator().manual_seed(0))
    assert tokens.numel() == 3 and (tokens < EOS).all()


def test_respects_max_new_tokens(model: Text2SemanticDecoder, caplog: pytest.LogCaptureFixture) -> None:
    phonemes, bert, prompt = _inputs()
    with caplog.at_level(logging.WARNING, logger="fedvox.shared.models.s1"):
        tokens = generate(model, phonemes, bert, prompt, max_new_tokens=7, min_new_tokens=7)
    assert tokens.numel() == 7
    assert "without EOS" in caplog.text


def test_same_seed_same_tokens(model: Text2SemanticDecoder) -> None:
    phonemes, bert, prompt = _inputs()

    def run(seed: int) -> torch.Tensor:
        return generate(
            model,
            phonemes,
            bert,
            prompt,
            max_new_tokens=30,
            min_new_tokens=30,
            top_k=50,
            top_p=0.9,
            temperature=1.2,
            generator=torch.Generator().manual_seed(seed),
        )

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_reference_free_and_restores_training_mode(model: Text2SemanticDecoder) -> None:
    phonemes, _, _ = _inputs()
    model.train()
    tokens = generate(model, phonemes, None, torch.empty(0, dtype=torch.long), max_new_tokens=5, min_new_tokens=5)
    assert tokens.numel() == 5
    assert model.training


def test_rejects_empty_text(model: Text2SemanticDecoder) -> None:
    with pytest.raises(DataError, match="non-empty"):
        generate(model, torch.empty(0, dtype=torch.long), None, torch.empty(0, dtype=torch.long))


def test_generates_under_bf16_autocast(model: Text2SemanticDecoder) -> None:
    phonemes, bert, prompt = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = generate(model, phonemes, bert, prompt, max_new_tokens=6, min_new_tokens=6)
    assert tokens.numel() == 6 and ((tokens >= 0) & (tokens < EOS)).all()


def _fixed_logits(model: Text2SemanticDecoder, logits: torch.Tensor) -> None:
    """Make the model emit ``logits`` ``[V]`` at every step (constant hidden state of ones)."""
    with torch.no_grad():
        last = model.h.layers[-1].norm2
        last.weight.zero_()
        last.bias.fill_(1.0)
        model.ar_predict_layer.weight.zero_()
        model.ar_predict_layer.weight[:, 0] = logits


def test_stop_rule_tests_the_penalised_logits_as_upstream(model: Text2SemanticDecoder) -> None:
    """Token 7 (already in the prompt) leads before the penalty, EOS after it: upstream stops.

    100 other tokens sit just below EOS, so top-k draws EOS itself rarely; the seed below draws one
    of them, so only the EOS test on the penalised logits can stop this decode at its first step.
    """
    logits = torch.full((EOS + 1,), -10.0)
    logits[7], logits[EOS], logits[100:200] = 10.0, 9.0, 8.999
    _fixed_logits(model, logits)
    phonemes, bert, _ = _inputs()
    prompt = torch.tensor([7, 7, 3])
    top_k, seed = 101, 0
    penalised = logits.clone()
    penalised[7] /= 1.35
    first = torch.multinomial(
        (penalised.masked_fill(penalised < penalised.topk(top_k).values[-1], -math.inf)).softmax(-1),
        1,
        generator=torch.Generator().manual_seed(seed),
    )
    assert int(logits.argmax()) == 7 and int(penalised.argmax()) == EOS and int(first) != EOS
    tokens = generate(
        model, phonemes, bert, prompt, top_k=top_k, min_new_tokens=0, generator=torch.Generator().manual_seed(seed)
    )
    assert tokens.numel() == 0
    # without a penalty the leader is not EOS and the decode runs on
    unpenalised = generate(
        model,
        phonemes,
        bert,
        prompt,
        top_k=top_k,
        repetition_penalty=1.0,
        min_new_tokens=0,
        max_new_tokens=4,
        generator=torch.Generator().manual_seed(seed),
    )
    assert unpenalised.numel() == 4
