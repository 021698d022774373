"""Stand-ins for the released frozen extractors, in their official formats with random weights."""

from __future__ import annotations

from pathlib import Path

import torch

from fedvox.shared.bert import BERT_DIM
from fedvox.shared.models.interop import random_official_state_dict

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CHARACTERS = "今天天气很好我们去公园散步吧你世界。，！？"


def write_roberta(folder: Path) -> Path:
    """A 3-layer, 1024-wide BertForMaskedLM saved as chinese-roberta-wwm-ext-large's folder is."""
    import transformers

    chars = sorted(set(CHARACTERS))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIAL + chars) + "\n", encoding="utf-8")
    transformers.BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)
    config = transformers.BertConfig(
        vocab_size=len(SPECIAL) + len(chars),
        hidden_size=BERT_DIM,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.BertForMaskedLM(config).save_pretrained(folder)
    return folder


def write_sv_checkpoint(path: Path) -> Path:
    """``pretrained_eres2netv2w24s4ep4.ckpt`` as upstream stores it (a plain state dict)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_official_state_dict("sv_eres2netv2", seed=4), path)
    return path
