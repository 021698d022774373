"""v2Pro/v2ProPlus speaker embeddings: ERes2NetV2 on Kaldi fbank, as GPT-SoVITS computes ``sv_emb``.

GPT-SoVITS (``prepare_datasets/2-get-sv.py`` for training, ``sv.py`` for inference) resamples
the 32 kHz waveform to 16 kHz, takes an 80-bin Kaldi fbank (``dither=0``, other options Kaldi's
defaults) and runs 3D-Speaker's ERes2NetV2 (base width 24, scale 4, expansion 4) up to its
bottom-up fusion of stages 3 and 4; the embedding is that map, frequency and channels flattened
(2048 x 10 = 20480), averaged over time (``forward3``). The pooling and ``seg_1`` projection that
make ERes2NetV2's own 192-d speaker vector are not used. The model is frozen and in eval mode
(its BatchNorm layers read their stored statistics), so it never sees a gradient.

The weights are the official ``sv/pretrained_eres2netv2w24s4ep4.ckpt`` (a plain state dict),
checked key by key against ``manifests/sv_eres2netv2.json`` before loading.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchaudio.compliance import kaldi

from fedvox.shared.audio import SAMPLE_RATE, SSL_SAMPLE_RATE, resample
from fedvox.shared.errors import CheckpointError
from fedvox.shared.models.interop import manifest
from fedvox.shared.semantic import file_digest

SV_DIM = 20480
FBANK_BINS = 80
MANIFEST = "sv_eres2netv2"
_UNUSED_PREFIX = "seg_1."  # the 192-d projection: in the file, not in forward3


def fbank(wave16k: torch.Tensor) -> torch.Tensor:
    """80-bin Kaldi fbank ``[frames, 80]`` of a 16 kHz mono waveform ``[samples]``, as upstream."""
    return kaldi.fbank(wave16k.unsqueeze(0), num_mel_bins=FBANK_BINS, sample_frequency=SSL_SAMPLE_RATE, dither=0)


class _ClippedReLU(nn.Hardtanh):
    """ERes2Net's activation: ReLU capped at 20."""

    def __init__(self) -> None:
        super().__init__(0.0, 20.0)


class AttentionalFusion(nn.Module):
    """AFF: a local attention map ``a`` mixes ``x`` and ``y`` as ``x * (1 + a) + y * (1 - a)``."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        inner = channels // reduction
        self.local_att = nn.Sequential(
            nn.Conv2d(2 * channels, inner, 1),
            nn.BatchNorm2d(inner),
            nn.SiLU(),
            nn.Conv2d(inner, channels, 1),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        weight = 1.0 + torch.tanh(self.local_att(torch.cat((x, y), dim=1)))
        return x * weight + y * (2.0 - weight)


class Res2Block(nn.Module):
    """ERes2NetV2's bottleneck: ``scale`` chained 3x3 branches (added, or AFF-fused when ``fuse``)."""

    def __init__(
        self, in_planes: int, planes: int, stride: int, base_width: int, scale: int, expansion: int, fuse: bool
    ):
        super().__init__()
        width = math.floor(planes * base_width / 64)
        self.width, self.scale, self.fused = width, scale, fuse
        self.conv1 = nn.Conv2d(in_planes, width * scale, 1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scale)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1, bias=False) for _ in range(scale))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(scale))
        if fuse:
            self.fuse_models = nn.ModuleList(AttentionalFusion(width) for _ in range(scale - 1))
        self.conv3 = nn.Conv2d(width * scale, planes * expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * expansion)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes * expansion:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes * expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * expansion),
            )
        self.relu = _ClippedReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        splits = torch.split(self.relu(self.bn1(self.conv1(x))), self.width, dim=1)
        outputs: list[torch.Tensor] = []
        branch = splits[0]
        for i in range(self.scale):
            if i:
                branch = self.fuse_models[i - 1](branch, splits[i]) if self.fused else branch + splits[i]
            branch = self.relu(self.bns[i](self.convs[i](branch)))
            outputs.append(branch)
        out = self.bn3(self.conv3(torch.cat(outputs, dim=1)))
        return self.relu(out + self.shortcut(x))


