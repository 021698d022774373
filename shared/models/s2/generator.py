"""SoVITS generator ``SynthesizerTrn`` (v1, v2, v2Pro, v2ProPlus, tiny), built for per-sample gradients.

Training (``forward``): ``ge = ref_enc(spec)`` of the same utterance (v2Pro adds the speaker-
verification embedding through ``sv_emb``/``prelu``; ``ge_to512`` feeds MRTE); cached 25 Hz
semantic codes -> frozen codebook -> x2 nearest -> ``enc_p`` -> prior ``(m_p, logs_p)``;
``enc_q(spec)`` -> ``z`` -> ``flow`` -> ``z_p``; a 32-frame slice of ``z`` -> ``dec`` -> waveform.
The upstream path from HuBERT features (``ssl_proj`` + quantiser, with commitment loss) is kept:
pass ``ssl_features``. Inference (:meth:`SynthesizerTrn.decode`) follows upstream's ``decode``.

Every random choice is per sample and can be given explicitly (``slice_starts``,
``posterior_noise``) or drawn from a ``torch.Generator``, so tests and physical-batch splitting
reproduce a logical batch exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedvox.shared.errors import ConfigError, DataError
from fedvox.shared.models.batches import S2Batch
from fedvox.shared.models.config import S2Config
from fedvox.shared.models.s2.decoder import Decoder
from fedvox.shared.models.s2.flow import PosteriorEncoder, ResidualCouplingBlock
from fedvox.shared.models.s2.modules import LayerNorm, sequence_mask
from fedvox.shared.models.s2.quantizer import FrozenQuantizer
from fedvox.shared.models.s2.style import MelStyleEncoder
from fedvox.shared.models.s2.text_encoder import TextEncoder

TEXT_SIDE = ("enc_p.text_embedding", "enc_p.encoder_text", "enc_p.mrte")
"""Modules upstream fine-tunes at ``text_low_lr_rate`` x the learning rate."""


@dataclass
class S2Forward:
    """What one training forward produces; every tensor has the batch first."""

    wave_hat: torch.Tensor  # [B, 1, segment_samples] generated waveform of the slice
    slice_starts: torch.Tensor  # long [B], first latent frame of each slice
    z_p: torch.Tensor  # [B, inter, T] flow(z)
    logs_q: torch.Tensor  # [B, inter, T]
    m_p: torch.Tensor  # [B, inter, T]
    logs_p: torch.Tensor  # [B, inter, T]
    mask: torch.Tensor  # [B, 1, T] valid spectrogram frames
    commitment: torch.Tensor  # [B] VQ commitment loss (zeros when trained from cached codes)


def draw_slice_starts(
    spec_lengths: torch.Tensor, segment_frames: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One uniform slice start per sample in ``[0, length - segment]`` (0 for short utterances)."""
    high = (spec_lengths - segment_frames + 1).clamp(min=1)
    u = torch.rand(spec_lengths.shape, generator=generator, device="cpu").to(spec_lengths.device)
    return (u * high).long()


