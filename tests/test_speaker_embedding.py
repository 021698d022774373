"""v2Pro speaker embeddings: the official ERes2NetV2 file layout loads strictly (random weights in
the manifest's layout), ``prepare --sv`` stores one embedding per utterance, s2 batches carry them
and a tiny Pro generator trains on them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedvox.client.data.datasets import S2Dataset, collate_s2
from fedvox.client.data.extractors import ExtractorSpecs
from fedvox.client.data.prepare import prepare
from fedvox.shared.errors import CheckpointError
from fedvox.shared.models.config import s2_config
from fedvox.shared.models.s2 import SynthesizerTrn
from fedvox.shared.semantic import tokenizer_spec
from fedvox.shared.speaker import SV_DIM, fbank, load_sv_model, sv_spec
from tests.data_fixtures import write_good_set
from tests.extractor_fixtures import write_sv_checkpoint


@pytest.fixture(scope="module")
def sv_file(tmp_path_factory) -> Path:
    """``pretrained_eres2netv2w24s4ep4.ckpt`` as upstream stores it (a plain state dict), random values."""
    return write_sv_checkpoint(tmp_path_factory.mktemp("sv") / "pretrained_eres2netv2w24s4ep4.ckpt")


def test_official_layout_loads_and_embeds_20480_dims(sv_file: Path) -> None:
    embedder = sv_spec(sv_file, "cpu").build()
    wave = 0.1 * torch.randn(32000, generator=torch.Generator().manual_seed(0))
    embedding = embedder.embed(wave)
    assert embedding.shape == (SV_DIM,) and torch.isfinite(embedding).all()
    assert torch.equal(embedding, embedder.embed(wave))  # frozen, eval-mode BatchNorm
    assert not any(p.requires_grad for p in embedder.model.parameters())
    # Kaldi framing at 16 kHz: 25 ms windows every 10 ms, edges snipped
    assert fbank(torch.zeros(16000)).shape == (1 + (16000 - 400) // 160, 80)


def test_any_other_layout_is_refused_naming_the_key(sv_file: Path, tmp_path: Path) -> None:
    state = torch.load(sv_file, weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "fuse34.local_att.0.weight"}, tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match=r"'fuse34\.local_att\.0\.weight' missing"):
        load_sv_model(tmp_path / "missing.ckpt")
    torch.save({**state, "seg_1.weight": torch.zeros(192, 10)}, tmp_path / "shape.ckpt")
    with pytest.raises(CheckpointError, match=r"seg_1.weight has shape \[192, 10\], expected \[192, 40960\]"):
        load_sv_model(tmp_path / "shape.ckpt")
    with pytest.raises(CheckpointError, match="no speaker-verification model"):
        sv_spec(tmp_path / "absent.ckpt")


def test_prepare_stores_embeddings_and_a_pro_generator_trains_on_them(sv_file: Path, tmp_path: Path) -> None:
    good = write_good_set(tmp_path / "good", source="pseudo")
    options = {"tokenizer": tokenizer_spec(), "symbols_version": "v2", "workers": 1, "show_progress": False}
    extractors = ExtractorSpecs(sv=sv_spec(sv_file, "cpu"), pro=True)
    report = prepare(good, tmp_path / "cache", extractors=extractors, **options)
    assert not any("speaker embeddings" in note for note in report.notes)
    dataset = S2Dataset(tmp_path / "cache")
    batch = collate_s2([dataset[0], dataset[1]])
    assert batch.sv_embedding is not None and batch.sv_embedding.shape == (2, SV_DIM)

    tiny_pro = replace(s2_config("tiny"), name="tiny-pro", version="v2Pro", sv_dim=SV_DIM)
    torch.manual_seed(0)
    out = SynthesizerTrn(tiny_pro)(batch)
    assert torch.isfinite(out.wave_hat).all()

    plain = prepare(good, tmp_path / "plain", extractors=ExtractorSpecs(pro=True), **options)
    assert any("--sv" in note for note in plain.notes)
    assert collate_s2([S2Dataset(tmp_path / "plain")[0]]).sv_embedding is None
