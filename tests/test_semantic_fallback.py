"""The offline fallback tokenizer: seeded, deterministic, 25 Hz, gain-invariant and informative."""

from __future__ import annotations

import torch

from fedvox.shared.semantic import FallbackTokenizer, tokenizer_spec
from fedvox.simulations.pseudo_speech import PseudoVoice, synthesize

SENTENCES = [
    ("The birch canoe slid on the smooth planks.", "en"),
    ("Glue the sheet to the dark blue background.", "en"),
    ("It is easy to tell the depth of a well.", "en"),
    ("今天天气很好，我们去公园散步吧。", "zh"),
]


def _speech(index: int, speaker: int = 0) -> torch.Tensor:
    text, language = SENTENCES[index % len(SENTENCES)]
    return torch.from_numpy(synthesize(text, language, PseudoVoice.from_seed(speaker), seed=index))


def test_every_instance_makes_the_same_codes_at_25_hz():
    wave = _speech(0)
    first, second = FallbackTokenizer(), FallbackTokenizer()
    codes = first.encode(wave)
    assert torch.equal(codes, second.encode(wave)) and first.name == second.name
    assert codes.shape == (wave.numel() // 1280,) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 1024
    assert tokenizer_spec().name == first.name and first.name.startswith("fallback-rpq-v1-")
    assert FallbackTokenizer(seed=1).name != first.name


def test_codes_ignore_gain_but_follow_content():
    tokenizer = FallbackTokenizer()
    wave = _speech(1)
    codes = tokenizer.encode(wave)
    assert torch.equal(tokenizer.encode(wave * 0.1), codes)
    other = tokenizer.encode(_speech(2))
    shortest = min(len(codes), len(other))
    assert (codes[:shortest] == other[:shortest]).float().mean() < 0.2


def test_codes_spread_over_the_codebook():
    tokenizer = FallbackTokenizer()
    codes = torch.cat([tokenizer.encode(_speech(i, speaker=i % 3)) for i in range(12)])
    counts = torch.bincount(codes, minlength=1024).float()
    p = counts[counts > 0] / counts.sum()
    perplexity = float(torch.exp(-(p * p.log()).sum()))
    assert perplexity > 100, f"codebook perplexity {perplexity:.0f} over {len(codes)} tokens"


def test_silence_and_very_short_input_do_not_break_it():
    tokenizer = FallbackTokenizer()
    assert tokenizer.encode(torch.zeros(32000)).shape == (25,)
    assert tokenizer.encode(torch.zeros(1000)).shape == (0,)
