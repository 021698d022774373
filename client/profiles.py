"""Resource profiles: how a device runs a DP training step (device, physical batch, precision,
activation checkpointing, threads), chosen from :class:`~client.device.DeviceFacts`.

A profile changes how a step runs, never what it computes. The logical (Poisson) batch, the
noise multiplier and the clipping norm come from the training configuration; the physical batch
only splits the logical batch into chunks whose clipped per-sample gradients are summed before
the one noise draw (``client.dp.engine``), so two profiles give the same update up to
floating-point rounding. Precision and checkpointing are chosen among options that keep
per-sample gradients exact:

* **bf16** autocast where the hardware does bf16 natively, without a loss scaler;
* **fp16** autocast only with a static loss scale that the DP optimizer divides out of every
  per-sample gradient before clipping (with a plain ``GradScaler`` Opacus would clip the scaled
  gradients and make every update ``scale`` times too large);
* **fp32** elsewhere;
* **checkpointing** only of parameter-free regions (s1's attention core): recomputing a module
  that owns parameters re-fires Opacus's hooks and corrupts its per-sample gradients.

The physical batch comes from a memory model (see :func:`estimate_memory` and
``docs/devices.md``)::

    fixed      = P * 4 [+ P * 2 under autocast]  weights (fp32) [+ low-precision copies]
               + T * 8                           AdamW moments
               + T * 8                           grad and Opacus's summed_grad
    per_sample = T * g                           per-sample gradients (g = 4 fp32, 2 autocast)
               + A                               activations at the planning length
    physical   = floor((budget - fixed) / per_sample)

with ``P`` all parameters, ``T`` trainable ones (counted on the real model code on the meta
device) and ``A`` the activation memory per sample, read from ``client/profile_memory.json``
(measured and refreshed by ``bench/profile_memory.py``: the larger of a plain step's growth per
sample and a DP step's growth beyond its per-sample gradients, so the sum bounds measured DP
steps from above).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field, StrictBool, StrictInt

from fedvox.client.device import DeviceFacts, GiB, rocm_family
from fedvox.shared.errors import ConfigError, DeviceError
from fedvox.shared.models.config import CONFIG_NAMES
from fedvox.shared.models.subsets import SubsetKind, SubsetSpec
from fedvox.shared.settings import accepts, choice, parse, read_toml, settings
from fedvox.shared.stages import STAGES, recipe

log = logging.getLogger(__name__)

PRECISIONS = ("bf16", "fp16", "fp32")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# ---------------------------------------------------------------------- memory model constants
PLANNING_SECONDS = 10.0
"""Utterance length the activation constants are measured at. GPT-SoVITS's slicer cuts training
audio into clips of a few seconds up to about 10 s; longer utterances in a physical batch are
handled by the trainer's out-of-memory fallback (it halves the physical batch)."""

PHONEMES_PER_SECOND = 12
"""Phoneme rate used for the planning length (speech runs at roughly 10-15 phonemes per second)."""

CPU_RAM_FRACTION = 0.5
"""Share of RAM a CPU profile plans to use: the rest stays with the OS, the data pipeline and
whatever else runs on the owner's machine (policy, not a measurement)."""

CPU_RUNTIME_RESERVE = int(0.75 * GiB)
"""What a CPU client's process holds before its model: Python, torch and its libraries, fedvox's
imports. Measured on x86-64: 0.62 GiB (``baseline_bytes`` in ``client/profile_memory.json``) to
0.73 GiB (``bench/profile_fit.py``); without it a Raspberry Pi 5 profile peaked at 116 % of its
budget (docs/performance.md, figure 2)."""

ACCELERATOR_FRACTION = 0.9
"""Share of GPU memory the allocator can use for tensors (caching-allocator fragmentation).
ESTIMATE, to validate on a GPU with ``bench/profile_memory.py --device cuda``."""

ACCELERATOR_RESERVE = int(0.75 * GiB)
"""GPU memory outside torch's allocator: CUDA/HIP context, cuBLAS/cuDNN workspaces, a display.
ESTIMATE, to validate on a GPU."""

MIN_ACCELERATOR_GIB = 4
"""Below this nominal size a GPU is not used (GPT-SoVITS's own rule: CPU below 4 GB)."""

