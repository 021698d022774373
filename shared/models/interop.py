"""File-level interop with GPT-SoVITS checkpoints and fedvox's own safetensors files.

GPT-SoVITS writes ``torch.save`` zips. v2Pro/v2ProPlus (and v3/v4 LoRA) exports overwrite the
zip's first two bytes ``PK`` with an ASCII version tag; we restore them in memory before loading
and write them back on export. Loading always uses ``weights_only=True``: a checkpoint is data,
never code. Key renaming between the official layout and fedvox modules is table-driven
(:func:`rename_keys`); each model module owns its table.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedvox.shared.atomic import atomic_path, atomic_write_bytes
from fedvox.shared.errors import CheckpointError

ZIP_MAGIC = b"PK"
VERSION_TAGS: dict[bytes, str] = {
    b"00": "v1",
    b"01": "v2",
    b"02": "v3",
    b"03": "v3-lora",
    b"04": "v4-lora",
    b"05": "v2Pro",
    b"06": "v2ProPlus",
}
TAG_FOR_VERSION = {version: tag for tag, version in VERSION_TAGS.items()}

KeyRules = Sequence[tuple[str, str]]


def read_torch_file(path: str | Path) -> tuple[Any, str | None]:
    """Load a GPT-SoVITS ``.ckpt``/``.pth`` safely; returns ``(object, version_tag or None)``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror}") from exc
    head, tag = raw[:2], None
    if head != ZIP_MAGIC:
        if head not in VERSION_TAGS:
            raise CheckpointError(
                f"{path} is not a PyTorch checkpoint (starts with {head!r}, expected b'PK' or a "
                "GPT-SoVITS version tag b'00'..b'06'); pass an s1 .ckpt or s2 .pth file"
            )
        tag = VERSION_TAGS[head]
        raw = ZIP_MAGIC + raw[2:]
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(
            f"cannot load {path} with weights_only=True ({type(exc).__name__}: {exc}); "
            "the file is corrupt or contains code rather than tensors"
        ) from exc
    return obj, tag


def write_torch_file(obj: Any, path: str | Path, version_tag: str | None = None) -> None:
    """``torch.save`` ``obj`` atomically; with ``version_tag`` overwrite the zip magic like GPT-SoVITS."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    if version_tag is not None:
        try:
            data = TAG_FOR_VERSION[version_tag] + data[2:]
        except KeyError:
            raise CheckpointError(f"unknown GPT-SoVITS version tag {version_tag!r}") from None
    atomic_write_bytes(path, data)


def save_safetensors(
    state: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, Any] | None = None
) -> None:
    """Write a flat tensor dict as safetensors atomically; metadata values are JSON-encoded."""
    meta = {key: json.dumps(value) for key, value in (metadata or {}).items()}
    tensors = {key: value.detach().contiguous().cpu() for key, value in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a fedvox safetensors file; returns ``(tensors, metadata)``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no safetensors file at {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw_meta = fh.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"cannot read safetensors file {path}: {exc}") from exc
    return tensors, {key: json.loads(value) for key, value in raw_meta.items()}


def rename_keys(state: Mapping[str, Any], rules: KeyRules) -> dict[str, Any]:
    """Rename every key by the first rule ``(pattern, replacement)`` whose pattern fully matches.

    Keys no rule matches keep their name. Patterns are regular expressions; replacements use
    ``\\1``/``\\g<name>`` group references.
    """
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]
    renamed: dict[str, Any] = {}
    for key, value in state.items():
        new_key = key
        for pattern, replacement in compiled:
            match = pattern.fullmatch(key)
            if match:
                new_key = match.expand(replacement)
                break
        if new_key in renamed:
            raise CheckpointError(f"key rename collision: two keys map to {new_key!r}")
        renamed[new_key] = value
    return renamed


@cache
def manifest(name: str) -> dict[str, Any]:
    """The official state-dict manifest ``name`` (e.g. ``"s1_v2"``, ``"s2G_v2Pro"``, ``"s2D_v2"``).

    Manifests list every key, shape and kind of the released checkpoints (GPT-SoVITS @ 48b1a01);
    see ``manifests/README.md``.
    """
    try:
        text = resources.files("fedvox.shared.models").joinpath("manifests", f"{name}.json").read_text()
    except FileNotFoundError:
        raise CheckpointError(f"no official manifest called {name!r}") from None
    return json.loads(text)


def random_official_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with exactly the official keys and shapes of manifest ``name``, random values.

    Stands in for released weights we cannot download: tests build official-format files from it.
    """
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, spec in manifest(name)["tensors"].items():
        shape = spec["shape"]
        if key.endswith("_codebook.inited"):
            state[key] = torch.ones(shape)
        elif key.endswith("_codebook.cluster_size"):
            state[key] = torch.rand(shape, generator=generator) + 1.0
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.zeros(shape, dtype=torch.long)
        elif key.endswith("running_var") or key.endswith("weight_g"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.02
    return state
