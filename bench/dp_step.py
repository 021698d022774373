"""Figure 1, DP step cost: a DP-SGD step's time over a non-private step at the same batch and precision.

    python -m bench.dp_step --stage s1 --config tiny
    python -m bench.dp_step --stage s2 --config tiny --batch 4 --tokens 50
    python -m bench.dp_step --stage s1 --config v2 --batch 4 --phonemes 30 --tokens 90 --repeats 5
    python -m bench.dp_step --stage s1 --config v2 --device cuda --batch 16 --phonemes 100 --tokens 250 --precision bf16

Every variant runs the trainer's own step (``client.stages``: s1 = the GPT; s2 = the
generator/discriminator pair, as clients train it) on the same synthetic batch, one logical batch
in one physical batch:

``plain``     non-private: forward, ``loss.backward()``, AdamW;
``opacus``    stock Opacus 1.6 hooks: ``GradSampleModule`` (SoVITS's weight-normed convolutions
              through its functorch fallback) and ``DPOptimizer``;
``unpruned``  fedvox's samplers under Opacus's hooks (``DirectGradSampleModule``) and
              ``FedvoxDPOptimizer`` with an ordinary ``loss.backward()`` (isolates what the engine's
              hooks, book-keeping and pruned backward buy);
``fedvox``    the engine (``client.dp.engine``: lean per-layer hooks, book-keeping clipping with
              per-layer ghost norms or explicit per-sample gradients, pruned backward), its noise
              from torch's generator, as in seeded experiments and tests;
``secure``    the step as clients run it: ``fedvox`` with the noise from the release's ChaCha20
              stream, released on a grid (``shared.privacy.noise.SecureGaussian``);
``ghost``     Opacus 1.6 ghost clipping (s1 only, not run unless asked for): per-sample gradient
              *norms* from activations and output gradients without the per-sample gradients,
              then a second backward of the clipped loss (``GradSampleModuleFastGradientClipping``).

Variants are timed in turn, order rotated each repeat; ratios are of medians in this one run
(CPU time on a CPU, wall time on CUDA). Prints a table last and writes JSON.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import warnings
from pathlib import Path

import torch
import typer
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

from bench.common import host, interleaved, load_average, table, timing_key, write_json
from fedvox.client.dp.engine import make_private, run_logical_step
from fedvox.client.dp.grad_sample import DirectGradSampleModule
from fedvox.client.dp.optimizer import FedvoxDPOptimizer
from fedvox.client.dp.task import Task, autocast
from fedvox.client.host import prepare_training_process
from fedvox.client.stages import client_stage
from fedvox.client.stages.s1 import S1Task
from fedvox.shared.cli import run_cli
from fedvox.shared.models.factory import build_model
from fedvox.shared.models.s1 import s1_loss
from fedvox.shared.models.subsets import SubsetSpec
from fedvox.shared.privacy.noise import SecureGaussian

app = typer.Typer(add_completion=False)
VARIANTS = ("plain", "opacus", "unpruned", "fedvox", "secure")
OPTIONAL_VARIANTS = ("ghost",)
LEARNING_RATE = 1e-5  # small: the weights barely move over the repeats


def synthetic_dataset(stage: str, batch: int, phonemes: int, tokens: int, seed: int = 0) -> list:
    """``batch`` of the stage's examples of exactly ``phonemes`` phonemes and ``tokens`` semantic tokens."""
    g = torch.Generator().manual_seed(seed)
    example = client_stage(stage).example
    return [example.synthetic(phonemes, tokens, g) for _ in range(batch)]


def build_task(stage: str, config: str, subset: str, dataset: list, device: torch.device, precision: str) -> Task:
    model = build_model(stage, config, SubsetSpec(kind=subset), seed=0)
    return client_stage(stage).task(model, dataset, device, precision)


def step_variant(name: str, task: Task, batch: int, physical: int, device: torch.device):
    """A callable running one training step of variant ``name`` on ``task``'s whole dataset."""
    indices = torch.arange(batch)
    optimizers = {part: task.optimizer(part, module, LEARNING_RATE) for part, module in task.parts().items()}
    if name == "plain":

        def plain() -> None:
            for optimizer in optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            for chunk in indices.split(physical):
                task.accumulate(task.parts(), chunk, step_seed=0)
            for optimizer in optimizers.values():
                optimizer.step()

        return plain

    noise = torch.Generator(device).manual_seed(0)
    if name == "ghost":
        return ghost_step(task, optimizers, batch, physical, noise)
    if name in ("fedvox", "secure"):
        privates = {
            part: make_private(
                module,
                optimizers[part],
                noise_multiplier=1.0,
                clip_norm=1.0,
                expected_batch_size=batch,
                noise_generator=noise,
            )
            for part, module in task.parts().items()
        }
        wrapped = {part: p.module for part, p in privates.items()}
        dp_optimizers = [p.optimizer for p in privates.values()]
        if name == "secure":  # one key per part, as the trainer derives them from a release's key
            for part, p in privates.items():
                p.optimizer.secure_noise = SecureGaussian(hashlib.sha256(f"bench/{part}".encode()).digest())
    else:
        wrapper, optimizer_class = {
            "opacus": (GradSampleModule, DPOptimizer),
            "unpruned": (DirectGradSampleModule, FedvoxDPOptimizer),
        }[name]
        wrapped = {
            part: wrapper(module, batch_first=True, loss_reduction="sum", strict=True)
            for part, module in task.parts().items()
        }
        dp_optimizers = [
            optimizer_class(
                optimizers[part],
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                expected_batch_size=batch,
                loss_reduction="mean",
                generator=noise,
            )
            for part in wrapped
        ]

    def private() -> None:
        run_logical_step(indices, physical, lambda chunk: task.accumulate(wrapped, chunk, step_seed=0), dp_optimizers)

    return private