GPU_TIERS = ((24, "24gb+"), (12, "12gb"), (8, "8gb"), (4, "4gb"), (0, "lt4gb"))
"""Nominal memory tiers (lower bound in GB, label): >=24, 12-23, 8-11, 4-7, <4."""

FP16_LOSS_SCALE = 1024.0
"""Static fp16 loss scale. Static on purpose: a dynamic scaler skips steps depending on the data
(and would skip the accountant's step too). Samples whose scaled gradients still overflow are
dropped and counted by the DP optimizer, which keeps the sensitivity at the clipping norm."""

MEMORY_TABLE = Path(__file__).with_name("profile_memory.json")


# ---------------------------------------------------------------------- overrides
def _torch_device(value: str) -> bool:
    return re.fullmatch(r"cpu|mps|cuda(:\d+)?", value) is not None


@settings("profile")
class ProfileOverrides:
    """Choices a user pins (by flag, or a ``[profile]`` table / node-config ``profile.*`` keys).

    ``None`` leaves the choice to :func:`select_profile`; every value is validated against the
    device there, with a :class:`ConfigError` that says what is wrong and what would work.
    """

    device: Annotated[str, accepts(_torch_device, "cpu, cuda, cuda:N or mps")] | None = None
    precision: Annotated[str, choice(PRECISIONS)] | None = None
    physical_batch: Annotated[StrictInt, Field(ge=1)] | None = None
    checkpointing: StrictBool | None = None
    threads: Annotated[StrictInt, Field(ge=1)] | None = None
    allow_mps: StrictBool = False

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], prefix: str = "profile.", where: str | Path = ""
    ) -> ProfileOverrides:
        """From config values: keys in kebab or snake case after ``prefix``.

        With the default prefix this reads Flower node-config keys (``profile.physical-batch``)
        and ignores the others (the data path, the ledger); ``prefix=""`` reads a ``[profile]``
        TOML table. An unknown key under the prefix is a :class:`ConfigError`.
        """
        picked = {key.removeprefix(prefix): value for key, value in values.items() if key.startswith(prefix)}
        return parse(cls, picked, where, prefix=prefix)

    @classmethod
    def from_toml(cls, path: str | Path) -> ProfileOverrides:
        """From a TOML file's ``[profile]`` table (or its top level when it has none)."""
        data = read_toml(path, "profile settings")
        table = data.get("profile", data)
        if not isinstance(table, Mapping):
            raise ConfigError(f"{path}: [profile] must be a table of settings")
        return cls.from_mapping(table, prefix="", where=path)

    def merged(self, other: ProfileOverrides) -> ProfileOverrides:
        """``self`` with every choice ``other`` pins taking precedence (flags over a config file)."""
        values = asdict(self)
        for f in fields(other):
            value = getattr(other, f.name)
            if f.name == "allow_mps":
                values[f.name] = values[f.name] or value
            elif value is not None:
                values[f.name] = value
        return ProfileOverrides(**values)


# ---------------------------------------------------------------------- the memory model
@dataclass(frozen=True)
class ModelSize:
    """Parameter counts of a stage's trainable models under a subset (s2: generator + discriminator)."""

    parameters: int
    trainable: int
    checkpointable: bool  # the model can recompute a parameter-free region in backward


@functools.lru_cache(maxsize=64)
def model_size(stage: str, config: str, subset: SubsetSpec) -> ModelSize:
    """Count parameters on the real model classes, built on the meta device (no memory, ~0.1 s).

    In s2 the subset applies to the generator; the discriminator trains in full (it is small next
    to G and has no LoRA targets) unless the subset's ``adversary`` is off.
    """
    _check_choice("stage", stage, STAGES)
    _check_choice("model config", config, CONFIG_NAMES)
    stage_recipe = recipe(stage)
    with torch.device("meta"):
        model = stage_recipe.build(stage_recipe.config(config), subset, None)
    params = list(model.parameters())
    return ModelSize(
        parameters=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        checkpointable=hasattr(model, "set_attention_checkpointing"),
    )


