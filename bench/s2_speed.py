"""s2 speed on this machine: one GAN step (D step + G step) plain and under Opacus, and synthesis.

    python -m bench.s2_speed --config tiny --threads 1
    python -m bench.s2_speed --config v2 --threads 1 --batch-size 2 --tokens 40 --repeats 3

Training modes: ``plain`` (no per-sample gradients), ``opacus_hooks`` (``GradSampleModule``:
weight-normed convolutions through Opacus's functorch fallback) and ``opacus_weight_norm``
(``DirectGradSampleModule``: every layer through a direct formula). Figures are medians of
``--repeats`` runs after one warm-up, in process CPU seconds (robust on a shared machine) and
wall seconds. Prints one JSON object.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import typer
from opacus import GradSampleModule

from fedvox.client.dp.grad_sample import DirectGradSampleModule
from fedvox.client.host import prepare_training_process
from fedvox.shared.audio import HOP_LENGTH, SAMPLE_RATE, linear_spectrogram
from fedvox.shared.cli import run_cli
from fedvox.shared.models.batches import S2Batch
from fedvox.shared.models.config import S2Config, s2_config
from fedvox.shared.models.s2 import (
    MultiPeriodDiscriminator,
    SynthesizerTrn,
    discriminator_losses,
    draw_randomness,
    frozen,
    generator_losses,
)
from fedvox.shared.models.subsets import SubsetSpec, apply_subset

app = typer.Typer(add_completion=False)


def _median(run: Callable[[], object], repeats: int) -> tuple[float, float]:
    run()
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        run()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall)


def _batch(config: S2Config, batch_size: int, tokens: int, phonemes: int) -> S2Batch:
    samples = 2 * tokens * HOP_LENGTH
    time_s = torch.arange(samples) / SAMPLE_RATE
    wave = 0.3 * torch.sin(2 * torch.pi * 180 * time_s) + 0.01 * torch.randn(batch_size, samples)
    sv = torch.randn(batch_size, config.sv_dim) if config.is_pro else None
    return S2Batch(
        semantic_ids=torch.randint(0, config.codebook_size, (batch_size, tokens)),
        semantic_lengths=torch.full((batch_size,), tokens),
        spec=linear_spectrogram(wave),
        spec_lengths=torch.full((batch_size,), 2 * tokens),
        wave=wave.unsqueeze(1),
        wave_lengths=torch.full((batch_size,), samples),
        phoneme_ids=torch.randint(1, config.phoneme_vocab, (batch_size, phonemes)),
        phoneme_lengths=torch.full((batch_size,), phonemes),
        sv_embedding=sv,
    )


@app.command()
def main(
    config: str = typer.Option("tiny", help="s2 config: tiny, v1, v2, v2Pro, v2ProPlus"),
    threads: int = typer.Option(1, help="torch CPU threads"),
    batch_size: int = typer.Option(8, help="training batch size"),
    tokens: int = typer.Option(50, help="25 Hz semantic tokens per utterance (2 s)"),
    phonemes: int = typer.Option(30, help="phonemes per utterance"),
    repeats: int = typer.Option(5, help="timed runs per figure"),
    decode_tokens: int = typer.Option(100, help="tokens synthesised for the real-time factor (4 s)"),
) -> None:
    warnings.filterwarnings("ignore", message="Full backward hook")  # Opacus, harmless
    prepare_training_process(threads)  # as every training process (client.host)
    torch.manual_seed(0)
    cfg = s2_config(config)
    generator, discriminator = SynthesizerTrn(cfg), MultiPeriodDiscriminator(cfg)
    apply_subset(generator, SubsetSpec(kind="full"))
    batch = _batch(cfg, batch_size, tokens, phonemes)
    starts, noise = draw_randomness(batch.spec_lengths, cfg, torch.Generator().manual_seed(0))
    result: dict[str, object] = {
        "config": config,
        "threads": threads,
        "batch_size": batch_size,
        "tokens": tokens,
        "phonemes": phonemes,
    }
    for mode, wrap in (
        ("plain", None),
        ("opacus_hooks", GradSampleModule),
        ("opacus_weight_norm", DirectGradSampleModule),
    ):
        g, d = copy.deepcopy(generator), copy.deepcopy(discriminator)
        if wrap is not None:
            g = wrap(g, batch_first=True, loss_reduction="sum", strict=True)
            d = wrap(d, batch_first=True, loss_reduction="sum", strict=True)

        def step(g: torch.nn.Module = g, d: torch.nn.Module = d) -> None:
            out = g(batch, slice_starts=starts, posterior_noise=noise)
            discriminator_losses(d, batch, out, cfg).sum().backward()
            with frozen(d):
                generator_losses(d, batch, out, cfg)["total"].sum().backward()
            for param in [*g.parameters(), *d.parameters()]:
                param.grad, param.grad_sample = None, None

        cpu, wall = _median(step, repeats)
        result[f"gan_step_{mode}"] = {"cpu_s": round(cpu, 4), "wall_s": round(wall, 4)}
    plain = result["gan_step_plain"]["cpu_s"]
    result["overhead_x"] = {
        mode: round(result[f"gan_step_{mode}"]["cpu_s"] / plain, 2) for mode in ("opacus_hooks", "opacus_weight_norm")
    }
    generator.eval()
    codes = torch.randint(0, cfg.codebook_size, (1, decode_tokens))
    text = torch.randint(1, cfg.phoneme_vocab, (1, phonemes))
    sv = torch.randn(1, cfg.sv_dim) if cfg.is_pro else None
    refer = batch.spec[:1]
    _, wall = _median(lambda: generator.decode(codes, text, refer, sv), repeats)
    result["decode"] = {
        "seconds_of_speech": decode_tokens / 25,
        "real_time_factor": round(wall / (decode_tokens / 25), 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    run_cli(app)