def ghost_step(task: Task, optimizers: dict, batch: int, physical: int, noise: torch.Generator):
    """Opacus's ghost clipping on s1: one physical batch (its optimizer clears the gradients
    between its two backward passes, so it cannot accumulate physical batches)."""
    if not isinstance(task, S1Task) or physical != batch:
        raise typer.BadParameter("the ghost variant runs s1 with the whole logical batch in one physical batch")
    module = GradSampleModuleFastGradientClipping(task.model, batch_first=True, loss_reduction="sum", max_grad_norm=1.0)
    optimizer = DPOptimizerFastGradientClipping(
        optimizers["s1"],
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=batch,
        loss_reduction="sum",
        generator=noise,
    )
    data = task.batch(torch.arange(batch))

    def ghost() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(task.device, task.precision):
            per_sample = s1_loss(module, data).per_sample
        DPTensorFastGradientClipping(module, optimizer, per_sample, "sum").backward()
        optimizer.step()

    return ghost


@app.command()
def main(
    stage: str = typer.Option("s1", help="s1 (GPT) or s2 (SoVITS generator + discriminator)"),
    config: str = typer.Option("tiny", help="model config: tiny, v2, ..."),
    subset: str = typer.Option("full", help="trainable subset: full or lora"),
    batch: int = typer.Option(8, help="logical batch (utterances per step)"),
    physical: int = typer.Option(0, help="physical batch (0: the whole logical batch at once)"),
    phonemes: int = typer.Option(40, help="phonemes per utterance"),
    tokens: int = typer.Option(150, help="semantic tokens per utterance (25 Hz; s2 spectrogram frames = 2x)"),
    precision: str = typer.Option("fp32", help="fp32 or bf16 (autocast, no loss scaling)"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    threads: int = typer.Option(1, help="torch CPU threads (1 gives the steadiest ratios on a shared host)"),
    repeats: int = typer.Option(7, help="timed steps per variant"),
    variants: str = typer.Option(
        ",".join(VARIANTS), help="comma-separated, of " + ", ".join(VARIANTS + OPTIONAL_VARIANTS)
    ),
    out: Path = typer.Option(None, help="JSON path (default runs/bench/dp_step-<stage>-<config>-....json)"),
) -> None:
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(Full backward hook|Secure RNG|Using a non-full backward).*")
    prepare_training_process(threads)  # as every training process (client.host)
    dev = torch.device(device)
    names = [v for v in variants.split(",") if v]
    if unknown := set(names) - set(VARIANTS + OPTIONAL_VARIANTS):
        raise typer.BadParameter(
            f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS + OPTIONAL_VARIANTS)}"
        )
    facts = host(dev)
    dataset = synthetic_dataset(stage, batch, phonemes, tokens)
    base = build_task(stage, config, subset, dataset, dev, precision)
    steps = {}
    for name in names:  # every variant trains its own copy of the same initial model
        task = copy.deepcopy(base)
        steps[name] = step_variant(name, task, batch, physical or batch, dev)
    timings = interleaved(steps, repeats, dev)
    key = timing_key(dev)
    reference = timings["plain"][key] if "plain" in timings else None
    rows = {}
    for name, t in timings.items():
        rows[name] = {**t, "ratio_to_plain": t[key] / reference if reference else None}
    trainable = sum(p.numel() for p in base.model.parameters() if p.requires_grad)
    result = {
        "figure": "dp_step",
        "host": {**facts, "load_average_end": load_average()},
        "setting": {
            "stage": stage,
            "config": config,
            "subset": subset,
            "batch": batch,
            "physical": physical or batch,
            "phonemes": phonemes,
            "tokens": tokens,
            "precision": precision,
            "trainable_params": trainable,
            "repeats": repeats,
            "timing": key.removesuffix("_median"),
        },
        "variants": rows,
    }
    path = write_json(result, out, f"dp_step-{stage}-{config}-{subset}-{precision}-b{batch}-{device}")
    print(
        f"{stage} {config} {subset} {precision}, batch {batch} (physical {physical or batch}), "
        f"{phonemes} phonemes + {tokens} tokens, {trainable:,} trainable, {facts['cpu']} "
        f"{threads} thread(s), load {facts['load_average_start']:.1f} -> {load_average():.1f}; {path}"
    )
    print(
        table(
            ("variant", "cpu s", "wall s", "x plain"),
            [(n, r["cpu_s_median"], r["wall_s_median"], r["ratio_to_plain"] or float("nan")) for n, r in rows.items()],
        )
    )


if __name__ == "__main__":
    run_cli(app)