def draw_randomness(
    spec_lengths: torch.Tensor, config: S2Config, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slice starts ``[B]`` and posterior noise ``[B, inter, max length]`` for one logical batch.

    Draw them once per logical batch and pass row subsets to :meth:`SynthesizerTrn.forward`: any
    split into physical batches then computes exactly the same per-sample losses.
    """
    starts = draw_slice_starts(spec_lengths, config.segment_frames, generator)
    frames = int(spec_lengths.max()) if len(spec_lengths) else 0
    noise = torch.randn(len(spec_lengths), config.inter_channels, frames, generator=generator)
    return starts, noise.to(spec_lengths.device)


def slice_frames(x: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """``x[b, :, starts[b] : starts[b] + length]`` for every ``b``, zero-padded past the end."""
    x = F.pad(x, (0, length))
    index = starts.view(-1, 1, 1) + torch.arange(length, device=x.device)
    return x.gather(-1, index.expand(x.shape[0], x.shape[1], length))


class SynthesizerTrn(nn.Module):
    """The SoVITS generator; submodule names follow upstream so groups read the same."""

    def __init__(self, config: S2Config) -> None:
        super().__init__()
        c = config
        if not c.is_pro and c.gin_channels != c.mrte_hidden:
            raise ConfigError(
                f"s2 config {c.name!r}: gin_channels ({c.gin_channels}) must equal mrte_hidden "
                f"({c.mrte_hidden}) without sv_emb, because ge is added to MRTE's hidden state as it is"
            )
        self.config = c
        self.enc_p = TextEncoder(c)
        self.dec = Decoder(c)
        self.enc_q = PosteriorEncoder(
            c.spec_channels,
            c.inter_channels,
            c.hidden_channels,
            c.posterior_kernel,
            c.posterior_layers,
            c.gin_channels,
        )
        self.flow = ResidualCouplingBlock(
            c.inter_channels,
            c.hidden_channels,
            c.flow_kernel,
            c.flow_layers,
            c.flow_count,
            c.gin_channels,
        )
        self.ref_enc = MelStyleEncoder(c.ref_enc_bins, c.gin_channels, hidden=c.style_hidden, dropout=c.style_dropout)
        self.ssl_proj = nn.Conv1d(c.ssl_dim, c.ssl_dim, 2, stride=2)  # 50 Hz HuBERT -> 25 Hz
        self.quantizer = FrozenQuantizer(c.codebook_size, c.ssl_dim)
        if c.sv_dim is not None:  # v2Pro/v2ProPlus
            self.sv_emb = nn.Linear(c.sv_dim, c.gin_channels)
            self.ge_to512 = nn.Linear(c.gin_channels, c.mrte_hidden)
            self.prelu = nn.PReLU(num_parameters=c.gin_channels)

    # -- what trains (shared.models.subsets protocol) ------------------------------------------

    def module_groups(self) -> dict[str, tuple[str, ...]]:
        """Module groups a ``groups`` subset can train (prefixes of module names)."""
        groups = {
            "text_encoder": ("enc_p",),
            "text_side": TEXT_SIDE,
            "ref_enc": ("ref_enc",),
            "posterior": ("enc_q",),
            "flow": ("flow",),
            "decoder": ("dec",),
            "norms": tuple(name for name, module in self.named_modules() if isinstance(module, LayerNorm)),
        }
        if self.config.is_pro:
            groups["speaker"] = ("sv_emb", "prelu", "ge_to512")
        return groups

    def lora_targets(self) -> tuple[str, ...]:
        """LoRA goes on the text side (attention, FFN and MRTE convs), the flow's convs, and the
        decoder: its input and speaker-conditioning convs and every ResBlock conv. Without the
        decoder a fine-tuning run cannot change the voice it renders (measured on the pretrained
        base with ``bench/s2_subsets.py``, docs/models.md)."""
        encoders = r"enc_p\.(encoder_ssl|encoder_text|encoder2)"
        return (
            encoders + r"\.attn_layers\.\d+\.conv_[qkvo]",
            encoders + r"\.ffn_layers\.\d+\.conv_[12]",
            r"enc_p\.mrte\.(cross_attention\.conv_[qkvo]|c_pre|text_pre|c_post)",
            r"flow\.flows\.\d+\.(pre|post|enc\.(cond_layer|in_layers\.\d+|res_skip_layers\.\d+))",
            r"dec\.(conv_pre|cond)",
            r"dec\.resblocks\.\d+\.convs[12]\.\d+",
        )

    def frozen_prefixes(self) -> tuple[str, ...]:
        """Never trained: the codebook (buffers) and ``ssl_proj``, unused when training from codes."""
        return ("ssl_proj", "quantizer")

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer groups as ``s2_train.py``: the text side at ``lr * text_low_lr_rate``."""
        base: list[nn.Parameter] = []
        text: list[nn.Parameter] = []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (text if name.startswith(tuple(p + "." for p in TEXT_SIDE)) else base).append(param)
        groups = [{"params": base, "lr": lr}, {"params": text, "lr": lr * self.config.text_low_lr_rate}]
        return [group for group in groups if group["params"]]

    # -- conditioning ---------------------------------------------------------------------------

    def global_embedding(
        self, spec: torch.Tensor, mask: torch.Tensor, sv_embedding: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ge [B, gin, 1], ge for MRTE [B, mrte_hidden, 1])`` from a spectrogram (+ SV embedding)."""
        ge = self.ref_enc(spec, mask)
        if not self.config.is_pro:
            return ge, ge
        if sv_embedding is None:
            raise DataError(
                f"{self.config.name} needs each utterance's 20480-d speaker-verification embedding: run "
                "`fedvox-client prepare` with --sv (GPT-SoVITS's sv/pretrained_eres2netv2w24s4ep4.ckpt), or use a "
                "v1/v2 model"
            )
        ge = self.prelu(ge + self.sv_emb(sv_embedding).unsqueeze(-1))
        return ge, self.ge_to512(ge.squeeze(-1)).unsqueeze(-1)

    def content(
        self,
        semantic_ids: torch.Tensor,
        frames: int,
        ssl_features: torch.Tensor | None,
        semantic_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """50 Hz codebook content ``[B, 768, frames]`` and per-sample commitment loss ``[B]``."""
        with torch.autocast(semantic_ids.device.type, enabled=False):  # upstream: VQ in fp32
            if ssl_features is None:
                quantized = self.quantizer.decode(semantic_ids)
                commitment = quantized.new_zeros(quantized.shape[0])
            else:
                projected = self.ssl_proj(ssl_features.float())
                quantized, _, commitment = self.quantizer(projected, semantic_mask)
        quantized = F.interpolate(quantized, scale_factor=2.0, mode="nearest")
        if quantized.shape[-1] != frames:
            raise DataError(
                f"semantic content has {quantized.shape[-1] // 2} tokens for {frames} spectrogram "
                "frames; spec frames must be exactly 2 x semantic tokens (trim the longer one)"
            )
        return quantized, commitment

    # -- training -------------------------------------------------------------------------------

    def forward(
        self,
        batch: S2Batch,
        *,
        ssl_features: torch.Tensor | None = None,
        slice_starts: torch.Tensor | None = None,
        posterior_noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> S2Forward:
        """Training forward on a padded batch.

        ``ssl_features [B, 768, 2 * T25]`` selects the HuBERT path (``ssl_proj`` + quantiser with
        commitment loss) instead of ``batch.semantic_ids``. ``slice_starts [B]`` and
        ``posterior_noise [B, inter, >= longest utterance]`` fix the per-sample randomness (see
        :func:`draw_randomness`); missing ones are drawn from ``generator`` (or the global RNG).
        """
        c = self.config
        spec, frames = batch.spec, batch.spec.shape[-1]
        mask = sequence_mask(batch.spec_lengths, frames).to(spec.dtype)
        semantic_mask = sequence_mask(batch.semantic_lengths, batch.semantic_ids.shape[-1])
        phoneme_mask = sequence_mask(batch.phoneme_lengths, batch.phoneme_ids.shape[-1])

        ge, ge_text = self.global_embedding(spec, mask, batch.sv_embedding)
        content, commitment = self.content(batch.semantic_ids, frames, ssl_features, semantic_mask)
        m_p, logs_p, _ = self.enc_p(content, mask, batch.phoneme_ids, phoneme_mask, ge_text)

        if posterior_noise is None:
            posterior_noise = torch.randn(m_p.shape, generator=generator, device="cpu")
        if posterior_noise.shape[-1] < int(batch.spec_lengths.max()):
            raise ValueError(
                f"posterior_noise covers {posterior_noise.shape[-1]} frames, the batch needs "
                f"{int(batch.spec_lengths.max())}; draw it with draw_randomness(batch.spec_lengths, ...)"
            )
        noise = F.pad(posterior_noise, (0, max(0, frames - posterior_noise.shape[-1])))[..., :frames]
        noise = noise.to(device=m_p.device, dtype=m_p.dtype)
        z, _, logs_q = self.enc_q(spec, mask, ge, noise)
        z_p = self.flow(z, mask, ge)

        if slice_starts is None:
            slice_starts = draw_slice_starts(batch.spec_lengths, c.segment_frames, generator)
        wave_hat = self.dec(slice_frames(z, slice_starts, c.segment_frames), ge)
        return S2Forward(wave_hat, slice_starts, z_p, logs_q, m_p, logs_p, mask, commitment)

    # -- semantic tokens and inference ----------------------------------------------------------

    @torch.no_grad()
    def extract_latent(self, ssl_features: torch.Tensor) -> torch.Tensor:
        """HuBERT features ``[B, 768, T50]`` -> 25 Hz semantic codes ``[B, T50 // 2]`` (3-get-semantic)."""
        with torch.autocast(ssl_features.device.type, enabled=False):
            return self.quantizer.encode(self.ssl_proj(ssl_features.float()))

    @torch.no_grad()
    def decode(
        self,
        codes: torch.Tensor,
        phoneme_ids: torch.Tensor,
        refer_spec: torch.Tensor,
        sv: torch.Tensor | None = None,
        noise_scale: float = 0.5,
        speed: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Speak: codes ``[B, T25]`` + phonemes ``[B, X]`` in the voice of ``refer_spec [B, 1025, Tr]``.

        Inputs are unpadded (one utterance per row, as upstream). Returns ``[B, 1, 2 * T25 * 640]``
        samples at 32 kHz (time-stretched when ``speed != 1``).
        """
        refer_mask = torch.ones_like(refer_spec[:, :1])
        ge, ge_text = self.global_embedding(refer_spec, refer_mask, sv)
        frames = 2 * codes.shape[-1]
        content = F.interpolate(self.quantizer.decode(codes), size=frames, mode="nearest")
        mask = torch.ones_like(content[:, :1])
        phoneme_mask = torch.ones_like(phoneme_ids[:, None], dtype=content.dtype)
        m_p, logs_p, mask = self.enc_p(content, mask, phoneme_ids, phoneme_mask, ge_text, speed)
        noise = torch.randn(m_p.shape, generator=generator, device="cpu").to(m_p)
        z_p = m_p + noise * torch.exp(logs_p) * noise_scale
        z = self.flow(z_p, mask, ge, reverse=True)
        return self.dec(z * mask, ge)


__all__ = ["S2Forward", "SynthesizerTrn", "draw_randomness", "draw_slice_starts", "slice_frames"]
