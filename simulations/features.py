"""The simulated speakers' prepared features, as each client and the evaluator see them.

``prepare_speakers`` runs ``fedvox-client prepare`` (:func:`client.data.prepare.prepare`) once
per client on its training list, and once on each held-out list, into a features folder that no
run trains on. Every run then gets its own client folders made by :func:`clone_cache`: the
feature files hard-linked (never copied twice, never written: the cache replaces files, it
does not modify them) but a fresh identity and privacy ledger, so runs of one scenario do not
share budgets.

Layout::

    features/clients/client-<p>   training cache of client p (the manifest's p-th client)
    features/heldout-seen         every client's held-out utterances
    features/heldout-unseen       the unseen speakers' utterances
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from fedvox.client.data.cache import FeatureCache
from fedvox.client.data.prepare import prepare
from fedvox.client.stages import client_stage
from fedvox.shared.atomic import atomic_write_bytes
from fedvox.shared.cli import progress
from fedvox.shared.errors import ConfigError, DataError
from fedvox.shared.semantic import tokenizer_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeakerData:
    """Prepared caches of a speaker set, in partition order."""

    speakers_root: Path
    clients: tuple[str, ...]  # speaker names; partition p is clients[p]
    client_caches: tuple[Path, ...]
    seen: Path
    unseen: Path | None


def client_speakers(manifest: dict) -> list[dict]:
    """The manifest's client speakers, in partition order."""
    return [s for s in manifest["speakers"] if s["role"] == "client"]


def read_manifest(speakers_root: Path) -> dict:
    """A complete ``fedvox-sim speakers`` manifest, or a :class:`ConfigError` saying what to do."""
    path = speakers_root / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"no speakers output at {speakers_root} ({exc}); run `fedvox-sim speakers` first") from None
    if not manifest.get("complete"):
        raise ConfigError(f"the speakers output in {speakers_root} is incomplete; run `fedvox-sim speakers` again")
    return manifest


def prepare_speakers(speakers_root: Path, n_clients: int, out: Path, symbols_version: str) -> SpeakerData:
    """Prepare the first ``n_clients`` clients and the held-out lists under ``out`` (resumable)."""
    manifest = read_manifest(speakers_root)
    clients = client_speakers(manifest)
    if n_clients > len(clients):
        raise ConfigError(
            f"{speakers_root} holds {len(clients)} client speakers, fewer than the {n_clients} asked for; "
            "generate more with `fedvox-sim speakers` or ask for fewer"
        )
    jobs = [
        (speakers_root / s["train"]["list"], out / "clients" / f"client-{p}") for p, s in enumerate(clients[:n_clients])
    ]
    seen_list = speakers_root / manifest["lists"]["heldout_seen"]
    unseen_list = speakers_root / manifest["lists"]["heldout_unseen"]
    jobs.append((seen_list, out / "heldout-seen"))
    has_unseen = unseen_list.is_file() and unseen_list.stat().st_size > 0
    if has_unseen:
        jobs.append((unseen_list, out / "heldout-unseen"))
    spec = tokenizer_spec()
    with progress() as bar:
        task = bar.add_task("preparing features", total=len(jobs))
        for list_file, cache in jobs:
            report = prepare(list_file, cache, tokenizer=spec, symbols_version=symbols_version, show_progress=False)
            if report.accepted == 0:
                raise DataError(f"prepare accepted none of {list_file}; see {cache / 'report.txt'}")
            bar.advance(task)
    return SpeakerData(
        speakers_root=speakers_root,
        clients=tuple(s["name"] for s in clients[:n_clients]),
        client_caches=tuple(cache for _, cache in jobs[:n_clients]),
        seen=out / "heldout-seen",
        unseen=out / "heldout-unseen" if has_unseen else None,
    )


def clone_cache(source: Path, target: Path) -> Path:
    """A client data folder at ``target`` holding ``source``'s features, without its identity or ledger."""
    index = FeatureCache(source).read_index()  # refuses an incomplete cache
    items = target / "items"
    items.mkdir(parents=True, exist_ok=True)
    for item in index.items:
        src, dst = FeatureCache(source).item_path(item.id), FeatureCache(target).item_path(item.id)
        if not dst.exists():
            try:
                os.link(src, dst)
            except OSError:  # another file system: copy
                shutil.copy2(src, dst)
    atomic_write_bytes(target / "index.json", (source / "index.json").read_bytes())
    return target


def heldout_by_speaker(stage: str, cache: Path | None) -> dict[str, Dataset]:
    """One dataset per speaker of a held-out cache (empty without one)."""
    if cache is None:
        return {}
    items = FeatureCache(cache).read_index().items
    kind = client_stage(stage).dataset
    speakers = sorted({item.speaker for item in items})
    sets = {s: kind(cache, [item for item in items if item.speaker == s]) for s in speakers}
    return {s: d for s, d in sets.items() if len(d)}


__all__ = ["SpeakerData", "client_speakers", "clone_cache", "heldout_by_speaker", "prepare_speakers", "read_manifest"]
