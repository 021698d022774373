"""s2 interop: GPT-SoVITS ``s2G``/``s2D`` ``.pth`` files in and out, and fedvox safetensors.

Official files are ``{"weight": state_dict, "config": hps, "info": str}`` (D: ``{"weight": ...}``).
Exports of fine-tuned models (``process_ckpt.savee``) are fp16 and drop every ``enc_q`` key;
v2Pro/v2ProPlus exports replace the zip magic ``PK`` with ``b"05"``/``b"06"``. Their ``hps`` is a
pickled ``utils.HParams`` object, which ``weights_only=True`` loading accepts only through the
plain-dict stand-in allow-listed here. We write ``hps`` as a plain dict, which GPT-SoVITS's own
loader (``DictToAttrRecursive``) reads as well.

fedvox's modules differ from upstream's in two places only, both for Opacus (see ``modules.py``
and ``attentions.py``), plus three naming simplifications; the tables below map the names.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedvox.shared.errors import CheckpointError
from fedvox.shared.models.config import S2Config, s2_config
from fedvox.shared.models.interop import (
    load_safetensors,
    manifest,
    read_torch_file,
    rename_keys,
    save_safetensors,
    write_torch_file,
)
from fedvox.shared.models.s2.discriminator import MultiPeriodDiscriminator
from fedvox.shared.models.s2.generator import SynthesizerTrn
from fedvox.shared.models.subsets import merged_state_dict

log = logging.getLogger(__name__)

OFFICIAL_VERSIONS = ("v1", "v2", "v2Pro", "v2ProPlus")
TAGGED_VERSIONS = ("v2Pro", "v2ProPlus")  # exports whose zip magic is replaced by a version tag

_WEIGHT_NORM_IN = [
    (r"(.+)\.weight_g", r"\1.parametrizations.weight.original0"),
    (r"(.+)\.weight_v", r"\1.parametrizations.weight.original1"),
]
_WEIGHT_NORM_OUT = [
    (r"(.+)\.parametrizations\.weight\.original0", r"\1.weight_g"),
    (r"(.+)\.parametrizations\.weight\.original1", r"\1.weight_v"),
]

G_IMPORT_RULES = [
    *_WEIGHT_NORM_IN,
    (r"(.+)\.(emb_rel_[kv])", r"\1.\2.weight"),
    (r"quantizer\.vq\.layers\.0\._codebook\.(.+)", r"quantizer.\1"),
    (r"ref_enc\.spectral\.(\d+)\.fc\.(.+)", r"ref_enc.spectral.\1.\2"),
    (r"ref_enc\.temporal\.(\d+)\.conv1\.conv\.(.+)", r"ref_enc.temporal.\1.conv1.\2"),
    (r"ref_enc\.fc\.fc\.(.+)", r"ref_enc.fc.\1"),
]
"""Official s2G key -> fedvox key (first full match wins)."""

G_EXPORT_RULES = [
    *_WEIGHT_NORM_OUT,
    (r"(.+)\.(emb_rel_[kv])\.weight", r"\1.\2"),
    (r"quantizer\.(inited|cluster_size|embed|embed_avg)", r"quantizer.vq.layers.0._codebook.\1"),
    (r"ref_enc\.spectral\.(\d+)\.(weight|bias)", r"ref_enc.spectral.\1.fc.\2"),
    (r"ref_enc\.temporal\.(\d+)\.conv1\.(weight|bias)", r"ref_enc.temporal.\1.conv1.conv.\2"),
    (r"ref_enc\.fc\.(weight|bias)", r"ref_enc.fc.fc.\1"),
]
"""fedvox s2G key -> official key."""

POSTERIOR_PREFIX = "enc_q."


class _HParams(dict):
    """Plain-dict stand-in for GPT-SoVITS's pickled ``utils.HParams`` (attributes become keys)."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.update(state)


_HPARAMS_NAMES = ("utils.HParams", "GPT_SoVITS.utils.HParams")


@dataclass
class OfficialCheckpoint:
    """An official s2 file as read: official key names, the hps dict, the detected version."""

    weight: dict[str, torch.Tensor]
    version: str
    config: dict[str, Any] | None = None
    info: str | None = None


# -- reading --------------------------------------------------------------------------------------


def read_official(path: str | Path) -> OfficialCheckpoint:
    """Read an s2G or s2D ``.pth`` safely (``weights_only=True``) and detect its version."""
    with torch.serialization.safe_globals([(_HParams, name) for name in _HPARAMS_NAMES]):
        obj, tag = read_torch_file(path)
    if not isinstance(obj, Mapping) or not isinstance(obj.get("weight"), Mapping):
        raise CheckpointError(
            f"{path} is not a GPT-SoVITS s2 checkpoint: expected a dict with a 'weight' state dict "
            "(SoVITS_weights*/…pth or a pretrained s2G/s2D file)"
        )
    weight = dict(obj["weight"])
    config = _plain(obj.get("config")) if obj.get("config") is not None else None
    return OfficialCheckpoint(weight, detect_version(weight, tag, config, path), config, obj.get("info"))


