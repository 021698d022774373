"""Which s2 parameters should fine-tuning train? Held-out mel change per transmitted byte, on the base.

    python -m bench.s2_subsets --base out/pretrain/export/s2G.safetensors --steps 20
    python -m bench.s2_subsets --base out/pretrain/s2/best.pt --config base

One simulated speaker (``fedvox-sim speakers``, never in the pretraining corpus) is prepared; each
candidate subset of the pretrained generator is fine-tuned on its training utterances for
``--steps`` plain (non-private) steps on the reconstruction losses (mel L1 + KL), with the same
batches, and the speaker's held-out mel L1 is measured before and after. A subset that cannot
reach the voice (the decoder and speaker conditioning frozen) barely moves it. Figures per
candidate: the drop in held-out mel loss, the trainable parameters, the bytes one fp16 update
transmits, the drop per MB, and the drop per sqrt(parameters) (DP noise of a fixed multiplier
grows with the square root of the dimension). Prints one JSON object and a table.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import typer

from fedvox.client.data.datasets import S2Dataset
from fedvox.client.data.prepare import prepare
from fedvox.client.stages.s2 import S2Task
from fedvox.shared.cli import run_cli
from fedvox.shared.models.factory import SoVITSPair, build_model
from fedvox.shared.models.subsets import SubsetSpec, apply_subset
from fedvox.shared.semantic import tokenizer_spec
from fedvox.simulations.pretrain.train import StagePlan, _step, evaluate
from fedvox.simulations.speakers import SpeakersConfig, generate_speakers

app = typer.Typer(add_completion=False)

DECODER_INPUT = (r"dec\.(conv_pre|cond)",)
DECODER_BLOCKS = (r"dec\.resblocks\.\d+\.convs[12]\.\d+",)
STYLE = (r"ref_enc\.(spectral\.\d+\.linear|temporal\.\d+\.conv1\.conv|fc)(\.fc)?",)
ORIGINAL_TARGETS = (
    r"enc_p\.(encoder_ssl|encoder_text|encoder2)\.attn_layers\.\d+\.conv_[qkvo]",
    r"enc_p\.(encoder_ssl|encoder_text|encoder2)\.ffn_layers\.\d+\.conv_[12]",
    r"enc_p\.mrte\.(cross_attention\.conv_[qkvo]|c_pre|text_pre|c_post)",
    r"flow\.flows\.\d+\.(pre|post|enc\.(cond_layer|in_layers\.\d+|res_skip_layers\.\d+))",
)
CANDIDATES: dict[str, tuple[SubsetSpec, tuple[str, ...] | None]] = {
    "lora: text side + flow (before)": (SubsetSpec("lora"), ORIGINAL_TARGETS),
    "lora: + decoder input and speaker conditioning": (SubsetSpec("lora"), ORIGINAL_TARGETS + DECODER_INPUT),
    "lora: + decoder input + decoder blocks": (SubsetSpec("lora"), ORIGINAL_TARGETS + DECODER_INPUT + DECODER_BLOCKS),
    "lora: decoder input + decoder blocks only": (SubsetSpec("lora"), DECODER_INPUT + DECODER_BLOCKS),
    "groups: ref_enc (style encoder)": (SubsetSpec("groups", groups=("ref_enc",)), None),
    "groups: decoder": (SubsetSpec("groups", groups=("decoder",)), None),
    "full": (SubsetSpec("full"), None),
}


def _speaker_caches(folder: Path, utterances: int) -> tuple[Path, Path]:
    generate_speakers(
        folder / "speakers",
        SpeakersConfig(
            n_speakers=1,
            utterances=utterances,
            heldout_utterances=4,
            unseen_speakers=0,
            language="en",
            seed=7,
            workers=1,
        ),
    )
    caches = []
    for split, name in (("train", "train.list"), ("heldout", "heldout_seen.list")):
        cache = folder / split
        prepare(
            folder / "speakers" / name,
            cache,
            tokenizer=tokenizer_spec(),
            symbols_version="v2",
            workers=1,
            show_progress=False,
        )
        caches.append(cache)
    return caches[0], caches[1]


def _build(base: str, config: str, spec: SubsetSpec, targets: tuple[str, ...] | None) -> SoVITSPair:
    """The pretrained pair with ``spec`` applied to its generator (LoRA on ``targets`` when given)."""
    pair = build_model("s2", config, SubsetSpec("full"), pretrained=None if base.endswith(".pt") else base)
    if base.endswith(".pt"):
        pair.load_state_dict(torch.load(base, map_location="cpu", weights_only=False)["model"])
    if targets is not None:
        pair.generator.lora_targets = lambda: targets  # this candidate's targets, on this instance only
    apply_subset(pair.generator, spec)
    return pair


@app.command()
def main(
    base: str = typer.Option(..., "--base", help="An exported s2G.safetensors or a pretrain best.pt."),
    config: str = typer.Option("base", "--config"),
    steps: int = typer.Option(30, "--steps"),
    batch_size: int = typer.Option(4, "--batch-size"),
    learning_rate: float = typer.Option(1e-3, "--lr"),
    utterances: int = typer.Option(16, "--utterances"),
    threads: int = typer.Option(1, "--threads"),
) -> None:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        train_cache, heldout_cache = _speaker_caches(Path(tmp), utterances)
        train, heldout = S2Dataset(train_cache), S2Dataset(heldout_cache)
        plan = StagePlan(
            "s2",
            model_config=config,
            steps=steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            warmup=1,
            disc_start=steps,
        )
        indices = torch.arange(len(heldout))
        rows = {}
        for name, (spec, targets) in CANDIDATES.items():
            pair = _build(base, config, spec, targets)
            task = S2Task(pair, train, torch.device("cpu"))
            optimizers = {"generator": task.optimizer("generator", pair.generator, learning_rate)}
            optimizers["discriminator"] = task.optimizer("discriminator", pair.discriminator, learning_rate)
            before = evaluate(task, heldout, indices)["mel"]
            for step in range(steps):
                _step(task, optimizers, plan, step, len(train))
            after = evaluate(task, heldout, indices)["mel"]
            params = sum(p.numel() for p in pair.generator.parameters() if p.requires_grad)
            rows[name] = {
                "mel_before": before,
                "mel_after": after,
                "drop": round(before - after, 4),
                "parameters": params,
                "update_mb_fp16": round(2 * params / 1e6, 3),
                "drop_per_mb": round((before - after) / (2 * params / 1e6), 4),
                "drop_per_sqrt_param": round((before - after) / params**0.5 * 1e3, 4),
            }
            typer.echo(
                f"{name:50s} mel {before:8.3f} -> {after:8.3f}  {params:>9,d} params  "
                f"{rows[name]['drop_per_mb']:8.3f}/MB",
                err=True,
            )
    typer.echo(
        json.dumps(
            {
                "base": base,
                "config": config,
                "steps": steps,
                "batch_size": batch_size,
                "learning_rate": learning_rate,
                "results": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    run_cli(app)
