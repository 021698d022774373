"""s1 checkpoints: GPT-SoVITS ``.ckpt`` import/export and fedvox's own safetensors files.

A GPT-SoVITS s1 ``.ckpt`` is ``{"weight": state_dict, "config": yaml dict, "info": str}`` with
every key prefixed ``model.`` (the decoder sits inside a Lightning module) and each layer's
query/key/value projections packed into ``self_attn.in_proj_weight``/``in_proj_bias`` in the
order q, k, v. GPT-SoVITS rebuilds the model from ``config`` and loads ``weight`` strictly, so an
export must carry exactly the official keys, in order, and a config in the official yaml layout.
Values are only split, joined and cast, so import followed by export is bit-exact.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedvox.shared.errors import CheckpointError
from fedvox.shared.models.config import CONFIG_NAMES, S1Config, s1_config
from fedvox.shared.models.interop import (
    load_safetensors,
    read_torch_file,
    rename_keys,
    save_safetensors,
    write_torch_file,
)
from fedvox.shared.models.lora import LoRALayer
from fedvox.shared.models.s1 import Text2SemanticDecoder
from fedvox.shared.models.subsets import merged_state_dict

log = logging.getLogger(__name__)

OFFICIAL_PREFIX = "model."
QKV = ("q", "k", "v")
SYMBOLS_FOR_VOCAB = {512: "v1", 732: "v2"}
"""Phoneme-embedding rows of the official yamls -> symbol table (v1: 322 symbols in 512 rows)."""

_TO_FEDVOX = [(r"ar_(text|audio)_embedding\.word_embeddings\.weight", r"ar_\1_embedding.weight")]
_TO_OFFICIAL = [(r"ar_(text|audio)_embedding\.weight", r"ar_\1_embedding.word_embeddings.weight")]
_PACKED = "self_attn.in_proj_"  # + "weight" | "bias"

# Sections of s1longer-v2.yaml that GPT-SoVITS inference does not read, kept so the exported
# config has the official layout.
_YAML_TRAIN = {
    "seed": 1234,
    "epochs": 20,
    "batch_size": 8,
    "save_every_n_epoch": 1,
    "precision": "16-mixed",
    "gradient_clip": 1.0,
}
_YAML_OPTIMIZER = {
    "lr": 0.01,
    "lr_init": 1e-5,
    "lr_end": 1e-4,
    "warmup_steps": 2000,
    "decay_steps": 40000,
}


# ---------------------------------------------------------------------- key mapping
def official_to_fedvox(weight: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official ``.ckpt`` ``weight`` dict -> fedvox state dict (prefix dropped, q/k/v split)."""
    state: dict[str, torch.Tensor] = {}
    for key, tensor in weight.items():
        name = key.removeprefix(OFFICIAL_PREFIX)
        layer, packed, kind = name.partition(_PACKED)
        if packed:
            for part, chunk in zip(QKV, tensor.chunk(3, dim=0), strict=True):
                state[f"{layer}self_attn.{part}_proj.{kind}"] = chunk.clone()
        else:
            state[name] = tensor
    return rename_keys(state, _TO_FEDVOX)


