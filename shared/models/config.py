"""Model configurations: the official GPT-SoVITS sizes and a ``tiny`` one with the same structure.

Official values come from GPT-SoVITS's ``s1longer(-v2).yaml`` and ``s2*.json`` (see
``manifests/hparams.json``). ``tiny`` keeps every module and every wiring of the official model
but shrinks widths and depths so a DP step takes well under a second on 2 CPU cores. Feature
dimensions that data depends on (phoneme vocabulary, 1025 spectrogram bins, 768-d SSL space,
1024 semantic codes) stay official, so a feature cache works with every config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from fedvox.shared.errors import ConfigError

CONFIG_NAMES = ("tiny", "base", "v1", "v2", "v2Pro", "v2ProPlus")

SEMANTIC_CODES = 1024
"""Semantic token codebook size; token 1024 is the s1 end-of-sequence (EOS) id."""

EOS = SEMANTIC_CODES

SHIPPED_BASE = "fedvox-base"
"""The ``pretrained`` value that names fedvox's own pretrained base (``shared/models/base``,
made by ``fedvox-sim pretrain``); the factory resolves it to each stage's file."""
SHIPPED_BASE_CONFIG = "base"
"""The model config the shipped base was trained in."""

PHONEME_VOCAB = {"v1": 322, "v2": 732}
"""Symbol-table sizes of GPT-SoVITS v1 (``symbols.py``) and v2+ (``symbols2.py``)."""


@dataclass(frozen=True)
class S1Config:
    """GPT text-to-semantic decoder (``Text2SemanticDecoder``); fields map to ``s1longer*.yaml``.

    ``phoneme_vocab_size`` is the embedding size of the official yaml, which is larger than the
    v1 symbol table (512 rows for 322 symbols); ``symbols_version`` picks the symbol table.
    ``dropout`` is the rate GPT-SoVITS hard-codes in the positional embeddings and every layer
    (the yaml's own ``dropout: 0`` is a token-embedding dropout that no official config enables).
    """

    name: str
    symbols_version: str = "v2"
    phoneme_vocab_size: int = PHONEME_VOCAB["v2"]
    dim: int = 512
    heads: int = 16
    layers: int = 24
    ffn_dim: int = 2048
    dropout: float = 0.1
    bert_dim: int = 1024
    layer_norm_eps: float = 1e-5
    semantic_vocab: int = SEMANTIC_CODES + 1
    eos: int = EOS
    max_sec: int = 54
    top_k: int = 15

    @property
    def max_semantic_tokens(self) -> int:
        """Longest semantic sequence trained on (``max_sec`` at 25 Hz), as in GPT-SoVITS's filter."""
        return self.max_sec * 25

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class S2Config:
    """SoVITS generator (``SynthesizerTrn``) and multi-period discriminator."""

    name: str
    version: str = "v2"
    symbols_version: str = "v2"
    # audio / features (fixed by the data pipeline)
    spec_channels: int = 1025
    ref_enc_bins: int = 704
    ssl_dim: int = 768
    codebook_size: int = SEMANTIC_CODES
    segment_frames: int = 32
    hop_length: int = 640
    # text encoder (enc_p)
    inter_channels: int = 192
    hidden_channels: int = 192
    filter_channels: int = 768
    n_heads: int = 2
    n_layers: int = 6
    kernel_size: int = 3
    p_dropout: float = 0.1
    window_size: int = 4
    mrte_hidden: int = 512
    mrte_heads: int = 4
    # global (speaker/style) embedding; ref_enc is upstream's MelStyleEncoder (hidden 128, dropout 0.1)
    gin_channels: int = 512
    sv_dim: int | None = None
    style_hidden: int = 128
    style_dropout: float = 0.1
    # posterior encoder and flow
    posterior_layers: int = 16
    posterior_kernel: int = 5
    flow_count: int = 4
    flow_layers: int = 4
    flow_kernel: int = 5
    # HiFi-GAN decoder
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    upsample_rates: tuple[int, ...] = (10, 8, 2, 2, 2)
    upsample_initial_channel: int = 512
    upsample_kernel_sizes: tuple[int, ...] = (16, 16, 8, 2, 2)
    # multi-period discriminator
    disc_periods: tuple[int, ...] = (2, 3, 5, 7, 11)
    disc_channels: tuple[int, ...] = (32, 128, 512, 1024, 1024)
    disc_s_channels: tuple[int, ...] = (16, 64, 256, 1024, 1024, 1024)
    # losses (official weights)
    c_mel: float = 45.0
    c_kl: float = 1.0
    c_fm: float = 2.0
    text_low_lr_rate: float = 0.4  # lr factor of enc_p.text_embedding/encoder_text/mrte (s2_train.py)

    @property
    def phoneme_vocab(self) -> int:
        return PHONEME_VOCAB[self.symbols_version]

    @property
    def is_pro(self) -> bool:
        return self.sv_dim is not None

    @property
    def segment_samples(self) -> int:
        return self.segment_frames * self.hop_length

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_S1 = {
    "v1": S1Config(name="v1", symbols_version="v1", phoneme_vocab_size=512, top_k=5),
    "v2": S1Config(name="v2"),
    "tiny": S1Config(name="tiny", dim=64, heads=4, layers=2, ffn_dim=256),
    "base": S1Config(name="base", dim=256, heads=4, layers=6, ffn_dim=1024),
}
_S1["v2Pro"] = replace(_S1["v2"], name="v2Pro")
_S1["v2ProPlus"] = replace(_S1["v2"], name="v2ProPlus")

