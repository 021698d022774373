"""The memory model behind physical batch sizes, and the measured activation table it reads."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

import fedvox.client.profiles as profiles
from fedvox.client.device import REFERENCE_DEVICES, GiB
from fedvox.client.profiles import (
    ACCELERATOR_FRACTION,
    ACCELERATOR_RESERVE,
    CPU_RAM_FRACTION,
    CPU_RUNTIME_RESERVE,
    ActivationCost,
    ModelSize,
    ProfileOverrides,
    activation_cost,
    estimate_memory,
    memory_budget,
    model_size,
    poisson_batch_bound,
    select_profile,
)
from fedvox.shared.errors import ConfigError, DeviceError
from fedvox.shared.models.config import CONFIG_NAMES
from fedvox.shared.models.subsets import SubsetSpec

MiB = 2**20
RUNTIME = 256 * MiB


def row(stage="s1", config="v2", subset="lora", precision="fp32", checkpointing=False, device="cpu", mib=100):
    return {
        "device": device,
        "stage": stage,
        "config": config,
        "subset": subset,
        "precision": precision,
        "checkpointing": checkpointing,
        "activation_bytes": mib * MiB,
        "host": "test host",
        "torch": "2.14.1",
    }


@pytest.fixture
def table(monkeypatch):
    """A synthetic activation table with round numbers (the shipped one is checked separately)."""
    rows = [
        row(
            stage=stage,
            config=config,
            subset=subset,
            precision=precision,
            checkpointing=ckpt,
            mib=(400 if subset == "full" else 300) // (2 if precision == "bf16" else 1) // (3 if ckpt else 1),
        )
        for stage, config, subset, precision, ckpt in itertools.product(
            ("s1", "s2"), ("tiny", "v2", "v2Pro", "v2ProPlus"), ("lora", "full"), ("fp32", "bf16"), (False, True)
        )
    ]
    monkeypatch.setattr(profiles, "_memory_rows", lambda: tuple(rows))
    return rows


def test_memory_model_terms():
    size = ModelSize(parameters=1000, trainable=100, checkpointable=False)
    cost = ActivationCost(50, "cpu", False, "")
    fp32 = estimate_memory(size, cost, "fp32", budget=10_000)
    assert (fp32.fixed, fp32.per_sample) == (1000 * 4 + 100 * 16, 100 * 4 + 50)
    assert fp32.max_batch == (10_000 - 5600) // 450
    bf16 = estimate_memory(size, cost, "bf16", budget=10_000)
    assert (bf16.fixed, bf16.per_sample) == (1000 * 6 + 100 * 16, 100 * 2 + 50)
    assert estimate_memory(size, cost, "fp32", budget=5000).max_batch == 0


def test_budgets():
    cpu = REFERENCE_DEVICES["x86-avx2"]
    gpu = REFERENCE_DEVICES["rtx3060"]
    assert memory_budget(cpu, "cpu") == int(cpu.ram * CPU_RAM_FRACTION) - CPU_RUNTIME_RESERVE
    assert memory_budget(gpu, "cuda:0") == int(gpu.total_memory * ACCELERATOR_FRACTION) - ACCELERATOR_RESERVE
    assert memory_budget(gpu, "cpu") == int(gpu.ram * CPU_RAM_FRACTION) - CPU_RUNTIME_RESERVE


def test_model_sizes_come_from_the_real_models():
    s1_full = model_size("s1", "v2", SubsetSpec("full"))
    s1_lora = model_size("s1", "v2", SubsetSpec("lora"))
    assert s1_full.parameters == s1_full.trainable > 70e6  # GPT-SoVITS's GPT is ~77M
    assert s1_lora.trainable < s1_full.trainable / 20 and s1_lora.parameters > s1_full.parameters
    assert model_size("s1", "v2", SubsetSpec("lora", lora_rank=16)).trainable == 2 * s1_lora.trainable
    assert s1_full.checkpointable
    s2_lora = model_size("s2", "v2", SubsetSpec("lora"))
    s2_full = model_size("s2", "v2", SubsetSpec("full"))
    assert not s2_lora.checkpointable and s2_lora.trainable > 40e6  # the discriminator trains in full
    assert s2_full.trainable < s2_full.parameters  # the codebook and ssl_proj are never trained
    with pytest.raises(ConfigError, match="unknown stage"):
        model_size("s3", "v2", SubsetSpec("full"))


def test_physical_batch_is_the_memory_model(table):
    facts = REFERENCE_DEVICES["rtx3060"]
    chosen = select_profile(facts, "s1", "v2", "lora", logical_batch=None)
    size = model_size("s1", "v2", SubsetSpec("lora"))
    budget = int(facts.total_memory * ACCELERATOR_FRACTION) - ACCELERATOR_RESERVE
    fixed = size.parameters * 6 + size.trainable * 16
    per_sample = size.trainable * 2 + 150 * MiB  # bf16 row of the fixture
    assert chosen.precision == "bf16"
    assert chosen.physical_batch == (budget - fixed) // per_sample == chosen.memory.max_batch
    assert "GiB" in chosen.reasons["physical_batch"]


def test_logical_batch_caps_the_physical_batch(table):
    assert poisson_batch_bound(8) == 17 and poisson_batch_bound(100) == 130
    chosen = select_profile(REFERENCE_DEVICES["h100"], "s1", "v2", "lora", logical_batch=8)
    assert chosen.physical_batch == 17 < chosen.memory.max_batch
    assert "Poisson" in chosen.reasons["physical_batch"]


def test_more_memory_never_means_a_smaller_batch(table):
    batches = [
        select_profile(
            replace(REFERENCE_DEVICES["rtx3060"], total_memory=int(gib * GiB)), "s1", "v2", "full"
        ).physical_batch
        for gib in (4, 6, 8, 12, 16, 24, 48, 80)
    ]
    assert batches == sorted(batches) and batches[0] < batches[-1]


def test_full_fine_tuning_costs_more_per_sample(table):
    facts = REFERENCE_DEVICES["rtx4090"]
    lora = select_profile(facts, "s1", "v2", "lora")
    full = select_profile(facts, "s1", "v2", "full")
    assert full.memory.per_sample > lora.memory.per_sample and full.memory.fixed > lora.memory.fixed
    assert full.physical_batch < lora.physical_batch


def test_checkpointing_turns_on_only_when_memory_is_short(table):
    roomy = select_profile(REFERENCE_DEVICES["h100"], "s1", "v2", "full", logical_batch=8)
    assert not roomy.checkpointing and "enough for logical batches up to 17" in roomy.reasons["checkpointing"]
    tight = select_profile(REFERENCE_DEVICES["rtx2060"], "s1", "v2", "full", logical_batch=8)
    assert tight.checkpointing and "parameter-free" in tight.reasons["checkpointing"]
    plain = select_profile(
        REFERENCE_DEVICES["rtx2060"], "s1", "v2", "full", ProfileOverrides(checkpointing=False), logical_batch=8
    )
    assert tight.physical_batch > plain.physical_batch


def test_a_gpu_too_small_for_the_model_falls_back_to_the_cpu(table):
    facts = replace(REFERENCE_DEVICES["rtx2060"], total_memory=int(3.6 * GiB))
    chosen = select_profile(facts, "s2", "v2ProPlus", "full")
    assert chosen.device == "cpu" and "does not fit in memory on cuda:0" in chosen.reasons["device"]
    with pytest.raises(DeviceError, match="does not fit in memory on cuda:0"):
        select_profile(facts, "s2", "v2ProPlus", "full", ProfileOverrides(device="cuda"))
    with pytest.raises(DeviceError, match="use the lora subset"):
        select_profile(replace(facts, ram=4 * GiB), "s2", "v2ProPlus", "full")


def test_gpu_figures_are_flagged_as_estimates_until_measured_on_a_gpu(table):
    gpu = select_profile(REFERENCE_DEVICES["rtx3060"], "s1", "v2", "lora")
    assert gpu.memory.activation.estimate and "ESTIMATE for cuda" in gpu.memory.activation.note
    cpu = select_profile(REFERENCE_DEVICES["x86-avx2"], "s1", "v2", "lora")
    assert not cpu.memory.activation.estimate and "measured on test host" in cpu.memory.activation.note
    table.append(row(device="cuda", precision="bf16", mib=42))
    measured = select_profile(REFERENCE_DEVICES["rtx3060"], "s1", "v2", "lora")
    assert not measured.memory.activation.estimate and measured.memory.activation.bytes_per_sample == 42 * MiB


def test_activation_lookup_rules():
    rows = (
        row(config="v2", precision="bf16", mib=7),
        row(config="v2", subset="full", mib=9),
        row(stage="s2", config="v2", mib=11),
        row(config="v2", device="cuda", precision="bf16", mib=5),
    )
    lookup = lambda *args: activation_cost(*args, table=rows).bytes_per_sample // MiB  # noqa: E731
    assert lookup("s1", "v2Pro", SubsetSpec("lora"), "fp16", False, "cpu") == 7  # same architecture, same mixed class
    assert lookup("s1", "v1", SubsetSpec("lora"), "bf16", False, "cpu") == 7  # v1 differs in vocabulary only
    assert lookup("s1", "v2", SubsetSpec("groups", groups=("head",)), "fp32", False, "cpu") == 9  # upper bound
    assert lookup("s2", "v1", SubsetSpec("lora"), "fp32", False, "cpu") == 11
    assert lookup("s1", "v2", SubsetSpec("lora"), "bf16", False, "rocm") == 5  # GPU rows serve every GPU
    with pytest.raises(ConfigError, match=r"no activation measurement for s2 v2Pro.*bench.profile_memory"):
        activation_cost("s2", "v2Pro", SubsetSpec("lora"), "fp32", False, "cpu", table=rows)


def test_the_shipped_table_covers_every_profile_the_cpu_can_choose():
    for stage, config, subset, precision in itertools.product(
        ("s1", "s2"), CONFIG_NAMES, ("lora", "full"), ("fp32", "bf16")
    ):
        for checkpointing in (False, True) if stage == "s1" else (False,):
            cost = activation_cost(stage, config, SubsetSpec(subset), precision, checkpointing, "cpu")
            assert cost.measured_on == "cpu" and not cost.estimate
            assert 0 < cost.bytes_per_sample < 8 * GiB


def test_the_shipped_table_is_consistent():
    rows = profiles._memory_rows()
    by_key = {(r["stage"], r["config"], r["subset"], r["precision"], r["checkpointing"]): r for r in rows}
    for key, r in by_key.items():
        stage, config, subset, precision, ckpt = key
        assert r["activation_bytes"] > 0, key
        for batch, peak in zip(r["batches"], r["dp_peak_bytes"], strict=True):
            took = peak - r["baseline_bytes"]
            modelled = r["fixed_bytes_model"] + batch * r["per_sample_bytes_model"]
            # an upper bound, up to the CPU runtime's own ~200 MiB (threads, oneDNN, allocator)
            assert took <= modelled + RUNTIME, (key, batch)
            if config != "tiny":  # and not a wild one for the official sizes
                assert took >= 0.5 * modelled, (key, batch)
        if ckpt:  # recomputing the attention core never costs memory
            plain = by_key[(stage, config, subset, precision, False)]
            assert r["activation_bytes"] <= plain["activation_bytes"] * 1.05, key
