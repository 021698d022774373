"""Synthesis feeds what GPT-SoVITS's inference feeds: zh BERT features for zh text (zeros otherwise)
and, for a v2Pro-style s2, the reference's speaker embedding."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedvox.client import synthesize as synthesis
from fedvox.client.synthesize import Voice, synthesize
from fedvox.shared.bert import bert_spec
from fedvox.shared.errors import ConfigError
from fedvox.shared.models.config import s1_config, s2_config
from fedvox.shared.models.s1 import Text2SemanticDecoder
from fedvox.shared.models.s2 import SynthesizerTrn
from fedvox.shared.semantic import FallbackTokenizer
from fedvox.shared.speaker import SV_DIM, sv_spec
from fedvox.shared.text import phonemize
from tests.extractor_fixtures import write_roberta, write_sv_checkpoint


@pytest.fixture(scope="module")
def pro_voice() -> Voice:
    torch.manual_seed(0)
    s2 = SynthesizerTrn(replace(s2_config("tiny"), name="tiny-pro", version="v2Pro", sv_dim=SV_DIM))
    return Voice(Text2SemanticDecoder(s1_config("tiny")).eval(), s2.eval())


def test_pro_s2_speaks_from_the_references_embedding(pro_voice: Voice, tmp_path: Path, monkeypatch) -> None:
    reference = 0.1 * torch.randn(32000, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ConfigError, match="--sv"):
        synthesize(pro_voice, "你好。", "zh", reference, FallbackTokenizer(), max_seconds=1.0)
    embedder = sv_spec(write_sv_checkpoint(tmp_path / "sv.ckpt"), "cpu").build()
    seen = []
    decode = pro_voice.s2.decode
    monkeypatch.setattr(pro_voice.s2, "decode", lambda *a, **k: seen.append(a[3]) or decode(*a, **k))
    wave = synthesize(pro_voice, "你好。", "zh", reference, FallbackTokenizer(), sv=embedder, max_seconds=1.0)
    assert wave.ndim == 1 and torch.isfinite(wave).all()
    assert torch.equal(seen[0][0], embedder.embed(reference))


def test_bert_features_for_zh_pieces_only(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("transformers")
    extractor = bert_spec(write_roberta(tmp_path / "roberta"), "cpu").build()
    torch.manual_seed(0)
    voice = Voice(Text2SemanticDecoder(s1_config("tiny")).eval(), SynthesizerTrn(s2_config("tiny")).eval())
    features = []

    def fake_generate(model, phonemes, bert, prompt, **kwargs):
        features.append(bert)
        return torch.zeros(0, dtype=torch.long)

    monkeypatch.setattr(synthesis, "generate", fake_generate)
    reference = 0.1 * torch.randn(32000, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ConfigError, match="no semantic tokens"):
        synthesize(
            voice,
            "你好。",
            "zh",
            reference,
            FallbackTokenizer(),
            reference_text="Hello there.",
            reference_language="en",
            bert=extractor,
        )
    prompt = phonemize("Hello there.", "en")
    target = phonemize(".你好。", "zh")  # under 6 phones: read with a leading ".", as upstream
    bert = features[0]
    assert bert.shape == (len(prompt.ids) + len(target.ids), 1024)
    assert not bert[: len(prompt.ids)].any()  # en prompt: zeros, as get_bert_inf
    assert torch.equal(bert[len(prompt.ids) :], extractor.features(target.norm_text, target.word2ph))


def test_the_prompt_tokens_are_made_with_upstreams_pause_after_the_reference(monkeypatch) -> None:
    torch.manual_seed(0)
    voice = Voice(Text2SemanticDecoder(s1_config("tiny")).eval(), SynthesizerTrn(s2_config("tiny")).eval())
    tokenizer = FallbackTokenizer()
    encoded = []
    encode = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda wave: encoded.append(wave) or encode(wave))
    reference = 0.1 * torch.randn(32000, generator=torch.Generator().manual_seed(1))
    synthesize(voice, "Hello there, world.", "en", reference, tokenizer, reference_text="Hello.", max_seconds=0.5)
    # inference_webui/TTS.py: 9,600 zeros after the 16 kHz reference, i.e. 0.6 s (19,200 at 32 kHz);
    # the fallback tokenizer's encode_reference encodes that at 32 kHz
    (wave,) = encoded
    assert wave.shape == (32000 + 19200,)
    assert torch.equal(wave[:32000], reference) and not wave[32000:].any()


def test_a_reference_louder_than_full_scale_is_scaled_down_for_s2_as_upstream(monkeypatch) -> None:
    torch.manual_seed(0)
    voice = Voice(Text2SemanticDecoder(s1_config("tiny")).eval(), SynthesizerTrn(s2_config("tiny")).eval())
    monkeypatch.setattr(synthesis, "generate", lambda *a, **k: torch.zeros(4, dtype=torch.long))
    specs = []
    monkeypatch.setattr(synthesis, "linear_spectrogram", lambda wave: specs.append(wave) or torch.zeros(1025, 50))
    reference = torch.randn(32000, generator=torch.Generator().manual_seed(1))
    for peak, divisor in ((0.5, 1.0), (1.5, 1.5), (3.0, 2.0)):  # get_spepc: / min(2, peak) above 1
        scaled = reference * peak / reference.abs().max()
        synthesize(voice, "Hello there, world.", "en", scaled, FallbackTokenizer(), max_seconds=0.5)
        torch.testing.assert_close(specs[-1], scaled / divisor)
