"""``fedvox-sim pretrain``: corpus, features, then each stage's training, with a provenance file.

Layout of ``out`` (outside the repository: hours of state that a later session may continue)::

    corpus/              the public synthetic corpus (:mod:`simulations.pretrain.corpus`)
    features/train       feature caches of its training and validation lists (``prepare``)
    features/valid
    s1/state.pt, s1/best.pt, s2/...   resumable training state and the best weights so far
    provenance.json      command, seeds, corpus summary, code version, per-stage steps and losses

Every step is resumable: re-running the same command after a kill (even ``kill -9``) reuses the
finished corpus and features and continues training from the last checkpoint.
"""

from __future__ import annotations

import datetime
import json
import logging
import platform
import shlex
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from fedvox.client.data.prepare import prepare
from fedvox.shared.atomic import atomic_write_text
from fedvox.shared.errors import DataError
from fedvox.shared.semantic import tokenizer_spec
from fedvox.shared.stages import recipe
from fedvox.simulations.pretrain.corpus import CorpusConfig, generate_corpus
from fedvox.simulations.pretrain.train import StagePlan, TrainState, train_stage

log = logging.getLogger(__name__)

PROVENANCE = "provenance.json"
SYMBOLS_VERSION = "v2"


def pretrain(
    out: Path,
    corpus: CorpusConfig,
    plans: list[StagePlan],
    *,
    device: str | None = None,
    checkpoint_seconds: float = 300.0,
) -> dict:
    """Build (or continue) the corpus, its features and each planned stage; returns the provenance."""
    out = Path(out).absolute()
    manifest = generate_corpus(out / "corpus", corpus)
    caches = prepare_features(out)
    chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    log.info("pretraining on %s with %d thread(s)", chosen, torch.get_num_threads())
    provenance = read_provenance(out)
    provenance.update(_header(manifest, corpus, chosen))
    command = portable_command(sys.argv, out)
    for plan in plans:

        def checkpointed(state: TrainState, plan: StagePlan = plan) -> None:
            # Another stage may train in another process: merge into the file's current content.
            current = read_provenance(out)
            current.update({k: v for k, v in provenance.items() if k != "stages"})
            record = current.setdefault("stages", {}).setdefault(plan.stage, {})
            commands = record.setdefault("commands", [])
            if command not in commands:
                commands.append(command)
            record.update(stage_record(plan, state))
            current["updated"] = utc_now()
            atomic_write_text(out / PROVENANCE, json.dumps(current, indent=2) + "\n")
            provenance.update(current)

        state = train_stage(
            plan,
            caches["train"],
            caches["valid"],
            out / plan.stage,
            chosen,
            checkpoint_seconds,
            on_checkpoint=checkpointed,
        )
        checkpointed(state)
    return provenance


def portable_command(argv: list[str], out: Path) -> str:
    """The command line as run, with the state folder written ``OUT``: the provenance ships inside
    fedvox and must not name a folder of the machine that trained it."""
    words = [Path(argv[0]).name]
    for word in argv[1:]:
        flag, equals, value = word.rpartition("=") if word.startswith("--") else ("", "", word)
        words.append(f"{flag}{equals}OUT" if Path(value).absolute() == out else word)
    return shlex.join(words)


def prepare_features(out: Path) -> dict[str, Path]:
    """Feature caches of the corpus's two lists (prepare resumes and skips what is cached)."""
    caches = {}
    for split in ("train", "valid"):
        cache = out / "features" / split
        report = prepare(
            out / "corpus" / f"{split}.list", cache, tokenizer=tokenizer_spec(), symbols_version=SYMBOLS_VERSION
        )
        if report.accepted == 0:
            raise DataError(f"prepare accepted none of the corpus's {split} list; see {cache / 'report.txt'}")
        caches[split] = cache
    return caches


def stage_record(plan: StagePlan, state: TrainState) -> dict:
    """The provenance of one stage: its plan, config, steps, time, losses and evaluations."""
    config = recipe(plan.stage).config(plan.model_config)
    return {
        "plan": asdict(plan),
        "config": config.to_dict(),
        "steps_done": state.step,
        "train_seconds": round(state.seconds, 1),
        "best": state.best,
        "last": state.history[-1] if state.history else None,
        "history": state.history,
    }


def read_provenance(out: Path) -> dict:
    path = out / PROVENANCE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"generator": "fedvox-sim pretrain"}


def code_version() -> dict:
    """The git commit of the fedvox checkout this runs from, and whether it had local changes."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    return {"git_commit": commit or "unknown (not a git checkout)", "dirty": bool(git("status", "--porcelain"))}


def _header(manifest: dict, corpus: CorpusConfig, device: torch.device) -> dict:
    totals = manifest["totals"]
    return {
        "code": code_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "host": platform.node(),
        "seeds": {"corpus": corpus.seed},
        "started": utc_now(),
        "corpus": {
            "config": manifest["config"],
            "engines": manifest["engines"],
            "held_out": manifest["held_out"],
            "voices": len(manifest["voices"]),
            "voices_by_language": {
                lang: sum(v["language"] == lang for v in manifest["voices"]) for lang in ("en", "zh")
            },
            "totals": totals,
            "text_source": manifest["text_source"],
        },
        "features": {"tokenizer": tokenizer_spec().name, "symbols_version": SYMBOLS_VERSION},
    }


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
