"""Semantic tokenizers: 32 kHz waveform -> 25 Hz codes in 0..1023, the units s1 predicts and s2 reads.

Two tokenizers, never mixed in one feature cache (each has a ``name`` the cache records):

* :class:`HubertTokenizer` is GPT-SoVITS's own path (``2-get-hubert-wav32k.py`` then
  ``3-get-semantic.py``): the waveform, scaled by 1145.14 as GPT-SoVITS does, resampled to 16 kHz,
  through chinese-hubert-base (final layer, 768-d, 50 Hz), then the s2 model's ``ssl_proj``
  (stride 2 -> 25 Hz) and frozen VQ codebook. :func:`load_hubert` reads a Hugging Face
  checkpoint into torchaudio's HuBERT architecture, so ``transformers`` is not needed.
* :class:`FallbackTokenizer` needs no weights: a BEST-RQ-style random-projection quantizer over
  per-utterance normalised cepstra, two 50 Hz frames per 25 Hz token. Its projection and
  codebook come from a fixed seed, so every client and the server derive the same codes
  offline. The codes follow the spectral envelope (what is said and, partly, who says it) but
  are not HuBERT units: models trained on them work only with this tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from safetensors.torch import load_file
from torchaudio.functional import create_dct
from torchaudio.models import Wav2Vec2Model, wav2vec2_model

from fedvox.shared.audio import N_MELS, SAMPLE_RATE, SSL_SAMPLE_RATE, mel_spectrogram, resample
from fedvox.shared.errors import CheckpointError, ConfigError
from fedvox.shared.models.config import SEMANTIC_CODES
from fedvox.shared.models.interop import rename_keys

if TYPE_CHECKING:
    from fedvox.shared.models.s2.generator import SynthesizerTrn

log = logging.getLogger(__name__)

HUBERT_INPUT_SCALE = 1145.14
"""GPT-SoVITS feeds HuBERT the 32 kHz waveform times this constant (``2-get-hubert-wav32k.py``)."""

FALLBACK_SEED = 20_240_125
FALLBACK_CEPSTRA = 20
FALLBACK_DIM = 16
FALLBACK_RANGE = 8.0  # natural-log mel floor below the utterance's peak (about 70 dB)
FRAMES_PER_TOKEN = 2  # 50 Hz mel frames stacked into one 25 Hz token
REFERENCE_PAUSE_SSL = 9_600
"""Zeros GPT-SoVITS's inference appends to the 16 kHz reference before its prompt tokens
(``int(32000 * 0.3)``: a count at 32 kHz's rate, so 0.6 s), so s1's prompt ends in a pause."""


class SemanticTokenizer(Protocol):
    """Anything that turns a 32 kHz mono waveform ``[samples]`` into 25 Hz codes ``[T25]``."""

    name: str

    def encode(self, wave: torch.Tensor) -> torch.Tensor: ...

    def encode_reference(self, wave: torch.Tensor) -> torch.Tensor:
        """The prompt codes of a synthesis reference, as GPT-SoVITS's inference makes them."""
        ...


# ---------------------------------------------------------------- offline fallback


class FallbackTokenizer:
    """Random-projection quantizer over cepstra (offline, seeded, 1024 codes at 25 Hz).

    HuBERT's own first training targets were clusters of MFCCs; without data to cluster on, we
    quantize with fixed random directions instead, as BEST-RQ (Chiu et al., 2022) does. Per 50 Hz
    frame: the log-mel spectrum floored 70 dB below the utterance's peak, its first 20 cepstra
    (orthonormal DCT), each normalised to zero mean and unit variance over the utterance (gain and
    channel cancel). Two frames are stacked per 25 Hz token (40 values), projected by a fixed
    Gaussian matrix to 16 dimensions, L2-normalised, and assigned to the nearest of 1024 fixed
    unit-norm codewords (largest cosine).
    """

    def __init__(self, seed: int = FALLBACK_SEED):
        generator = torch.Generator().manual_seed(seed)
        stacked = FALLBACK_CEPSTRA * FRAMES_PER_TOKEN
        self.dct = create_dct(FALLBACK_CEPSTRA, N_MELS, norm="ortho")  # [128, 20]
        self.projection = torch.randn(stacked, FALLBACK_DIM, generator=generator) / stacked**0.5
        codebook = torch.randn(SEMANTIC_CODES, FALLBACK_DIM, generator=generator)
        self.codebook = torch.nn.functional.normalize(codebook, dim=1)
        params = json.dumps([seed, FALLBACK_CEPSTRA, FALLBACK_DIM, FALLBACK_RANGE, FRAMES_PER_TOKEN])
        digest = hashlib.sha256(
            params.encode() + self.projection.numpy().tobytes() + self.codebook.numpy().tobytes()
        ).hexdigest()[:12]
        self.name = f"fallback-rpq-v1-{digest}"

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        mel = mel_spectrogram(wave.float())  # [128, T50]
        tokens = mel.shape[-1] // FRAMES_PER_TOKEN
        if tokens == 0:
            return torch.zeros(0, dtype=torch.long)
        mel = mel[:, : tokens * FRAMES_PER_TOKEN]
        mel = mel.clamp_min(mel.max() - FALLBACK_RANGE)
        cepstra = mel.T @ self.dct  # [T50, 20]
        cepstra = (cepstra - cepstra.mean(dim=0)) / cepstra.std(dim=0).clamp_min(1e-3)
        stacked = cepstra.reshape(tokens, FRAMES_PER_TOKEN * FALLBACK_CEPSTRA)  # frame 2t, then 2t+1
        z = torch.nn.functional.normalize(stacked @ self.projection, dim=1)
        return (z @ self.codebook.T).argmax(dim=1)

    def encode_reference(self, wave: torch.Tensor) -> torch.Tensor:
        """:meth:`encode` of the reference followed by GPT-SoVITS's 0.6 s inference pause."""
        pause = REFERENCE_PAUSE_SSL * SAMPLE_RATE // SSL_SAMPLE_RATE
        return self.encode(torch.cat([wave.float(), wave.new_zeros(pause, dtype=torch.float32)]))


# ---------------------------------------------------------------- GPT-SoVITS (HuBERT + s2 VQ)


class HubertTokenizer:
    """GPT-SoVITS's semantic tokens: chinese-hubert-base last layer -> s2 ``ssl_proj`` -> VQ.

    ``s2`` is an s2 generator (``SynthesizerTrn``); only its ``extract_latent`` runs.
    """

    def __init__(self, hubert: Wav2Vec2Model, s2: SynthesizerTrn, name: str, device: str = "cpu"):
        self.hubert = hubert.eval().to(device)
        self.s2 = s2.eval().to(device)
        self.name = name
        self.device = torch.device(device)

    @torch.inference_mode()
    def ssl_features(self, wave: torch.Tensor) -> torch.Tensor:
        """Final-layer HuBERT features ``[1, 768, T50]`` of a 32 kHz waveform, as GPT-SoVITS stores them."""
        wave16 = resample(wave.float().cpu() * HUBERT_INPUT_SCALE, SAMPLE_RATE, SSL_SAMPLE_RATE)
        features, _ = self.hubert(wave16.unsqueeze(0).to(self.device))
        return features.transpose(1, 2)

    @torch.inference_mode()
    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        return self.s2.extract_latent(self.ssl_features(wave))[0].long().cpu()

    @torch.inference_mode()
    def encode_reference(self, wave: torch.Tensor) -> torch.Tensor:
        """As GPT-SoVITS's inference (``get_tts_wav``): the reference at 16 kHz, unscaled (no
        1145.14), with :data:`REFERENCE_PAUSE_SSL` zeros appended, through HuBERT and the VQ."""
        wave16 = resample(wave.float().cpu(), SAMPLE_RATE, SSL_SAMPLE_RATE)
        wave16 = torch.cat([wave16, wave16.new_zeros(REFERENCE_PAUSE_SSL)])
        features, _ = self.hubert(wave16.unsqueeze(0).to(self.device))
        return self.s2.extract_latent(features.transpose(1, 2))[0].long().cpu()


@dataclass(frozen=True)
class HubertConfig:
    """The fields of a Hugging Face ``HubertConfig`` that decide the architecture (HF defaults)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    conv_dim: tuple[int, ...] = (512,) * 7
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    feat_extract_norm: str = "group"
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_json(cls, raw: dict[str, Any], source: Path) -> HubertConfig:
        for key, supported in (
            ("hidden_act", "gelu"),
            ("feat_extract_activation", "gelu"),
            ("feat_proj_layer_norm", True),
        ):
            if raw.get(key, supported) != supported:
                raise CheckpointError(
                    f"{source}: {key}={raw[key]!r} is not supported by torchaudio's HuBERT "
                    f"(needs {supported!r}); use a chinese-hubert-base style checkpoint"
                )
        if raw.get("feat_extract_norm", "group") not in ("group", "layer"):
            raise CheckpointError(f"{source}: unknown feat_extract_norm {raw['feat_extract_norm']!r}")
        fields = {name: raw[name] for name in cls.__dataclass_fields__ if name in raw}
        for name in ("conv_dim", "conv_kernel", "conv_stride"):
            if name in fields:
                fields[name] = tuple(fields[name])
        return cls(**fields)

    def build(self) -> Wav2Vec2Model:
        """torchaudio's ``Wav2Vec2Model`` with this architecture (dropouts off: features only)."""
        model = wav2vec2_model(
            extractor_mode="group_norm" if self.feat_extract_norm == "group" else "layer_norm",
            extractor_conv_layer_config=list(zip(self.conv_dim, self.conv_kernel, self.conv_stride, strict=True)),
            extractor_conv_bias=self.conv_bias,
            encoder_embed_dim=self.hidden_size,
            encoder_projection_dropout=0.0,
            encoder_pos_conv_kernel=self.num_conv_pos_embeddings,
            encoder_pos_conv_groups=self.num_conv_pos_embedding_groups,
            encoder_num_layers=self.num_hidden_layers,
            encoder_num_heads=self.num_attention_heads,
            encoder_attention_dropout=0.0,
            encoder_ff_interm_features=self.intermediate_size,
            encoder_ff_interm_dropout=0.0,
            encoder_dropout=0.0,
            encoder_layer_norm_first=self.do_stable_layer_norm,
            encoder_layer_drop=0.0,
            aux_num_out=None,
        )
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.eps = self.layer_norm_eps
        return model


# Hugging Face ``HubertModel`` keys -> torchaudio ``Wav2Vec2Model`` keys. The conv feature extractor
# and the per-layer names agree; the projection and transformer sit one level deeper in
# torchaudio, and the positional conv's weight norm is stored as old-style ``weight_g``/``weight_v``
# by older transformers releases and as parametrizations by newer ones.
_POS_CONV = "encoder.transformer.pos_conv_embed.conv.parametrizations.weight."
HF_TO_TORCHAUDIO = (
    (r"feature_extractor\.(.*)", r"feature_extractor.\1"),
    (r"feature_projection\.(.*)", r"encoder.feature_projection.\1"),
    (r"encoder\.pos_conv_embed\.conv\.weight_g", _POS_CONV + "original0"),
    (r"encoder\.pos_conv_embed\.conv\.weight_v", _POS_CONV + "original1"),
    (r"encoder\.(.*)", r"encoder.transformer.\1"),
)
HF_TRAINING_ONLY = ("masked_spec_embed",)
"""HubertModel tensors used only for pre-training masks; features never depend on them."""


def hf_to_torchaudio(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a Hugging Face HuBERT state dict for torchaudio; returns ``(renamed, ignored keys)``.

    Keys of heads around the encoder (``lm_head``, ``final_proj``, pre-training embeddings) are
    ignored; a ``hubert.`` prefix (checkpoints of ``HubertFor...`` classes) is removed.
    """
    stripped = {k.removeprefix("hubert."): v for k, v in state.items()}
    kept = {
        k: v for k, v in stripped.items() if k.startswith(("feature_extractor.", "feature_projection.", "encoder."))
    }
    ignored = sorted(set(stripped) - set(kept))
    return rename_keys(kept, HF_TO_TORCHAUDIO), ignored


def load_hubert(path: str | Path) -> Wav2Vec2Model:
    """A chinese-hubert-base checkpoint in Hugging Face format, loaded into torchaudio's HuBERT.

    ``path`` is the model folder (``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``)
    or the weights file inside it. The model is returned in ``eval()`` mode.
    """
    folder, weights = _hubert_files(Path(path))
    try:
        raw_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {folder / 'config.json'}: {exc}") from None
    config = HubertConfig.from_json(raw_config, folder / "config.json")
    try:
        if weights.suffix == ".safetensors":
            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise several types for corrupt files
        raise CheckpointError(
            f"cannot load HuBERT weights {weights} ({type(exc).__name__}: {exc}); the file is "
            "corrupt or holds code rather than tensors"
        ) from None
    renamed, ignored = hf_to_torchaudio(state)
    if set(ignored) - set(HF_TRAINING_ONLY):
        log.info("HuBERT: ignoring %d keys outside HubertModel: %s", len(ignored), ", ".join(ignored[:5]))
    model = config.build()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(renamed))
    unexpected = sorted(set(renamed) - set(expected))
    wrong = sorted(k for k in set(expected) & set(renamed) if expected[k].shape != renamed[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{weights} does not match its config.json as a HuBERT model: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}; "
            "pass the chinese-hubert-base folder downloaded from Hugging Face"
        )
    model.load_state_dict(renamed)
    return model.eval()


def _hubert_files(path: Path) -> tuple[Path, Path]:
    folder = path if path.is_dir() else path.parent
    candidates = [path] if path.is_file() else [folder / "model.safetensors", folder / "pytorch_model.bin"]
    for weights in candidates:
        if weights.is_file():
            return folder, weights
    raise CheckpointError(
        f"no HuBERT weights at {path}: expected model.safetensors or pytorch_model.bin "
        "next to config.json (the chinese-hubert-base folder from Hugging Face)"
    )


@dataclass(frozen=True)
class TokenizerSpec:
    """How to build a tokenizer in any process (picklable); ``name`` identifies the codes it makes.

    Build it with :func:`tokenizer_spec`, which names it from the weights' content, so caches made
    with different weights never share items.
    """

    name: str
    hubert: str | None = None
    s2: str | None = None
    device: str = "cpu"  # where HuBERT runs; the fallback always runs on the CPU

    def build(self) -> SemanticTokenizer:
        if self.hubert is None or self.s2 is None:
            return FallbackTokenizer()
        # The s2 stack imports Opacus (seconds): load it only when HuBERT tokens are asked for.
        from fedvox.shared.models.s2.checkpoint import load_generator

        return HubertTokenizer(load_hubert(self.hubert), load_generator(self.s2), self.name, self.device)


def tokenizer_spec(
    hubert: str | Path | None = None, s2: str | Path | None = None, device: str | None = None
) -> TokenizerSpec:
    """The fallback tokenizer without weights; GPT-SoVITS's HuBERT + s2 path with both.

    ``device`` (HuBERT only) defaults to CUDA when available, else the CPU. HuBERT runs in fp32
    everywhere (GPT-SoVITS uses fp16 on GPUs and re-runs clips that give NaN in fp32).
    """
    if hubert is None and s2 is None:
        return TokenizerSpec(FallbackTokenizer().name)
    if hubert is None or s2 is None:
        raise ConfigError(
            "semantic tokens from HuBERT need both --hubert (chinese-hubert-base folder) and --s2 "
            "(a GPT-SoVITS s2G .pth: its ssl_proj and codebook); pass both, or neither for the "
            "offline fallback tokenizer"
        )
    _, weights = _hubert_files(Path(hubert))
    if not Path(s2).is_file():
        raise CheckpointError(f"no s2 checkpoint at {s2}; pass a GPT-SoVITS s2G .pth file")
    name = f"hubert-{file_digest(weights)}-s2-{file_digest(s2)}"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return TokenizerSpec(name, str(hubert), str(s2), device)


def file_digest(path: str | Path, length: int = 12) -> str:
    """Short SHA-256 of a file's bytes: identifies the weights a tokenizer was built from."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]