def detect_version(
    weight: Mapping[str, torch.Tensor],
    tag: str | None,
    config: Mapping[str, Any] | None = None,
    path: str | Path = "checkpoint",
) -> str:
    """The s2 version of an official state dict, decided as GPT-SoVITS does.

    The header tag wins (``b"05"`` v2Pro, ``b"06"`` v2ProPlus). Untagged pretrained Pro files are
    told apart as in ``process_ckpt.inspect_version`` (gin 1024; initial channel 768 = ProPlus),
    read from the hps or, without one, from the shapes. Otherwise ``enc_p.text_embedding`` with
    322 rows is v1 and anything else v2.
    """
    if tag is not None:
        if tag not in OFFICIAL_VERSIONS:
            raise CheckpointError(
                f"{path} is a GPT-SoVITS {tag} file; fedvox trains the VITS-based s2 versions "
                f"{', '.join(OFFICIAL_VERSIONS)} only"
            )
        return tag
    if "dec.conv_pre.weight" not in weight and "discriminators.0.conv_post.weight_v" not in weight:
        raise CheckpointError(
            f"{path} has no HiFi-GAN decoder (dec.conv_pre.weight): it is a v3/v4 "
            "(SynthesizerTrnV3) checkpoint, which fedvox does not train"
        )
    model_hps = (config or {}).get("model") or {}
    version = model_hps.get("version")
    if version in TAGGED_VERSIONS:
        return version
    if "sv_emb.weight" in weight or model_hps.get("gin_channels") == 1024:
        initial = model_hps.get("upsample_initial_channel")
        if initial is None and "dec.conv_pre.weight" in weight:
            initial = weight["dec.conv_pre.weight"].shape[0]
        return "v2ProPlus" if initial == 768 else "v2Pro"
    embedding = weight.get("enc_p.text_embedding.weight")
    return "v1" if embedding is not None and embedding.shape[0] == 322 else "v2"


def _discriminator_version(weight: Mapping[str, torch.Tensor]) -> str:
    count = len({key.split(".")[1] for key in weight if key.startswith("discriminators.")})
    return "v2Pro" if count == 8 else "v2"


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# -- state-dict conversion ------------------------------------------------------------------------