_S2 = {
    "v1": S2Config(name="v1", version="v1", symbols_version="v1", ref_enc_bins=1025),
    "v2": S2Config(name="v2"),
    "v2Pro": S2Config(
        name="v2Pro",
        version="v2Pro",
        p_dropout=0.0,
        gin_channels=1024,
        sv_dim=20480,
        disc_periods=(2, 3, 5, 7, 11, 17, 23),
    ),
    "v2ProPlus": S2Config(
        name="v2ProPlus",
        version="v2ProPlus",
        p_dropout=0.0,
        gin_channels=1024,
        sv_dim=20480,
        upsample_initial_channel=768,
        upsample_kernel_sizes=(20, 16, 8, 2, 2),
        disc_periods=(2, 3, 5, 7, 11, 17, 23),
    ),
    "tiny": S2Config(
        name="tiny",
        version="v2",
        inter_channels=32,
        hidden_channels=32,
        filter_channels=64,
        n_layers=2,
        mrte_hidden=32,
        mrte_heads=2,
        gin_channels=32,
        style_hidden=16,
        posterior_layers=2,
        flow_count=2,
        flow_layers=2,
        resblock_kernel_sizes=(3,),
        resblock_dilation_sizes=((1, 3),),
        upsample_initial_channel=64,
        disc_periods=(2, 3),
        disc_channels=(4, 8, 16, 16, 16),
        disc_s_channels=(4, 8, 16, 16, 16, 16),
        segment_frames=8,
    ),
    "base": S2Config(
        name="base",
        version="v2",
        inter_channels=96,
        hidden_channels=96,
        filter_channels=384,
        n_layers=4,
        mrte_hidden=128,
        mrte_heads=2,
        gin_channels=128,
        style_hidden=64,
        posterior_layers=8,
        flow_count=4,
        flow_layers=4,
        resblock_kernel_sizes=(3, 7, 11),
        upsample_initial_channel=192,
        disc_periods=(2, 3, 5, 7, 11),
        disc_channels=(16, 32, 64, 128, 128),
        disc_s_channels=(16, 32, 64, 128, 128, 128),
        segment_frames=16,
    ),
}


def s1_config(name: str, **overrides: Any) -> S1Config:
    """The s1 config called ``name`` (one of :data:`CONFIG_NAMES`), with optional overrides."""
    return replace(_lookup(_S1, name, "s1"), **overrides)


def s2_config(name: str, **overrides: Any) -> S2Config:
    """The s2 config called ``name`` (one of :data:`CONFIG_NAMES`), with optional overrides."""
    return replace(_lookup(_S2, name, "s2"), **overrides)


def shipped_base_mismatch(model_config: str, pretrained: object) -> str | None:
    """Why the shipped base does not fit ``model_config`` (it was trained in one config), or None."""
    if pretrained == SHIPPED_BASE and model_config != SHIPPED_BASE_CONFIG:
        return (
            f"pretrained = {SHIPPED_BASE!r} is a {SHIPPED_BASE_CONFIG!r} model but model-config is {model_config!r}; "
            f'set model-config = {SHIPPED_BASE_CONFIG!r}, or pretrained = "" for a seeded {model_config!r} model'
        )
    return None


def _lookup(table: dict[str, Any], name: str, stage: str) -> Any:
    try:
        return table[name]
    except KeyError:
        raise ConfigError(f"unknown {stage} model config {name!r}; choose one of {', '.join(CONFIG_NAMES)}") from None


__all__ = [
    "CONFIG_NAMES",
    "EOS",
    "PHONEME_VOCAB",
    "SEMANTIC_CODES",
    "SHIPPED_BASE",
    "SHIPPED_BASE_CONFIG",
    "S1Config",
    "S2Config",
    "s1_config",
    "s2_config",
    "shipped_base_mismatch",
]
