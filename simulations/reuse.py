"""Baselines and scores reused across runs on the same speakers, keyed by everything they depend on.

A local-only or centralised baseline is a function of its training features, the held-out
features it is scored on, the base weights, its own settings (the run configuration minus what
only the federation reads, its steps, device profile, batch and seed) and fedvox's code; the
speech-quality scores of a model are a function of the model, the test items and the seed. Each
gets a key, the SHA-256 of all of these, and is kept under ``OUT/reuse/<key>/`` once done: a later
run in the same simulation folder whose key matches (another run of a scenario, say one that
changes only the aggregation, or the same command again) copies the trained baseline into its own
folder instead of training, and reuses the scores instead of synthesising; the report says which
were reused. Any change of features, base, setting, seed or code gives another key.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from fedvox.shared.atomic import atomic_write_text
from fedvox.shared.models.factory import pretrained_file
from fedvox.shared.runconfig import RunConfig
from fedvox.shared.semantic import file_digest

FOLDER = "reuse"
RESULT = "result.json"
TRAINED = "trained"
PACKAGES = ("shared", "client", "server", "simulations")

FEDERATION_ONLY = frozenset(
    {
        "num-server-rounds",  # a job's ``rounds``, in its key
        "clients-per-round",
        "min-clients",
        "wire-precision",
        "update-encoding",
        "aggregation",
        "proximal-mu",
        "trim-fraction",
        "server-learning-rate",
        "server-step",
        "max-update-norm",
        "checkpoint-dir",
        "keep-checkpoints",
        "data-root",
        "round-timeout",
        "max-misses",
        "evaluate",
    }
)
"""Run settings no baseline reads (the server's, the wire's, the run's folders): left out of a
baseline's reuse key, so runs that differ only in them share their baselines.
Every other setting is in the key, including any added later."""


def settings(config: RunConfig, *, private: bool = True, training: bool = True) -> dict[str, Any]:
    """The run settings a baseline or a model's voice can depend on: all but :data:`FEDERATION_ONLY`
    and speaker-level DP; without ``private``, no utterance-level DP settings (the centralised
    baseline); without ``training``, no optimiser settings either (a voice: its trainable state
    is in its key)."""
    out = {}
    for name, value in config.to_flat().items():
        if name in FEDERATION_ONLY or name.startswith("speaker-dp."):
            continue
        if not private and (name.startswith("dp.") or name in ("logical-batch", "client-budget-epsilon")):
            continue
        if not training and name in ("learning-rate", "local-steps"):
            continue
        out[name] = value
    return out


def _hash_files(digest: Any, root: Path, files: Iterable[Path]) -> None:
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)


@lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 of fedvox's Python sources: edited code never reuses what older code made."""
    import importlib

    digest = hashlib.sha256()
    for package in PACKAGES:
        root = Path(importlib.import_module(f"fedvox.{package}").__file__ or "").parent
        _hash_files(digest, root, root.rglob("*.py"))
    return digest.hexdigest()


@lru_cache(maxsize=64)
def features_digest(cache: Path | None) -> str:
    """SHA-256 of a feature cache's index and items (not of a clone's identity or ledger)."""
    if cache is None:
        return ""
    digest = hashlib.sha256()
    _hash_files(digest, cache, [cache / "index.json", *(p for p in (cache / "items").rglob("*") if p.is_file())])
    return digest.hexdigest()


@lru_cache(maxsize=1024)
def _file_digest(path: Path) -> str:
    """A file's SHA-256, once per process (test items share their speaker's recordings)."""
    return file_digest(path, 64)


def base_digest(config: RunConfig) -> dict[str, str]:
    """SHA-256 of the base weights of both stages (what training starts from and what speaks)."""
    from fedvox.simulations.sample import partner_pretrained, partner_stage

    sources = {config.stage: config.pretrained or None, partner_stage(config): partner_pretrained(config)}
    out = {}
    for stage, pretrained in sources.items():
        path = pretrained_file(stage, config.model_config, pretrained)
        out[stage] = _file_digest(path.resolve()) if path is not None else "seeded"
    return out


def state_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 of a trainable state's names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def key(parts: Mapping[str, Any]) -> str:
    """The key of ``parts`` (JSON-able), with the code and package version added."""
    from importlib.metadata import version

    document = {**parts, "code": code_digest(), "fedvox": version("fedvox")}
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()[:32]


def items_digest(items: Sequence[Any]) -> str:
    """SHA-256 of speech-quality test items: their keys, texts, and recordings' bytes."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.key}|{item.language}|{item.text}|{item.prompt_text}\0".encode())
        for path in (item.recording, item.prompt, *item.voice):
            digest.update(_file_digest(Path(path).resolve()).encode())
    return digest.hexdigest()


class Store:
    """``OUT/reuse/``: one folder per key, written whole or not at all."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def result(self, name: str) -> dict[str, Any] | None:
        path = self.root / name / RESULT
        return json.loads(path.read_text()) if path.is_file() else None

    def trained(self, name: str) -> Path:
        return self.root / name / TRAINED

    def keep(self, name: str, result: Mapping[str, Any], trained: Path | None = None) -> None:
        """Keep ``result`` (and a copy of the folder ``trained``) under ``name``; a kept key stays."""
        final = self.root / name
        if final.is_dir():
            return
        staging = self.root / f".{name}.{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        if trained is not None:
            shutil.copytree(trained, staging / TRAINED)
        atomic_write_text(staging / RESULT, json.dumps(result, indent=1, default=str) + "\n")
        try:
            staging.rename(final)
        except OSError:  # another process kept the same key first
            shutil.rmtree(staging, ignore_errors=True)

    def restore(self, name: str, target: Path) -> None:
        """Copy the kept folder of ``name`` to ``target`` (replacing what is there)."""
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(self.trained(name), target)


__all__ = [
    "FEDERATION_ONLY",
    "FOLDER",
    "Store",
    "base_digest",
    "code_digest",
    "features_digest",
    "items_digest",
    "key",
    "settings",
    "state_digest",
]
