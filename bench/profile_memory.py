"""Measure the activation memory per sample that resource profiles plan with.

    python -m bench.profile_memory [--device cpu|cuda] [--stage s1 s2] [--config tiny v2 ...]

Every (stage, config, subset, precision, checkpointing) runs in a fresh process: the model and
its subset, AdamW and Opacus's DP optimizer as in training (``client.dp.engine``), on
synthetic batches at the planning length (``client.profiles.PLANNING_SECONDS``). After a warm-up
step it records the peak memory (CPU: the process's peak RSS, VmHWM, reset before each step;
CUDA: ``max_memory_allocated``) of DP steps and then of plain steps (Opacus hooks off) at a few
physical batch sizes. The activation term ``A`` the profiles use comes from both
(:func:`activation_term`), so that ``trainable * g + A`` bounds what the DP steps took per
sample. Rows replace those with the same key in ``client/profile_memory.json``. CPU
measurements need Linux (``/proc``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from fedvox.client.device import probe
from fedvox.client.dp.engine import make_private
from fedvox.client.profiles import (
    AUTOCAST_DTYPES,
    MEMORY_TABLE,
    PHONEMES_PER_SECOND,
    PLANNING_SECONDS,
    ActivationCost,
    estimate_memory,
    model_size,
)
from fedvox.shared.atomic import atomic_write_text
from fedvox.shared.audio import FRAMES_PER_SECOND, HOP_LENGTH, SEMANTIC_RATE
from fedvox.shared.models.batches import S1Batch, S2Batch
from fedvox.shared.models.config import s1_config, s2_config
from fedvox.shared.models.subsets import SubsetSpec, apply_subset


def batch_sizes(config: str) -> tuple[int, ...]:
    """Physical batches measured, after a warm-up step at the first: wide apart for ``tiny``,
    whose few MiB per sample would drown in allocator noise, small for v2ProPlus."""
    return (1, 4, 8) if config == "tiny" else (1, 2, 3)


MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
"""glibc: serve every allocation >= 64 KiB by mmap and unmap it on free, so peak RSS is the peak
of live tensors rather than of whatever the heap kept from earlier steps (as CUDA's
``max_memory_allocated``)."""
ARCHITECTURES = {"s1": ("tiny", "v2"), "s2": ("tiny", "v2", "v2Pro", "v2ProPlus")}
"""One config per distinct architecture (``client.profiles.VOCABULARY_FIELDS``: v1 is v2's)."""


def planning_lengths() -> dict[str, int]:
    return {
        "phonemes": round(PLANNING_SECONDS * PHONEMES_PER_SECOND),
        "semantic_tokens": round(PLANNING_SECONDS * SEMANTIC_RATE),
        "spec_frames": round(PLANNING_SECONDS * FRAMES_PER_SECOND),
    }


# ---------------------------------------------------------------------- one measurement (child)
def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current RSS


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: CPU measurements need Linux")


def _s1_step(stage_models, batch_size: int, device: torch.device, lengths: dict[str, int], autocast) -> None:
    """Forward and backward of one s1 physical batch (per-sample losses summed)."""
    from fedvox.shared.models.s1 import s1_loss

    (private,) = stage_models
    g = torch.Generator().manual_seed(batch_size)
    x, y = lengths["phonemes"], lengths["semantic_tokens"]
    batch = S1Batch(
        phoneme_ids=torch.randint(1, 300, (batch_size, x), generator=g),
        phoneme_lengths=torch.full((batch_size,), x),
        bert_features=torch.randn(batch_size, x, 1024, generator=g),
        semantic_ids=torch.randint(0, 1024, (batch_size, y), generator=g),
        semantic_lengths=torch.full((batch_size,), y),
    ).to(device)
    with autocast():
        loss = s1_loss(private.module, batch).per_sample.sum()
    loss.backward()


def _s2_step(stage_models, batch_size: int, device: torch.device, lengths: dict[str, int], autocast, config) -> None:
    """One s2 GAN step's forwards and backwards (``shared.models.s2.gan``): G, then D, then G with D frozen."""
    from fedvox.shared.models.s2 import discriminator_losses, frozen, generator_losses

    gen, disc = stage_models
    g = torch.Generator().manual_seed(batch_size)
    t25, frames, x = lengths["semantic_tokens"], lengths["spec_frames"], lengths["phonemes"]
    batch = S2Batch(
        semantic_ids=torch.randint(0, config.codebook_size, (batch_size, t25), generator=g),
        semantic_lengths=torch.full((batch_size,), t25),
        spec=torch.rand(batch_size, config.spec_channels, frames, generator=g),
        spec_lengths=torch.full((batch_size,), frames),
        wave=0.1 * torch.randn(batch_size, 1, frames * HOP_LENGTH, generator=g),
        wave_lengths=torch.full((batch_size,), frames * HOP_LENGTH),
        phoneme_ids=torch.randint(1, config.phoneme_vocab, (batch_size, x), generator=g),
        phoneme_lengths=torch.full((batch_size,), x),
        sv_embedding=torch.randn(batch_size, config.sv_dim, generator=g) if config.is_pro else None,
    ).to(device)
    with autocast():
        out = gen.module(batch, generator=g)
        d_loss = discriminator_losses(disc.module, batch, out, config).sum()
    d_loss.backward()
    with frozen(disc.module):
        with autocast():
            g_loss = generator_losses(disc.module, batch, out, config)["total"].sum()
        g_loss.backward()


def activation_term(plain_slope: int, dp_slope: int, trainable: int, mixed: bool) -> int:
    """``A``: the larger of a plain step's growth per sample and what a DP step took per sample
    beyond its per-sample gradients. The second is larger under autocast (Opacus keeps each
    layer's fp32 input where autograd keeps only the low-precision copy); the first is larger
    for full fine-tuning, where the measured DP peak falls after backward has freed activations
    and could move at bigger batches. Taking both keeps the memory model an upper bound."""
    return max(plain_slope, dp_slope - trainable * (2 if mixed else 4))


def measure(
    stage: str, config_name: str, subset: str, precision: str, checkpointing: bool, device_name: str
) -> dict[str, Any]:
    """One row: the peak memory of DP steps and of plain steps per physical batch size (run in a
    fresh process)."""
    device = torch.device(device_name)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # memory does not depend on it; leaves the host's other cores alone
    lengths = planning_lengths()
    baseline = _peak_bytes(device)
    if stage == "s1":
        from fedvox.shared.models.s1 import Text2SemanticDecoder

        config = s1_config(config_name)
        model = Text2SemanticDecoder(config, attention_checkpointing=checkpointing)
        models = [(model, SubsetSpec(subset))]
    else:
        from fedvox.shared.models.s2 import MultiPeriodDiscriminator, SynthesizerTrn

        config = s2_config(config_name)
        models = [(SynthesizerTrn(config), SubsetSpec(subset)), (MultiPeriodDiscriminator(config), SubsetSpec("full"))]
    stage_models = []
    for model, spec in models:
        model.to(device)
        apply_subset(model, spec)
        trainable = [p for p in model.parameters() if p.requires_grad]
        stage_models.append(
            make_private(
                model,
                torch.optim.AdamW(trainable, lr=1e-4),
                noise_multiplier=1.0,
                clip_norm=1.0,
                expected_batch_size=4,
                noise_generator=torch.Generator(device).manual_seed(0),
            )
        )
    dtype = AUTOCAST_DTYPES.get(precision)

    def autocast() -> torch.autocast:
        return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def step(batch_size: int, dp: bool) -> int:
        _reset_peak(device)
        if stage == "s1":
            _s1_step(stage_models, batch_size, device, lengths, autocast)
        else:
            _s2_step(stage_models, batch_size, device, lengths, autocast, config)
        for private in stage_models:
            if dp:
                private.optimizer.step()
            private.optimizer.zero_grad(set_to_none=True)
        return _peak_bytes(device)

    batches = batch_sizes(config_name)
    step(batches[0], dp=True)  # warm-up: optimizer state, lazily loaded kernels
    dp_peaks = [step(b, dp=True) for b in batches]
    for private in stage_models:  # plain backward: parameter gradients, no per-sample ones
        private.module.disable_hooks()
    plain_peaks = [step(b, dp=False) for b in batches]

    def slope(peaks: list[int]) -> int:
        return (peaks[-1] - peaks[-2]) // (batches[-1] - batches[-2])

    size = model_size(stage, config_name, SubsetSpec(subset))
    activation = activation_term(slope(plain_peaks), slope(dp_peaks), size.trainable, dtype is not None)
    modelled = estimate_memory(size, ActivationCost(activation, device.type, False, ""), precision, 0)
    facts = probe()
    host = facts.device_name if device.type == "cuda" else f"{facts.cpu_name} ({facts.logical_cores} threads)"
    return {
        "device": device.type,
        "stage": stage,
        "config": config_name,
        "subset": subset,
        "precision": precision,
        "checkpointing": checkpointing,
        "activation_bytes": activation,
        "activation_plain_bytes": slope(plain_peaks),
        "per_sample_bytes_measured": slope(dp_peaks),
        "per_sample_bytes_model": modelled.per_sample,
        "fixed_bytes_measured": dp_peaks[0] - slope(dp_peaks) * batches[0] - baseline,
        "fixed_bytes_model": modelled.fixed,
        "baseline_bytes": baseline,
        "trainable_params": size.trainable,
        "batches": list(batches),
        "dp_peak_bytes": dp_peaks,
        "plain_peak_bytes": plain_peaks,
        "lengths": lengths,
        "host": host,
        "torch": torch.__version__.split("+")[0],
        "date": datetime.date.today().isoformat(),
    }


# ---------------------------------------------------------------------- driver (parent)
def _jobs(args: argparse.Namespace) -> list[tuple[str, str, str, str, bool]]:
    jobs = []
    for stage in args.stage:
        for config in args.config or ARCHITECTURES[stage]:
            for subset in args.subset:
                for precision in args.precision:
                    checkpointable = model_size(stage, config, SubsetSpec(subset)).checkpointable
                    for checkpointing in (False, True) if checkpointable else (False,):
                        jobs.append((stage, config, subset, precision, checkpointing))
    return jobs


def _key(row: dict[str, Any]) -> tuple:
    return tuple(row[k] for k in ("device", "stage", "config", "subset", "precision", "checkpointing"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--stage", nargs="+", default=["s1", "s2"], choices=("s1", "s2"))
    parser.add_argument("--config", nargs="+", help="default: one config per architecture")
    parser.add_argument("--subset", nargs="+", default=["lora", "full"], choices=("lora", "full"))
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    parser.add_argument("--out", type=Path, default=MEMORY_TABLE)
    parser.add_argument(
        "--one", nargs=5, metavar=("STAGE", "CONFIG", "SUBSET", "PRECISION", "CKPT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.one:
        stage, config, subset, precision, ckpt = args.one
        print(json.dumps(measure(stage, config, subset, precision, ckpt == "1", args.device)))
        return

    table = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    rows = {_key(row): row for row in table["rows"]}
    for stage, config, subset, precision, ckpt in _jobs(args):
        command = [
            sys.executable,
            "-m",
            "bench.profile_memory",
            "--device",
            args.device,
            "--one",
            stage,
            config,
            subset,
            precision,
            str(int(ckpt)),
        ]
        done = subprocess.run(
            command, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV, "PYTHONWARNINGS": "ignore"}
        )
        if done.returncode != 0:
            print(f"FAILED {stage} {config} {subset} {precision} ckpt={ckpt}:\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows[_key(row)] = row
        print(
            f"{stage} {config:9s} {subset:4s} {precision} ckpt={int(ckpt)}: activations "
            f"{row['activation_bytes'] / 2**20:7.1f} MiB/sample; DP per sample measured "
            f"{row['per_sample_bytes_measured'] / 2**20:7.1f} vs model {row['per_sample_bytes_model'] / 2**20:7.1f} "
            f"MiB; fixed measured {row['fixed_bytes_measured'] / 2**20:.0f} vs model "
            f"{row['fixed_bytes_model'] / 2**20:.0f} MiB",
            flush=True,
        )
        table["rows"] = sorted(rows.values(), key=_key)
        table["about"] = (
            "Activation bytes per sample at the planning length, written by bench/profile_memory.py "
            f"(python {platform.python_version()}); client/profiles.py reads it. Do not edit by hand."
        )
        atomic_write_text(args.out, json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