@dataclass(frozen=True)
class ActivationCost:
    """Activation bytes per sample at the planning length, and where the figure comes from."""

    bytes_per_sample: int
    measured_on: str  # "cpu", "cuda", ...
    estimate: bool  # True: measured elsewhere than the device it is used for (to validate)
    note: str


def activation_cost(
    stage: str,
    config: str,
    subset: SubsetSpec,
    precision: str,
    checkpointing: bool,
    backend: str,
    table: tuple[Mapping[str, Any], ...] | None = None,
) -> ActivationCost:
    """Look up ``A`` for a device ``backend`` (``cpu``, ``cuda``, ``rocm``, ``mps``).

    Rows are measured per architecture (``v1`` and s1's ``v2Pro`` use ``v2``'s, see
    :data:`VOCABULARY_FIELDS`); bf16 and fp16 store
    the same sizes; a ``groups`` subset uses the ``full`` row (an upper bound). Accelerators use
    rows measured on a CUDA GPU; until ``bench/profile_memory.py`` has run on one, the CPU rows
    stand in and the result is flagged as an estimate.
    """
    rows = _memory_rows() if table is None else table
    subset_key = "lora" if subset.kind == "lora" else "full"
    mixed = precision != "fp32"
    wanted = "cpu" if backend == "cpu" else "cuda"

    def matching(device: str) -> Mapping[str, Any] | None:
        for row in rows:
            if (
                row["device"] == device
                and row["stage"] == stage
                and row["subset"] == subset_key
                and (row["precision"] != "fp32") == mixed
                and row["checkpointing"] == checkpointing
                and _same_architecture(stage, row["config"], config)
            ):
                return row
        return None

    for device in dict.fromkeys((wanted, "cpu")):
        row = matching(device)
        if row is not None:
            estimate = device != wanted
            note = f"measured on {row['host']} ({device}, {row['precision']}, torch {row['torch']})"
            if estimate:
                note += f"; ESTIMATE for {backend}, to validate with bench/profile_memory.py on a GPU"
            return ActivationCost(int(row["activation_bytes"]), device, estimate, note)
    raise ConfigError(
        f"no activation measurement for {stage} {config} {subset_key} "
        f"{'mixed precision' if mixed else 'fp32'}{' with checkpointing' if checkpointing else ''}; "
        "run `python -m bench.profile_memory` to measure it"
    )


@functools.cache
def _memory_rows() -> tuple[Mapping[str, Any], ...]:
    try:
        return tuple(json.loads(MEMORY_TABLE.read_text())["rows"])
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot read the activation table {MEMORY_TABLE}: {exc}") from exc


VOCABULARY_FIELDS = ("name", "version", "symbols_version", "phoneme_vocab_size", "ref_enc_bins", "top_k", "max_sec")
"""Config fields that change parameter counts (counted exactly) or inference only, not the shapes
of activations beyond one embedding or input layer: configs differing only here share rows
(v1 uses v2's)."""


def _same_architecture(stage: str, a: str, b: str) -> bool:
    make = recipe(stage).config
    first, second = make(a), make(b)
    blank = {f.name: None for f in fields(first) if f.name in VOCABULARY_FIELDS}
    return a == b or replace(first, **blank) == replace(second, **blank)