def to_fedvox(weight: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Official key names -> ``model``'s own names (G or D)."""
    rules = G_IMPORT_RULES if isinstance(model, SynthesizerTrn) else _WEIGHT_NORM_IN
    return rename_keys(weight, rules)


def to_official(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict under official key names (LoRA adapters merged in).

    Keys follow the official files' order when the model has an official architecture, so an
    imported file exports to the same bytes.
    """
    if isinstance(model, SynthesizerTrn):
        state = rename_keys(merged_state_dict(model), G_EXPORT_RULES)
        reference = f"s2G_{model.config.version}"
    else:
        state = rename_keys(merged_state_dict(model), _WEIGHT_NORM_OUT)
        reference = f"s2D_{_discriminator_version(state)}"
    order = manifest(reference)["tensors"]
    if not state.keys() <= order.keys():
        return state
    return {key: state[key] for key in order if key in state}


def load_official_state(
    model: nn.Module, weight: Mapping[str, torch.Tensor], version: str, allow_missing: tuple[str, ...] = ()
) -> list[str]:
    """Load an official state dict into ``model`` strictly; returns the keys it lacked.

    Only keys under ``allow_missing`` prefixes may be absent (they keep their initial values).
    Every other mismatch raises :class:`CheckpointError` naming the key, both shapes and the
    config to use.
    """
    state = to_fedvox(weight, model)
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    config_name = getattr(getattr(model, "config", None), "name", "?")
    if unexpected:
        raise CheckpointError(
            f"checkpoint key {_official_name(unexpected[0], model)!r} (and {len(unexpected) - 1} more) "
            f"does not exist in the {config_name} model; this is a {version} checkpoint, build the "
            f"model with s2_config({version!r})"
        )
    not_allowed = [k for k in missing if not k.startswith(allow_missing)]
    if not_allowed:
        raise CheckpointError(
            f"checkpoint lacks {_official_name(not_allowed[0], model)!r} (and {len(not_allowed) - 1} "
            f"more) that the {config_name} model needs; pass a complete {version} s2 checkpoint"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise CheckpointError(
                f"{_official_name(key, model)}: checkpoint has shape {list(tensor.shape)}, the "
                f"{config_name} model expects {list(own[key].shape)}; this is a {version} "
                f"checkpoint, build the model with s2_config({version!r})"
            )
    with torch.no_grad():
        model.load_state_dict({**own, **state}, strict=True)
    return missing


def _official_name(key: str, model: nn.Module) -> str:
    rules = G_EXPORT_RULES if isinstance(model, SynthesizerTrn) else _WEIGHT_NORM_OUT
    return next(iter(rename_keys({key: None}, rules)))


# -- public loaders ---------------------------------------------------------------------------------


def load_generator(path: str | Path, config: S2Config | None = None) -> SynthesizerTrn:
    """Build a generator from an official s2G ``.pth`` (pretrained or fine-tuned export).

    Without ``config`` the model is built from the file's own ``hps``, as GPT-SoVITS's loader
    does (the detected version's official config when the file has none). With ``config`` (a
    run's model config), a file whose ``hps`` describes another architecture is refused, naming
    the field. A fine-tuned export has no ``enc_q`` (upstream drops it): the posterior encoder
    then keeps a fresh initialisation.
    """
    ckpt = read_official(path)
    own = config_from_hparams(ckpt.config, ckpt.version, path) if ckpt.config else s2_config(ckpt.version)
    if config is None:
        config = own
    elif ckpt.config:
        differing = _architecture_differences(own, config)
        if differing:
            name = differing[0]
            raise CheckpointError(
                f"{path}: its config sets {name}={getattr(own, name)!r} but the {config.name} model has "
                f"{getattr(config, name)!r}; pick the model config matching the checkpoint ({ckpt.version}) "
                "or omit it to build the model from the file"
            )
    model = SynthesizerTrn(config)
    missing = load_official_state(model, ckpt.weight, ckpt.version, allow_missing=(POSTERIOR_PREFIX,))
    if missing:
        log.warning("%s has no enc_q (a fine-tuned export): the posterior encoder starts from scratch", path)
    return model.float()


_HPS_MODEL_FIELDS = (
    "inter_channels",
    "hidden_channels",
    "filter_channels",
    "n_heads",
    "n_layers",
    "kernel_size",
    "p_dropout",
    "resblock_kernel_sizes",
    "resblock_dilation_sizes",
    "upsample_rates",
    "upsample_initial_channel",
    "upsample_kernel_sizes",
    "gin_channels",
)
"""``hps.model`` entries that are :class:`S2Config` fields of the same name and meaning."""

_TRAINING_ONLY = frozenset(
    {
        "name",
        "p_dropout",
        "style_dropout",
        "segment_frames",
        "c_mel",
        "c_kl",
        "c_fm",
        "text_low_lr_rate",
        "disc_periods",
        "disc_channels",
        "disc_s_channels",
    }
)
"""S2Config fields that do not change the generator's tensors."""


def config_from_hparams(hps: Mapping[str, Any], version: str, path: str | Path = "checkpoint") -> S2Config:
    """The :class:`S2Config` an official file's ``hps`` describes, as upstream's loader builds it.

    Upstream calls ``SynthesizerTrn(filter_length // 2 + 1, segment_size // hop_length, **hps.model)``
    with the version detected from the weights. Entries fedvox cannot build (another residual block
    type, another audio front end) raise :class:`CheckpointError` naming the entry.
    """
    official = manifest("hparams")["s2"][version]
    data = hps.get("data") or {}
    for key, expected in official["data"].items():
        if key in data and key not in ("n_speakers", "add_blank", "cleaned_text") and data[key] != expected:
            raise CheckpointError(
                f"{path}: its config sets data.{key}={data[key]!r}; fedvox's audio front end is GPT-SoVITS's "
                f"official one ({key}={expected!r}), so it cannot feed this model"
            )
    model = hps.get("model") or {}
    if str(model.get("resblock", "1")) != "1":
        raise CheckpointError(
            f"{path}: its config sets model.resblock={model['resblock']!r}; fedvox's HiFi-GAN decoder has "
            "GPT-SoVITS's residual block '1' only"
        )
    base = s2_config(version)
    overrides = {key: _tuple(model[key]) for key in _HPS_MODEL_FIELDS if key in model}
    segment = (hps.get("train") or {}).get("segment_size")
    if segment is not None:
        overrides["segment_frames"] = int(segment) // base.hop_length
    config = replace(base, **overrides)
    return config if config == replace(base, p_dropout=config.p_dropout) else replace(config, name=f"{version}-file")


def _architecture_differences(a: S2Config, b: S2Config) -> list[str]:
    return [
        f.name for f in fields(S2Config) if f.name not in _TRAINING_ONLY and getattr(a, f.name) != getattr(b, f.name)
    ]


def load_discriminator(path: str | Path, config: S2Config | None = None) -> MultiPeriodDiscriminator:
    """Build a discriminator from an official s2D ``.pth``; periods are read from the file."""
    ckpt = read_official(path)
    version = _discriminator_version(ckpt.weight)
    model = MultiPeriodDiscriminator(config or s2_config(version))
    load_official_state(model, ckpt.weight, version)
    return model.float()


# -- export -----------------------------------------------------------------------------------------


def official_hparams(config: S2Config) -> dict[str, Any]:
    """The ``hps`` dict GPT-SoVITS rebuilds ``SynthesizerTrn`` from (``s2*.json`` layout)."""
    official = manifest("hparams")["s2"][config.version]
    model = dict(official["model"])
    model.update({key: _plain(getattr(config, key)) for key in _HPS_MODEL_FIELDS}, version=config.version)
    train = {
        "segment_size": config.segment_samples,
        "c_mel": config.c_mel,
        "c_kl": config.c_kl,
        "text_low_lr_rate": config.text_low_lr_rate,
    }
    return {"train": train, "data": dict(official["data"]), "model": model}


def export_generator(
    model: SynthesizerTrn,
    path: str | Path,
    *,
    info: str = "fedvox",
    half: bool = True,
    include_posterior: bool = False,
) -> None:
    """Write ``model`` as a GPT-SoVITS s2G ``.pth`` (``process_ckpt.savee`` layout).

    Defaults match a fine-tuned export: fp16, no ``enc_q``, v2Pro/v2ProPlus version tag.
    """
    config = model.config
    _require_official_architecture(config)
    weight = {
        key: (tensor.half() if half else tensor.clone()).cpu()
        for key, tensor in to_official(model).items()
        if include_posterior or "enc_q" not in key
    }
    tag = config.version if config.version in TAGGED_VERSIONS else None
    write_torch_file({"weight": weight, "config": official_hparams(config), "info": info}, path, tag)


def export_discriminator(model: MultiPeriodDiscriminator, path: str | Path, *, half: bool = False) -> None:
    """Write ``model`` as a GPT-SoVITS s2D ``.pth`` (``{"weight": state_dict}``)."""
    weight = {k: (v.half() if half else v.clone()).cpu() for k, v in to_official(model).items()}
    write_torch_file({"weight": weight}, path)


def _require_official_architecture(config: S2Config) -> None:
    """Refuse a config whose tensors GPT-SoVITS could not rebuild from the ``hps`` we write."""
    differing = [
        name for name in _architecture_differences(config, s2_config(config.version)) if name not in _HPS_MODEL_FIELDS
    ]
    if differing:
        raise CheckpointError(
            f"the {config.name!r} s2 model is not an official GPT-SoVITS architecture "
            f"({', '.join(differing[:4])} differ from {config.version}), so GPT-SoVITS could not "
            "rebuild it; export it in fedvox's safetensors format instead"
        )


# -- fedvox safetensors -----------------------------------------------------------------------------


def save_model(
    model: SynthesizerTrn | MultiPeriodDiscriminator, path: str | Path, dtype: torch.dtype | None = None
) -> None:
    """Save G or D as safetensors with official key names and the full config as metadata
    (``dtype``: store floating-point tensors in it, e.g. fp16; :func:`load_model` upcasts)."""
    kind = "s2G" if isinstance(model, SynthesizerTrn) else "s2D"
    state = to_official(model)
    if dtype is not None:
        state = {key: t.to(dtype) if t.is_floating_point() else t for key, t in state.items()}
    save_safetensors(state, path, {"format": f"fedvox-{kind}", "config": asdict(model.config)})


def load_model(path: str | Path) -> SynthesizerTrn | MultiPeriodDiscriminator:
    """Rebuild a model written by :func:`save_model` (any config, tiny included)."""
    tensors, meta = load_safetensors(path)
    kind = meta.get("format")
    if kind not in ("fedvox-s2G", "fedvox-s2D"):
        raise CheckpointError(f"{path} is not a fedvox s2 model file (format {kind!r})")
    config = _config_from_dict(meta["config"], path)
    model = SynthesizerTrn(config) if kind == "fedvox-s2G" else MultiPeriodDiscriminator(config)
    load_official_state(model, tensors, config.version)
    return model


def _config_from_dict(values: Mapping[str, Any], path: str | Path) -> S2Config:
    known = {f.name for f in fields(S2Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CheckpointError(f"{path}: unknown s2 config fields {unknown}; written by a newer fedvox?")
    return S2Config(**{k: _tuple(v) for k, v in values.items()})


def _tuple(value: Any) -> Any:
    return tuple(_tuple(v) for v in value) if isinstance(value, list) else value


__all__ = [
    "G_EXPORT_RULES",
    "G_IMPORT_RULES",
    "OfficialCheckpoint",
    "config_from_hparams",
    "detect_version",
    "export_discriminator",
    "export_generator",
    "load_discriminator",
    "load_generator",
    "load_model",
    "load_official_state",
    "official_hparams",
    "read_official",
    "save_model",
    "to_fedvox",
    "to_official",
]
