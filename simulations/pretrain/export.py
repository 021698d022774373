"""Export the pretrained base: each stage's best weights as fp16 safetensors plus their provenance.

``build_model(..., pretrained=<folder>/s1.safetensors | s2G.safetensors)`` loads them (upcast to
fp32; s2's discriminator from the ``s2D`` file beside). fp16 halves the files; each stage must
stay within :data:`MAX_STAGE_BYTES`, the most the repository may carry for a shipped base.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fedvox.shared.atomic import atomic_write_text
from fedvox.shared.errors import CheckpointError, ConfigError
from fedvox.shared.models.factory import build_model, export_fedvox
from fedvox.shared.models.subsets import SubsetSpec
from fedvox.shared.semantic import file_digest
from fedvox.shared.stages import recipe
from fedvox.simulations.pretrain.evaluate import evaluate_speech
from fedvox.simulations.pretrain.pipeline import PROVENANCE, read_provenance, stage_record, utc_now
from fedvox.simulations.pretrain.train import BEST, load_weights, read_state

log = logging.getLogger(__name__)

MAX_STAGE_BYTES = 25 * 1024 * 1024


def export_base(
    out: Path, target: Path, stages: tuple[str, ...] = ("s1", "s2"), which: str = BEST, evaluate: int = 0
) -> dict:
    """Write ``stages``' weights from the pretraining folder ``out`` into ``target``; returns the provenance.

    ``evaluate`` > 0 transcribes that many English validation utterances spoken by the pair as
    it now lies in ``target`` (:mod:`simulations.pretrain.evaluate`: the fp16 files, so a stage
    exported alone is evaluated with the other stage already there) and records the figures.
    """
    provenance = read_provenance(out)
    if "corpus" not in provenance:
        raise ConfigError(f"{out} holds no pretraining provenance; run `fedvox-sim pretrain --out {out}` first")
    target.mkdir(parents=True, exist_ok=True)
    weights: dict[str, dict] = {}
    for stage in stages:
        plan, progress = read_state(out / stage)  # the freshest figures, even while it trains
        provenance.setdefault("stages", {}).setdefault(stage, {}).update(stage_record(plan, progress))
        state, step = load_weights(out / stage, which)
        model = build_model(stage, plan.model_config, SubsetSpec(kind="full"), seed=plan.seed)
        model.load_state_dict(state)
        paths = export_fedvox(stage, model, target, half=True)
        size = sum(p.stat().st_size for p in paths)
        if size > MAX_STAGE_BYTES:
            for p in paths:
                p.unlink()
            limit = MAX_STAGE_BYTES / 2**20
            raise CheckpointError(
                f"the {stage} base takes {size / 2**20:.1f} MiB, over the {limit:.0f} MiB a shipped "
                "stage may take; choose a smaller config"
            )
        for path in paths:
            weights[path.name] = {
                "stage": stage,
                "step": step,
                "sha256": file_digest(path, 64),
                "bytes": path.stat().st_size,
                "dtype": "float16",
            }
        log.info("%s: exported step %d (%.1f MiB)", stage, step, size / 2**20)
    shipped = {**provenance, "exported": utc_now(), "exported_from": which, "weights": weights}
    previous = target / PROVENANCE
    if previous.is_file():  # a stage not re-exported keeps its earlier record
        old = json.loads(previous.read_text(encoding="utf-8"))
        shipped["weights"] = {
            **{k: v for k, v in old.get("weights", {}).items() if v["stage"] not in stages},
            **weights,
        }
        for stage, record in old.get("stages", {}).items():
            if stage not in stages:
                shipped["stages"][stage] = record
    pair = {stage: target / recipe(stage).base_file for stage in ("s1", "s2")}
    if evaluate and all(path.is_file() for path in pair.values()):
        configs = {stage: shipped["stages"][stage]["plan"]["model_config"] for stage in pair}
        s1, s2 = (build_model(s, configs[s], SubsetSpec(kind="full"), pretrained=path) for s, path in pair.items())
        shipped["evaluation"] = evaluate_speech(out / "corpus", s1, s2.generator, evaluate)
    atomic_write_text(previous, json.dumps(shipped, indent=2) + "\n")
    return shipped
