"""Mandarin BERT features for s1, as GPT-SoVITS computes them (``1-get-text.py``, ``get_bert_feature``).

chinese-roberta-wwm-ext-large reads the normalised text (one token per character, between
[CLS] and [SEP]); the feature is the third-last hidden state (the output of layer 22 of 24),
without [CLS]/[SEP], each character's vector repeated ``word2ph[i]`` times so that there is one
1024-d vector per phone. Only zh text gets features; every other language reads zeros, upstream
and here. Upstream runs the model in fp16 when it runs on a GPU (``is_half``) and stores what it
computed; so do we (fp32 on the CPU).

The model loads with Hugging Face ``transformers`` (the optional ``bert`` extra), from a local
folder only: nothing is downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedvox.shared.errors import CheckpointError, ConfigError, DataError
from fedvox.shared.semantic import file_digest

if TYPE_CHECKING:
    from fedvox.shared.text import Phonemes

BERT_DIM = 1024
HIDDEN_STATE = -3
"""``hidden_states[-3]``: GPT-SoVITS concatenates ``hidden_states[-3:-2]``, i.e. this one alone."""

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class BertSpec:
    """How to build the BERT extractor in any process (picklable); ``name`` identifies its weights."""

    name: str
    path: str
    device: str = "cpu"

    @property
    def half(self) -> bool:
        """fp16 on GPUs, fp32 elsewhere, as GPT-SoVITS's ``is_half`` default."""
        return self.device.startswith("cuda")

    def build(self) -> BertExtractor:
        return BertExtractor(self.path, self.device, self.half)


def bert_spec(path: str | Path, device: str | None = None) -> BertSpec:
    """Check a chinese-roberta-wwm-ext-large folder and name it from its weights' content."""
    folder = Path(path)
    weights = next((folder / name for name in _WEIGHT_FILES if (folder / name).is_file()), None)
    if not folder.is_dir() or weights is None or not (folder / "config.json").is_file():
        raise CheckpointError(
            f"no BERT model folder at {folder}: expected config.json, vocab.txt/tokenizer.json and "
            "model.safetensors or pytorch_model.bin (GPT-SoVITS's pretrained_models/chinese-roberta-wwm-ext-large)"
        )
    hidden = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("hidden_size")
    if hidden != BERT_DIM:
        raise CheckpointError(
            f"{folder / 'config.json'} has hidden_size {hidden}; s1 reads {BERT_DIM}-d features "
            "(chinese-roberta-wwm-ext-large)"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return BertSpec(f"bert-{file_digest(weights)}", str(folder), device)


class BertExtractor:
    """Tokenizer and masked-LM model of one folder, loaded as ``1-get-text.py`` loads them."""

    def __init__(self, path: str | Path, device: str = "cpu", half: bool = False):
        transformers = _transformers()
        transformers.utils.logging.disable_progress_bar()
        self.tokenizer = load_tokenizer(path)
        try:
            model = transformers.AutoModelForMaskedLM.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load the BERT model in {path}: {exc}") from None
        self.device = device
        self.model = (model.half() if half else model).to(device).eval()

    @torch.no_grad()
    def features(self, norm_text: str, word2ph: list[int]) -> torch.Tensor:
        """Per-phone features ``[sum(word2ph), 1024]`` of normalised zh text (fedvox's layout:
        upstream stores the transpose, ``[1024, phones]``)."""
        if len(word2ph) != len(norm_text):
            raise DataError(f"word2ph has {len(word2ph)} entries for {len(norm_text)} characters")
        inputs = self.tokenizer(norm_text, return_tensors="pt").to(self.device)
        hidden = self.model(**inputs, output_hidden_states=True).hidden_states[HIDDEN_STATE][0, 1:-1]
        if hidden.shape[0] != len(norm_text):
            # upstream indexes one token per character and would misalign silently here
            raise DataError(
                f"the BERT tokenizer split {len(norm_text)} characters into {hidden.shape[0]} tokens; "
                "GPT-SoVITS's features need one token per character"
            )
        repeats = torch.tensor(word2ph, device=hidden.device)
        return hidden.repeat_interleave(repeats, dim=0).cpu()

    def run_features(self, runs: Sequence[Phonemes]) -> torch.Tensor | None:
        """Per-phone features ``[phones, 1024]`` of text read as language runs: each zh run's
        BERT features, zeros for every other run (``get_bert_inf`` per run, concatenated as
        ``get_phones_and_bert`` does); ``None`` (all zeros) when no run is zh."""
        if not any(run.language == "zh" for run in runs):
            return None
        dtype = next(self.model.parameters()).dtype
        return torch.cat(
            [
                self.features(run.norm_text, run.word2ph or [])
                if run.language == "zh"
                else torch.zeros(len(run.ids), BERT_DIM, dtype=dtype)
                for run in runs
            ]
        )


def load_tokenizer(path: str | Path) -> Any:
    """The folder's tokenizer, as upstream loads it (``AutoTokenizer``), from local files only."""
    try:
        return _transformers().AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the BERT tokenizer in {path}: {exc}") from None


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError("BERT features need Hugging Face transformers: pip install 'fedvox[bert]'") from None
    return transformers


__all__ = ["BERT_DIM", "BertExtractor", "BertSpec", "bert_spec", "load_tokenizer"]