class ERes2NetV2(nn.Module):
    """The speaker-verification trunk GPT-SoVITS uses (3D-Speaker's ERes2NetV2, w24 s4 e4)."""

    def __init__(
        self,
        channels: int = 64,
        blocks: tuple[int, ...] = (3, 4, 6, 3),
        base_width: int = 24,
        scale: int = 4,
        expansion: int = 4,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        in_planes = channels
        stages = []
        for stage, count in enumerate(blocks):
            planes = channels * 2**stage
            layer = []
            for j in range(count):
                layer.append(
                    Res2Block(
                        in_planes, planes, 2 if stage and not j else 1, base_width, scale, expansion, fuse=stage >= 2
                    )
                )
                in_planes = planes * expansion
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.layer3_ds = nn.Conv2d(
            channels * 4 * expansion, channels * 8 * expansion, 3, stride=2, padding=1, bias=False
        )
        self.fuse34 = AttentionalFusion(channels * 8 * expansion)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features`` ``[B, frames, 80]`` fbank -> ``[B, 20480]`` (upstream's ``forward3``)."""
        x = torch.relu(self.bn1(self.conv1(features.transpose(1, 2).unsqueeze(1))))
        out3 = self.layer3(self.layer2(self.layer1(x)))
        fused = self.fuse34(self.layer4(out3), self.layer3_ds(out3))
        return fused.flatten(1, 2).mean(-1)


def load_sv_model(path: str | Path) -> ERes2NetV2:
    """The official ERes2NetV2 checkpoint, checked against its manifest (every key and shape)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(
            f"no speaker-verification model at {path}; pass GPT-SoVITS's "
            "pretrained_models/sv/pretrained_eres2netv2w24s4ep4.ckpt"
        ) from None
    except Exception as exc:  # torch raises several types for files that are not tensors
        raise CheckpointError(f"cannot read {path} as a PyTorch state dict ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a state dict; pass pretrained_eres2netv2w24s4ep4.ckpt")
    expected = manifest(MANIFEST)["tensors"]
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        name = (missing or unexpected)[0]
        raise CheckpointError(
            f"{path} is not the ERes2NetV2 (w24 s4 e4) speaker model: key {name!r} "
            f"{'missing' if missing else 'unexpected'} ({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    for key, spec in expected.items():
        if list(state[key].shape) != spec["shape"]:
            raise CheckpointError(f"{path}: {key} has shape {list(state[key].shape)}, expected {spec['shape']}")
    model = ERes2NetV2()
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith(_UNUSED_PREFIX)}, strict=True)
    return model.eval().requires_grad_(False)


@dataclass(frozen=True)
class SvSpec:
    """How to build the speaker model in any process (picklable); ``name`` identifies its weights."""

    name: str
    path: str
    device: str = "cpu"

    def build(self) -> SpeakerEmbedder:
        return SpeakerEmbedder(load_sv_model(self.path), self.device, half=self.device.startswith("cuda"))


def sv_spec(path: str | Path, device: str | None = None) -> SvSpec:
    if not Path(path).is_file():
        raise CheckpointError(
            f"no speaker-verification model at {path}; pass GPT-SoVITS's "
            "pretrained_models/sv/pretrained_eres2netv2w24s4ep4.ckpt"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return SvSpec(f"sv-{file_digest(path)}", str(path), device)


class SpeakerEmbedder:
    """32 kHz waveform -> ``sv_emb`` input ``[20480]``; fp16 on GPUs, as upstream's ``is_half``."""

    def __init__(self, model: ERes2NetV2, device: str = "cpu", half: bool = False):
        self.device, self.half = device, half
        self.model = (model.half() if half else model).to(device)

    @torch.no_grad()
    def embed(self, wave32k: torch.Tensor) -> torch.Tensor:
        wave = resample(wave32k.float(), SAMPLE_RATE, SSL_SAMPLE_RATE).to(self.device)
        if self.half:
            wave = wave.half()
        return self.model(fbank(wave).unsqueeze(0))[0].cpu()


__all__ = ["SV_DIM", "ERes2NetV2", "SpeakerEmbedder", "SvSpec", "fbank", "load_sv_model", "sv_spec"]