def fedvox_to_official(state: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """fedvox state dict -> official ``weight`` dict, in GPT-SoVITS's key order."""
    renamed = rename_keys(state, _TO_OFFICIAL)
    weight: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, tensor in renamed.items():
        layer, projection, kind = name.partition("self_attn.q_proj.")
        if projection:
            weight[f"{OFFICIAL_PREFIX}{layer}{_PACKED}{kind}"] = torch.cat(
                [renamed[f"{layer}self_attn.{part}_proj.{kind}"] for part in QKV], dim=0
            )
        elif ".self_attn.k_proj." not in name and ".self_attn.v_proj." not in name:
            weight[OFFICIAL_PREFIX + name] = tensor
    return weight


# ---------------------------------------------------------------------- configs
def official_config(config: S1Config) -> dict[str, Any]:
    """The ``config`` entry of an official ``.ckpt`` (``s1longer*.yaml`` layout) for ``config``."""
    return {
        "train": dict(_YAML_TRAIN),
        "optimizer": dict(_YAML_OPTIMIZER),
        "data": {
            "max_eval_sample": 8,
            "max_sec": config.max_sec,
            "num_workers": 4,
            "pad_val": config.eos,
        },
        "model": {
            "vocab_size": config.semantic_vocab,
            "phoneme_vocab_size": config.phoneme_vocab_size,
            "embedding_dim": config.dim,
            "hidden_dim": config.dim,
            "head": config.heads,
            "linear_units": config.ffn_dim,
            "n_layer": config.layers,
            "dropout": 0,
            "EOS": config.eos,
            "random_bert": 0,
        },
        "inference": {"top_k": config.top_k},
    }


def config_from_official(yaml_config: Mapping[str, Any]) -> S1Config:
    """The :class:`S1Config` an official yaml dict describes (named after the matching preset)."""
    try:
        model = yaml_config["model"]
        vocab = int(model["phoneme_vocab_size"])
        fields: dict[str, Any] = {
            "phoneme_vocab_size": vocab,
            "dim": int(model["hidden_dim"]),
            "heads": int(model["head"]),
            "layers": int(model["n_layer"]),
            "ffn_dim": 4 * int(model["hidden_dim"]),  # GPT-SoVITS ignores linear_units
            "semantic_vocab": int(model["vocab_size"]),
            "eos": int(model["EOS"]),
            "max_sec": int(yaml_config.get("data", {}).get("max_sec", 54)),
            "top_k": int(yaml_config.get("inference", {}).get("top_k", 15)),
        }
        embedding_dim = int(model["embedding_dim"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint config has no usable 'model' section ({exc!r})") from None
    if embedding_dim != fields["dim"]:
        raise CheckpointError(f"checkpoint config has embedding_dim {embedding_dim} != hidden_dim {fields['dim']}")
    if vocab not in SYMBOLS_FOR_VOCAB:
        raise CheckpointError(
            f"checkpoint config has phoneme_vocab_size {vocab}; fedvox's text frontend knows "
            f"{sorted(SYMBOLS_FOR_VOCAB)} (GPT-SoVITS v1 and v2 symbol tables)"
        )
    fields["symbols_version"] = SYMBOLS_FOR_VOCAB[vocab]
    for name in CONFIG_NAMES:
        preset = s1_config(name)
        if all(getattr(preset, key) == value for key, value in fields.items()):
            return preset
    return S1Config(name="custom", **fields)


def official_shapes(config: S1Config) -> dict[str, tuple[int, ...]]:
    """Official key -> shape for ``config`` (computed on the meta device, no memory)."""
    with torch.device("meta"):
        state = Text2SemanticDecoder(config).state_dict()
    return {key: tuple(t.shape) for key, t in fedvox_to_official(state).items()}


# ---------------------------------------------------------------------- official .ckpt
def read_official_s1(
    path: str | Path,
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, str | None]:
    """``(weight, yaml config or None, info or None)`` of a GPT-SoVITS s1 ``.ckpt``."""
    obj, _ = read_torch_file(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a GPT-SoVITS s1 checkpoint dict")
    weight = obj.get("weight", obj.get("state_dict"))  # exported .ckpt, or a Lightning training ckpt
    if not isinstance(weight, Mapping) or not all(isinstance(t, torch.Tensor) for t in weight.values()):
        raise CheckpointError(
            f"{path} has no 'weight' tensor dict (keys: {sorted(obj)[:6]}); pass a GPT-SoVITS s1 "
            "(GPT) .ckpt such as s1bert25hz-5kh-longer-epoch=12-step=369668.ckpt"
        )
    if any(key.startswith(("enc_p.", "dec.", "flow.", "discriminators.")) for key in weight):
        raise CheckpointError(f"{path} is a SoVITS (s2) checkpoint; s1 needs a GPT .ckpt")
    config = obj.get("config")
    info = obj.get("info")
    return (
        dict(weight),
        (dict(config) if isinstance(config, Mapping) else None),
        (str(info) if info is not None else None),
    )


def load_official_s1(path: str | Path, config: S1Config | None = None) -> Text2SemanticDecoder:
    """Build a decoder from a GPT-SoVITS s1 ``.ckpt`` and load it strictly (float32 parameters).

    ``config`` defaults to the one the file describes (its yaml ``config``, else its shapes).
    """
    weight, yaml_config, _ = read_official_s1(path)
    if config is None:
        config = config_from_official(yaml_config) if yaml_config is not None else _config_from_shapes(weight, path)
    _check_official_keys(weight, config, path)
    model = _build(config, official_to_fedvox(weight))
    log.info("loaded GPT-SoVITS s1 checkpoint %s (config %s)", path, config.name)
    return model


def load_official_s1_into(model: Text2SemanticDecoder, path: str | Path) -> None:
    """Load a GPT-SoVITS s1 ``.ckpt`` into an existing decoder, strictly, before ``apply_subset``.

    The file must match ``model.config``; the error names the config that would fit.
    """
    if any(isinstance(module, LoRALayer) for module in model.modules()):
        raise CheckpointError(
            f"cannot load {path} into a model with LoRA adapters; load the pretrained weights "
            "first, then apply the trainable subset"
        )
    weight, _, _ = read_official_s1(path)
    _check_official_keys(weight, model.config, path)
    model.load_state_dict(official_to_fedvox(weight), strict=True)
    log.info("loaded GPT-SoVITS s1 checkpoint %s into config %s", path, model.config.name)


def save_official_s1(
    model: Text2SemanticDecoder,
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float16,
    info: str = "fedvox",
    yaml_config: Mapping[str, Any] | None = None,
) -> None:
    """Write ``model`` (LoRA merged) as a GPT-SoVITS s1 ``.ckpt`` in ``dtype`` (official: fp16).

    ``yaml_config`` is the imported file's config, to keep it unchanged; by default it is derived
    from ``model.config``.
    """
    weight = OrderedDict((k, t.to(dtype)) for k, t in fedvox_to_official(merged_state_dict(model)).items())
    config = dict(yaml_config) if yaml_config is not None else official_config(model.config)
    write_torch_file({"weight": weight, "config": config, "info": info}, path)


# ---------------------------------------------------------------------- fedvox safetensors
def save_s1_safetensors(model: Text2SemanticDecoder, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write ``model`` (LoRA merged, fedvox key names) and its config as safetensors."""
    state = merged_state_dict(model)
    if dtype is not None:
        state = {key: t.to(dtype) if t.is_floating_point() else t for key, t in state.items()}
    save_safetensors(state, path, metadata={"stage": "s1", "config": model.config.to_dict()})


def load_s1_safetensors(path: str | Path) -> Text2SemanticDecoder:
    """Rebuild the decoder saved by :func:`save_s1_safetensors` (float32 parameters)."""
    state, metadata = load_safetensors(path)
    if metadata.get("stage") != "s1" or not isinstance(metadata.get("config"), dict):
        raise CheckpointError(
            f"{path} is not a fedvox s1 model file (stage {metadata.get('stage')!r}); "
            "write one with save_s1_safetensors"
        )
    try:
        config = S1Config(**metadata["config"])
    except TypeError as exc:
        raise CheckpointError(f"{path} has an s1 config this fedvox version cannot read: {exc}") from None
    _check_fedvox_keys(config, state, path)
    return _build(config, state)


# ---------------------------------------------------------------------- checks
def _check_official_keys(weight: Mapping[str, torch.Tensor], config: S1Config, path: str | Path) -> None:
    expected = official_shapes(config)
    missing = [key for key in expected if key not in weight]
    unexpected = [key for key in weight if key not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match s1 config {config.name!r}: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); "
            f"{_suggest_config(weight)}"
        )
    for key, shape in expected.items():
        found = tuple(weight[key].shape)
        if found != shape:
            raise CheckpointError(
                f"{path}: {key} has shape {found}, config {config.name!r} expects {shape}; {_suggest_config(weight)}"
            )


def _config_from_shapes(weight: Mapping[str, torch.Tensor], path: str | Path) -> S1Config:
    for name in CONFIG_NAMES:
        config = s1_config(name)
        if _shapes_match(weight, config):
            return config
    raise CheckpointError(
        f"{path} has no 'config' entry and its shapes match none of the s1 configs "
        f"{', '.join(CONFIG_NAMES)}; pass config= explicitly"
    )


def _suggest_config(weight: Mapping[str, torch.Tensor]) -> str:
    matching = [name for name in CONFIG_NAMES if _shapes_match(weight, s1_config(name))]
    if matching:
        return f"use config {matching[0]!r}"
    return (
        f"no s1 config ({', '.join(CONFIG_NAMES)}) matches this file; pass a GPT-SoVITS s1 "
        ".ckpt exported by GPT-SoVITS or fedvox"
    )


def _shapes_match(weight: Mapping[str, torch.Tensor], config: S1Config) -> bool:
    expected = official_shapes(config)
    return expected.keys() == weight.keys() and all(
        tuple(weight[key].shape) == shape for key, shape in expected.items()
    )


def _check_fedvox_keys(config: S1Config, state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    with torch.device("meta"):
        expected = Text2SemanticDecoder(config).state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match s1 config {config.name!r}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for key, tensor in expected.items():
        if tensor.shape != state[key].shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(state[key].shape)}, config {config.name!r} "
                f"expects {tuple(tensor.shape)}"
            )


def _build(config: S1Config, state: Mapping[str, torch.Tensor]) -> Text2SemanticDecoder:
    """A float32 decoder holding ``state`` (checked beforehand), skipping random initialisation."""
    with torch.device("meta"):
        model = Text2SemanticDecoder(config)
    model.load_state_dict({key: t.float() for key, t in state.items()}, strict=True, assign=True)
    return model


__all__ = [
    "config_from_official",
    "fedvox_to_official",
    "load_official_s1",
    "load_official_s1_into",
    "load_s1_safetensors",
    "official_config",
    "official_shapes",
    "official_to_fedvox",
    "read_official_s1",
    "save_official_s1",
    "save_s1_safetensors",
]
