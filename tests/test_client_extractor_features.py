"""zh BERT features and v2Pro speaker embeddings flow from `fedvox-client prepare --bert --sv`
through `fedvox-client train` (a DP step of each stage) and `synthesize` into the models.

The extractors are random models in the released formats (tests/extractor_fixtures.py); the
v2Pro s2 is the v2Pro architecture at the tiny config's widths (the released one is too big
for a test on CPU): the command line, data and training path are the real ones.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedvox.shared.models import config
from fedvox.shared.models.s1 import Text2SemanticDecoder
from fedvox.shared.models.s2 import SynthesizerTrn
from fedvox.shared.speaker import SV_DIM
from tests.data_fixtures import write_good_set
from tests.extractor_fixtures import write_roberta, write_sv_checkpoint
from tests.test_client_owner import cli

pytest.importorskip("transformers")

RUN = ["--steps", "1", "--checkpoint-every", "1", "--noise-multiplier", "2.0", "--logical-batch", "4"]
PINNED = ["--seed", "3", "--device", "cpu", "--physical-batch", "4"]


@pytest.fixture
def seen(monkeypatch) -> dict[str, list[torch.Tensor]]:
    """The BERT features s1 embeds and the speaker embeddings s2 conditions on, call by call."""
    seen: dict[str, list[torch.Tensor]] = {"bert": [], "sv": []}
    embed, condition = Text2SemanticDecoder.embed_phonemes, SynthesizerTrn.global_embedding

    def embed_phonemes(self, phoneme_ids, phoneme_lengths, bert_features):
        seen["bert"].append(bert_features.detach().float().clone())
        return embed(self, phoneme_ids, phoneme_lengths, bert_features)

    def global_embedding(self, spec, mask, sv_embedding):
        seen["sv"].append(None if sv_embedding is None else sv_embedding.detach().float().clone())
        return condition(self, spec, mask, sv_embedding)

    monkeypatch.setattr(Text2SemanticDecoder, "embed_phonemes", embed_phonemes)
    monkeypatch.setattr(SynthesizerTrn, "global_embedding", global_embedding)
    tiny_pro = replace(config.s2_config("tiny"), name="v2Pro", version="v2Pro", sv_dim=SV_DIM)
    monkeypatch.setitem(config._S2, "v2Pro", tiny_pro)
    return seen


def test_bert_and_sv_features_reach_training_and_synthesis(seen, tmp_path: Path, monkeypatch, capsys) -> None:
    roberta = write_roberta(tmp_path / "chinese-roberta-wwm-ext-large")
    sv = write_sv_checkpoint(tmp_path / "sv" / "pretrained_eres2netv2w24s4ep4.ckpt")
    recordings = write_good_set(tmp_path / "wavs", source="pseudo")
    data = tmp_path / "data"
    extractors = ["--bert", str(roberta), "--sv", str(sv)]
    code, output = cli(
        monkeypatch, capsys, "prepare", str(recordings), "--out", str(data), "--model-config", "v2Pro",
        *extractors, "--budget-epsilon", "200",
    )  # fmt: skip
    assert code == 0, output
    assert "zero BERT features" not in output and "no speaker embeddings" not in output

    code, output = cli(
        monkeypatch, capsys, "train", "--data", str(data), "--out", str(tmp_path / "s1"), "--stage", "s1",
        "--model-config", "tiny", "--subset", "full", *RUN, *PINNED,
    )  # fmt: skip
    assert code == 0, output
    assert "trained 1 steps" in output
    # the stored zh features are in the batches s1 trains on (zeros only for en utterances)
    assert seen["bert"] and any(bert.abs().sum() > 0 for bert in seen["bert"])

    code, output = cli(
        monkeypatch, capsys, "train", "--data", str(data), "--out", str(tmp_path / "s2"), "--stage", "s2",
        "--model-config", "v2Pro", *RUN, *PINNED,
    )  # fmt: skip
    assert code == 0, output
    assert "trained 1 steps" in output
    trained = [sv for sv in seen["sv"] if sv is not None and sv.shape[0] > 0]
    assert trained and all(sv.shape[1] == SV_DIM and bool((sv.abs().sum(dim=1) > 0).all()) for sv in trained)

    seen["bert"].clear()
    seen["sv"].clear()
    out = tmp_path / "said.wav"
    code, output = cli(
        monkeypatch, capsys, "synthesize", "--model", str(tmp_path / "s1"), "--model", str(tmp_path / "s2"),
        "--text", "今天天气很好", "--language", "zh", "--ref", str(recordings.parent / "spkC_0000.wav"),
        "--ref-text", "我们去公园散步吧。", *extractors, "--out", str(out),
    )  # fmt: skip
    assert code == 0, output
    assert out.is_file()
    assert seen["bert"][0].abs().sum() > 0  # the prompt and target are zh: BERT features, not zeros
    assert seen["sv"][-1] is not None and seen["sv"][-1].abs().sum() > 0  # the reference's embedding