@dataclass(frozen=True)
class MemoryEstimate:
    """The memory model's terms for one profile (bytes)."""

    budget: int
    fixed: int
    per_sample: int
    parameters: int
    trainable: int
    activation: ActivationCost

    @property
    def max_batch(self) -> int:
        """Largest physical batch that fits (0: not even one sample)."""
        return max(0, (self.budget - self.fixed) // self.per_sample)


def estimate_memory(size: ModelSize, activation: ActivationCost, precision: str, budget: int) -> MemoryEstimate:
    """The memory model of the module docstring."""
    mixed = precision != "fp32"
    fixed = size.parameters * (6 if mixed else 4) + size.trainable * 16
    per_sample = size.trainable * (2 if mixed else 4) + activation.bytes_per_sample
    return MemoryEstimate(budget, fixed, max(per_sample, 1), size.parameters, size.trainable, activation)


def memory_budget(facts: DeviceFacts, device: str) -> int:
    """Bytes a profile plans to use on ``device`` (``cpu`` or an accelerator)."""
    if device == "cpu":
        return max(0, int(facts.ram * CPU_RAM_FRACTION) - CPU_RUNTIME_RESERVE)
    return max(0, int(facts.total_memory * ACCELERATOR_FRACTION) - ACCELERATOR_RESERVE)


def poisson_batch_bound(logical_batch: float) -> int:
    """A Poisson-sampled batch of mean ``L`` stays below ``L + 3 sqrt(L)`` more than 99.8 % of the time."""
    return math.ceil(logical_batch + 3 * math.sqrt(logical_batch))


# ---------------------------------------------------------------------- the profile
@dataclass(frozen=True)
class ResourceProfile:
    """How one device runs a step; ``reasons`` says why for each choice.

    ``loss_scale`` is the static fp16 loss scale for the DP optimizer (1.0 otherwise).
    """

    name: str
    device: str
    physical_batch: int
    precision: str
    checkpointing: bool
    threads: int
    loss_scale: float
    memory: MemoryEstimate
    reasons: Mapping[str, str] = field(default_factory=dict)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The ``torch.autocast`` dtype, or ``None`` for fp32."""
        return AUTOCAST_DTYPES.get(self.precision)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["reasons"] = dict(self.reasons)
        values["memory"]["max_batch"] = self.memory.max_batch
        return values


def select_profile(
    facts: DeviceFacts,
    stage: str = "s1",
    model_config: str = "tiny",
    subset: SubsetKind | SubsetSpec = "lora",
    overrides: ProfileOverrides | None = None,
    *,
    logical_batch: float | None = None,
) -> ResourceProfile:
    """The profile for training ``stage``/``model_config``/``subset`` on ``facts``.

    ``logical_batch`` (the run's expected Poisson batch) caps the physical batch at
    :func:`poisson_batch_bound`: a bigger chunk would never be filled. A GPU that cannot hold one
    sample falls back to the CPU. Raises :class:`ConfigError` for an override the device cannot
    honour and :class:`DeviceError` when not even one sample fits in memory.
    """
    overrides = overrides or ProfileOverrides()
    spec = subset if isinstance(subset, SubsetSpec) else SubsetSpec(kind=subset)
    size = model_size(stage, model_config, spec)
    wanted = poisson_batch_bound(logical_batch) if logical_batch else None
    device, label, device_reason = _choose_device(facts, overrides)
    try:
        return _plan(facts, device, label, device_reason, stage, model_config, spec, size, wanted, overrides)
    except DeviceError as exc:
        if device == "cpu" or overrides.device is not None:
            raise
        reason = f"cpu: {exc} (on {device}); the CPU has {facts.ram / GiB:.0f} GiB of RAM"
        return _plan(facts, "cpu", _cpu_label(facts), reason, stage, model_config, spec, size, wanted, overrides)


def _plan(
    facts: DeviceFacts,
    device: str,
    label: str,
    device_reason: str,
    stage: str,
    config: str,
    spec: SubsetSpec,
    size: ModelSize,
    wanted: int | None,
    overrides: ProfileOverrides,
) -> ResourceProfile:
    reasons = {"device": device_reason}
    precision, reasons["precision"] = _choose_precision(facts, device, overrides)
    budget = memory_budget(facts, device)

    def estimate(checkpointing: bool) -> MemoryEstimate:
        cost = activation_cost(stage, config, spec, precision, checkpointing, _kind(facts, device))
        return estimate_memory(size, cost, precision, budget)

    memory, checkpointing, reasons["checkpointing"] = _choose_checkpointing(stage, size, estimate, wanted, overrides)
    physical, reasons["physical_batch"] = _choose_batch(memory, wanted, overrides, device, stage, config, spec)
    threads, reasons["threads"] = _choose_threads(facts, device, overrides)
    return ResourceProfile(
        name=f"{label}-{precision}",
        device=device,
        physical_batch=physical,
        precision=precision,
        checkpointing=checkpointing,
        threads=threads,
        loss_scale=FP16_LOSS_SCALE if precision == "fp16" else 1.0,
        memory=memory,
        reasons=reasons,
    )


# ---------------------------------------------------------------------- choices
def _kind(facts: DeviceFacts, device: str) -> str:
    return "cpu" if device == "cpu" else facts.backend


def nominal_gib(total_memory: int) -> float:
    """Marketed size in GB, from torch's slightly smaller total (rounds 7.79 GiB up to an 8 GB card)."""
    return total_memory / GiB + 0.5


def gpu_tier(total_memory: int) -> str:
    """The memory tier label of a GPU (see :data:`GPU_TIERS`)."""
    gib = nominal_gib(total_memory)
    return next(label for bound, label in GPU_TIERS if gib >= bound)


def _cpu_label(facts: DeviceFacts) -> str:
    return "apple-cpu" if facts.backend == "mps" else f"cpu-{facts.cpu_arch}"


def _gpu_label(facts: DeviceFacts) -> str:
    tier = gpu_tier(facts.total_memory)
    if facts.backend == "rocm":
        return f"amd-{rocm_family(facts.gfx_arch or '')}-{tier}"
    return f"nvidia-{tier}" if facts.backend == "cuda" else "apple-mps"


def _gpu_problem(facts: DeviceFacts) -> str | None:
    """Why fedvox does not train on this accelerator by default, or None if it does."""
    name = f"{facts.device_name} ({_arch(facts)})"
    family = rocm_family(facts.gfx_arch or "")
    if facts.backend == "rocm" and family in ("rdna1", "gcn4", "gcn5", "unknown"):
        return (
            f"{name}: {family.upper()} is not a supported ROCm training target (fedvox supports "
            "RDNA2/3/4 and CDNA; RDNA1 crashes even with HSA_OVERRIDE_GFX_VERSION)"
        )
    if not facts.kernels:
        targets = " ".join(facts.torch_archs) or "nothing"
        if facts.backend == "rocm":  # only RDNA2 variants (gfx1031, gfx1032, ...) get here
            fix = "HSA_OVERRIDE_GFX_VERSION=10.3.0 makes it load gfx1030 code (unsupported by AMD)"
        elif facts.compute_capability is not None and facts.compute_capability >= (5, 0):
            fix = "current CUDA wheels start at sm_75; a cu126 PyTorch wheel still has kernels for it"
        else:
            fix = "no current PyTorch wheel supports it"
        return f"{name}: the installed torch build has no kernels for it (it targets {targets}); {fix}"
    if nominal_gib(facts.total_memory) < MIN_ACCELERATOR_GIB:
        return (
            f"{name} has {facts.total_memory / GiB:.1f} GiB; below {MIN_ACCELERATOR_GIB} GB "
            "GPT-SoVITS itself trains on CPU (the context and a display take most of it)"
        )
    return None


def _arch(facts: DeviceFacts) -> str:
    if facts.compute_capability:
        return "sm_{}{}".format(*facts.compute_capability)
    return facts.gfx_arch or facts.backend


def _choose_device(facts: DeviceFacts, overrides: ProfileOverrides) -> tuple[str, str, str]:
    """(torch device, profile label, reason)."""
    gpu = f"cuda:{facts.device_index}"
    requested = overrides.device
    if requested is not None:
        if requested == "cpu":
            return "cpu", _cpu_label(facts), "cpu: pinned by override"
        if requested.startswith("cuda"):
            if facts.backend not in ("cuda", "rocm"):
                raise ConfigError(
                    f"profile device {requested!r} needs an NVIDIA or AMD GPU, but this machine's "
                    f"accelerator is {facts.backend!r}; use device=cpu"
                    + (" or device=mps" if facts.backend == "mps" else "")
                )
            if requested not in ("cuda", gpu):
                raise ConfigError(
                    f"profile device {requested!r} is not the probed GPU {gpu}; probe that GPU "
                    f"(`fedvox-client probe --gpu N`) or use device=cuda"
                )
            if not facts.kernels:
                raise ConfigError(f"profile device {requested!r} cannot work: {_gpu_problem(facts)}")
            note = _gpu_problem(facts)
            return gpu, _gpu_label(facts), f"{gpu}: pinned by override" + (f" despite: {note}" if note else "")
        if facts.backend != "mps":
            raise ConfigError(
                f"profile device 'mps' needs an Apple GPU, but this machine's accelerator is "
                f"{facts.backend!r}; use device=cpu"
            )
        return "mps", "apple-mps", "mps: pinned by override (MPS is known to leak memory with variable-length batches)"

    if facts.backend == "cpu":
        return "cpu", _cpu_label(facts), f"cpu: no GPU found; {facts.cpu_name} ({facts.cpu_isa})"
    if facts.backend == "mps":
        if overrides.allow_mps:
            return (
                "mps",
                "apple-mps",
                (
                    f"mps: opted in with allow-mps on {facts.device_name}; watch memory, MPS leaks with "
                    "variable-length batches and Opacus is untested on it"
                ),
            )
        return (
            "cpu",
            _cpu_label(facts),
            (
                f"cpu: {facts.device_name}'s GPU (MPS) is not used by default: it leaks memory with "
                "variable-length batches (pytorch#121113, #132596) and GPT-SoVITS trains on CPU on "
                "Macs for that reason and because MPS-trained models sounded worse; pass --allow-mps "
                "to use it"
            ),
        )
    problem = _gpu_problem(facts)
    if problem:
        return "cpu", _cpu_label(facts), f"cpu: {problem}"
    return gpu, _gpu_label(facts), (f"{gpu}: {facts.device_name} ({_arch(facts)}, {facts.total_memory / GiB:.1f} GiB)")


def _choose_precision(facts: DeviceFacts, device: str, overrides: ProfileOverrides) -> tuple[str, str]:
    requested = overrides.precision
    if device == "cpu":
        isa = "AVX512-BF16/AMX" if facts.cpu_arch == "x86_64" else "FEAT_BF16"
        if requested == "fp16":
            raise ConfigError(
                "profile precision fp16 is not offered on CPU: it needs loss scaling and has no fast "
                "CPU kernels; use bf16" + ("" if facts.cpu_bf16 else " (emulated here)") + " or fp32"
            )
        if requested == "bf16":
            return "bf16", "bf16: pinned by override" + (
                "" if facts.cpu_bf16 else f" (this CPU has no {isa}: emulated, expect it to be slower)"
            )
        if requested == "fp32":
            return "fp32", "fp32: pinned by override"
        if facts.cpu_bf16:
            return "bf16", (
                f"bf16 autocast: this CPU has {isa} instructions (CPU autocast supports bf16 only; "
                "no loss scaling needed)"
            )
        return "fp32", (f"fp32: this CPU ({facts.cpu_isa}) has no {isa}; bf16 would be emulated and slower")

    if requested is not None:
        if requested == "bf16" and not facts.bf16:
            raise ConfigError(
                f"profile precision bf16 is not available on {facts.device_name} ({_arch(facts)}): no "
                "native bf16 arithmetic (emulation is slow, and crashes on RDNA2); use fp16 or fp32"
            )
        return requested, f"{requested}: pinned by override" + (_fp16_note() if requested == "fp16" else "")
    if device == "mps":
        return "fp32", "fp32: GPT-SoVITS found MPS-trained models worse; fp16 can be pinned by override"
    arch = _arch(facts)
    if facts.bf16:
        extra = (
            "; AMD recommends it over fp16, which overflowed on RDNA3 (ROCm #6351)" if facts.backend == "rocm" else ""
        )
        return "bf16", f"bf16 autocast: native on {arch}, fp32's exponent range, so no loss scaling{extra}"
    if facts.backend == "rocm":
        return "fp16", (
            f"fp16: {rocm_family(facts.gfx_arch or '').upper()} ({arch}) has no bf16 arithmetic "
            f"(torch's is_bf16_supported() says True on every ROCm GPU){_fp16_note()}"
        )
    if "GTX 16" in facts.device_name.upper():
        return "fp32", "fp32: GTX 16xx cards have no tensor cores and GPT-SoVITS disables fp16 on them"
    if facts.compute_capability and facts.compute_capability < (7, 0):
        return "fp32", f"fp32: no tensor cores on {arch} (GPT-SoVITS also trains these in fp32)"
    return "fp16", f"fp16: no native bf16 below sm_80 ({arch}){_fp16_note()}"


def _fp16_note() -> str:
    return (
        f"; static loss scale {FP16_LOSS_SCALE:g}, divided out of each per-sample gradient before "
        "clipping (a GradScaler under Opacus would scale every update by the loss scale)"
    )


def _choose_checkpointing(
    stage: str, size: ModelSize, estimate, wanted: int | None, overrides: ProfileOverrides
) -> tuple[MemoryEstimate, bool, str]:
    plain = estimate(False)
    unsupported = (
        f"{stage} has no parameter-free region to recompute (checkpointing a module with "
        "parameters re-fires Opacus's hooks and breaks per-sample gradients)"
    )
    if overrides.checkpointing is not None:
        if overrides.checkpointing and not size.checkpointable:
            raise ConfigError(f"profile checkpointing cannot be enabled: {unsupported}")
        chosen = estimate(True) if overrides.checkpointing else plain
        return chosen, overrides.checkpointing, f"{'on' if overrides.checkpointing else 'off'}: pinned by override"
    if not size.checkpointable:
        return plain, False, f"off: {unsupported}; smaller physical batches instead"
    target = wanted or 1
    if plain.max_batch >= target:
        return (
            plain,
            False,
            (
                f"off: {plain.max_batch} samples fit without it"
                + (f", enough for logical batches up to {wanted}" if wanted else "")
            ),
        )
    saved = estimate(True)
    if saved.max_batch <= plain.max_batch:
        return plain, False, f"off: recomputing the attention core would not fit more samples ({plain.max_batch})"
    return (
        saved,
        True,
        (
            f"on: recomputing the attention core (parameter-free, so per-sample gradients stay exact) "
            f"fits {saved.max_batch} samples instead of {plain.max_batch}"
        ),
    )


def _choose_batch(
    memory: MemoryEstimate,
    wanted: int | None,
    overrides: ProfileOverrides,
    device: str,
    stage: str,
    config: str,
    spec: SubsetSpec,
) -> tuple[int, str]:
    fit = memory.max_batch
    terms = (
        f"fixed {memory.fixed / GiB:.2f} GiB (weights, AdamW, gradients), "
        f"{memory.per_sample / 2**20:.0f} MiB per sample (per-sample gradients + activations at "
        f"{PLANNING_SECONDS:g} s), budget {memory.budget / GiB:.2f} GiB"
    )
    if overrides.physical_batch is not None:
        note = (
            ""
            if overrides.physical_batch <= fit
            else (f"; above the memory model's {fit}: an out-of-memory step will halve it")
        )
        return overrides.physical_batch, f"{overrides.physical_batch}: pinned by override{note}"
    if fit < 1:
        raise DeviceError(
            f"{stage} {config} ({spec.kind}) does not fit in memory on {device}: {terms}; use the "
            "lora subset, a smaller model config, or a device with more memory"
        )
    if wanted is not None and wanted < fit:
        return wanted, f"{wanted}: covers Poisson logical batches (memory fits {fit}); {terms}"
    return fit, f"{fit}: {terms}"


def _choose_threads(facts: DeviceFacts, device: str, overrides: ProfileOverrides) -> tuple[int, str]:
    if overrides.threads is not None:
        if overrides.threads > facts.logical_cores:
            raise ConfigError(
                f"profile threads={overrides.threads} exceeds this machine's {facts.logical_cores} logical cores"
            )
        return overrides.threads, f"{overrides.threads}: pinned by override"
    role = "intra-op threads" if device == "cpu" else "threads for data loading and host-side ops"
    return facts.physical_cores, (
        f"{facts.physical_cores}: one per physical core ({role}); SMT siblings share the vector "
        "units the kernels saturate"
    )


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


__all__ = [
    "ACCELERATOR_FRACTION",
    "ACCELERATOR_RESERVE",
    "CPU_RAM_FRACTION",
    "CPU_RUNTIME_RESERVE",
    "FP16_LOSS_SCALE",
    "GPU_TIERS",
    "MEMORY_TABLE",
    "PHONEMES_PER_SECOND",
    "PLANNING_SECONDS",
    "PRECISIONS",
    "ActivationCost",
    "MemoryEstimate",
    "ModelSize",
    "ProfileOverrides",
    "ResourceProfile",
    "activation_cost",
    "estimate_memory",
    "gpu_tier",
    "memory_budget",
    "model_size",
    "nominal_gib",
    "poisson_batch_bound",
    "select_profile",
]
