"""Profile table: every branch (device, precision, checkpointing, threads) and every override."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedvox.client.device import REFERENCE_DEVICES, DeviceFacts, GiB
from fedvox.client.profiles import FP16_LOSS_SCALE, ProfileOverrides, gpu_tier, select_profile
from fedvox.shared.errors import ConfigError


def facts_of(name: str, **changes) -> DeviceFacts:
    return replace(REFERENCE_DEVICES[name], **changes)


def profile(facts: DeviceFacts, overrides: ProfileOverrides | None = None, **kwargs):
    kwargs.setdefault("logical_batch", 8)
    return select_profile(
        facts,
        kwargs.pop("stage", "s1"),
        kwargs.pop("config", "tiny"),
        kwargs.pop("subset", "lora"),
        overrides,
        **kwargs,
    )


# ---------------------------------------------------------------------- NVIDIA
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("h100", "nvidia-24gb+-bf16"),
        ("rtx4090", "nvidia-24gb+-bf16"),
        ("rtx3060", "nvidia-12gb-bf16"),
        ("t4", "nvidia-12gb-fp16"),
        ("rtx3070", "nvidia-8gb-bf16"),
        ("rtx2060", "nvidia-4gb-fp16"),
    ],
)
def test_nvidia_memory_tiers(name, expected):
    chosen = profile(REFERENCE_DEVICES[name])
    assert chosen.name == expected and chosen.device == "cuda:0"
    assert REFERENCE_DEVICES[name].device_name in chosen.reasons["device"]


@pytest.mark.parametrize(
    ("gib", "tier"),
    [
        (79.2, "24gb+"),
        (23.5, "24gb+"),
        (15.9, "12gb"),
        (11.76, "12gb"),
        (7.79, "8gb"),
        (5.79, "4gb"),
        (3.82, "4gb"),
        (1.95, "lt4gb"),
    ],
)
def test_tiers_round_torch_sizes_to_the_marketed_ones(gib, tier):
    assert gpu_tier(int(gib * GiB)) == tier


def test_gpu_below_4gb_trains_on_the_cpu():
    chosen = profile(REFERENCE_DEVICES["mx450"])
    assert chosen.device == "cpu" and chosen.name == "cpu-x86_64-fp32"
    assert "below 4 GB" in chosen.reasons["device"]


@pytest.mark.parametrize(
    ("capability", "kernels", "device", "precision", "why"),
    [
        ((6, 1), False, "cpu", "bf16", "no kernels"),  # current wheels start at sm_75; the host CPU has bf16
        ((6, 1), True, "cuda:0", "fp32", "no tensor cores"),  # a cu126 build still runs Pascal
        ((7, 0), True, "cuda:0", "fp16", "no native bf16"),
        ((7, 5), True, "cuda:0", "fp16", "no native bf16"),
        ((8, 0), True, "cuda:0", "bf16", "native on sm_80"),
        ((9, 0), True, "cuda:0", "bf16", "native on sm_90"),
    ],
)
def test_compute_capability_boundaries(capability, kernels, device, precision, why):
    facts = facts_of("rtx3060", compute_capability=capability, bf16=capability >= (8, 0), kernels=kernels)
    chosen = profile(facts)
    assert (chosen.device, chosen.precision) == (device, precision)
    reason = chosen.reasons["device"] + chosen.reasons["precision"]
    assert why in reason
    assert chosen.loss_scale == (FP16_LOSS_SCALE if precision == "fp16" else 1.0)


def test_old_gpu_reason_names_the_fix():
    chosen = profile(REFERENCE_DEVICES["gtx1080ti"])
    assert chosen.device == "cpu"
    assert "sm_61" in chosen.reasons["device"] and "cu126" in chosen.reasons["device"]
    kepler = profile(facts_of("gtx1080ti", compute_capability=(3, 5)))
    assert "no current PyTorch wheel" in kepler.reasons["device"]


def test_fp16_reason_explains_dp_correct_unscaling():
    chosen = profile(REFERENCE_DEVICES["t4"])
    assert chosen.precision == "fp16" and chosen.loss_scale == FP16_LOSS_SCALE
    assert "per-sample gradient before clipping" in chosen.reasons["precision"]
    assert "GradScaler" in chosen.reasons["precision"]


def test_gtx_16xx_trains_in_fp32():
    chosen = profile(REFERENCE_DEVICES["gtx1660"])
    assert chosen.device == "cuda:0" and chosen.precision == "fp32" and chosen.loss_scale == 1.0


# ---------------------------------------------------------------------- AMD
@pytest.mark.parametrize(
    ("name", "expected"),
    [("rx7900xtx", "amd-rdna3-24gb+-bf16"), ("rx9070xt", "amd-rdna4-12gb-bf16"), ("mi300x", "amd-cdna3-24gb+-bf16")],
)
def test_rocm_supported_families_use_bf16(name, expected):
    chosen = profile(REFERENCE_DEVICES[name])
    assert chosen.name == expected and chosen.device == "cuda:0" and chosen.loss_scale == 1.0


def test_rdna2_has_no_bf16():
    chosen = profile(REFERENCE_DEVICES["rx6800"])
    assert chosen.name == "amd-rdna2-12gb-fp16" and chosen.loss_scale == FP16_LOSS_SCALE
    assert "no bf16" in chosen.reasons["precision"] and "is_bf16_supported" in chosen.reasons["precision"]


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({}, "RDNA1"),  # rx5700xt: gfx1010, no kernels either
        ({"gfx_arch": "gfx906", "kernels": True, "device_name": "AMD Radeon VII"}, "GCN5 is not a supported"),
        ({"gfx_arch": "gfx1032", "kernels": False, "device_name": "AMD Radeon RX 6600"}, "HSA_OVERRIDE_GFX_VERSION"),
    ],
)
def test_unsupported_rocm_gpus_train_on_the_cpu(changes, why):
    chosen = profile(facts_of("rx5700xt", **changes))
    assert chosen.device == "cpu" and why in chosen.reasons["device"]


# ---------------------------------------------------------------------- Apple, CPUs
def test_apple_silicon_defaults_to_the_cpu():
    chosen = profile(REFERENCE_DEVICES["m2"])
    assert chosen.device == "cpu" and chosen.name == "apple-cpu-bf16"
    assert "leaks" in chosen.reasons["device"] and "--allow-mps" in chosen.reasons["device"]


def test_apple_silicon_opt_in_uses_mps_in_fp32():
    chosen = profile(REFERENCE_DEVICES["m2"], ProfileOverrides(allow_mps=True))
    assert chosen.device == "mps" and chosen.name == "apple-mps-fp32" and "opted in" in chosen.reasons["device"]
    assert profile(REFERENCE_DEVICES["m2"], ProfileOverrides(device="mps")).device == "mps"
    assert (
        profile(REFERENCE_DEVICES["m2"], ProfileOverrides(allow_mps=True, precision="fp16")).loss_scale
        == FP16_LOSS_SCALE
    )


@pytest.mark.parametrize(
    ("name", "expected", "why"),
    [
        ("x86-avx2", "cpu-x86_64-fp32", "has no AVX512-BF16/AMX"),
        ("xeon-amx", "cpu-x86_64-bf16", "has AVX512-BF16/AMX"),
        ("graviton3", "cpu-arm64-bf16", "has FEAT_BF16"),
        ("raspberry-pi5", "cpu-arm64-fp32", "has no FEAT_BF16"),
    ],
)
def test_cpu_precision_follows_the_isa(name, expected, why):
    chosen = profile(REFERENCE_DEVICES[name])
    assert chosen.name == expected and chosen.device == "cpu" and why in chosen.reasons["precision"]
    assert chosen.autocast_dtype is (None if expected.endswith("fp32") else torch.bfloat16)


@pytest.mark.parametrize("name", ["x86-avx2", "xeon-amx", "rtx3060", "m2"])
def test_threads_are_physical_cores(name):
    facts = REFERENCE_DEVICES[name]
    chosen = profile(facts)
    assert chosen.threads == facts.physical_cores and "physical core" in chosen.reasons["threads"]


def test_s2_never_checkpoints_and_says_why():
    chosen = profile(REFERENCE_DEVICES["x86-avx2"], stage="s2")
    assert not chosen.checkpointing and "parameter-free" in chosen.reasons["checkpointing"]


# ---------------------------------------------------------------------- overrides
def test_every_override_is_honoured_and_said_so():
    pins = ProfileOverrides(device="cpu", precision="fp32", physical_batch=3, checkpointing=True, threads=1)
    chosen = profile(REFERENCE_DEVICES["rtx3060"], pins)
    assert (chosen.device, chosen.precision, chosen.physical_batch, chosen.checkpointing, chosen.threads) == (
        "cpu",
        "fp32",
        3,
        True,
        1,
    )
    assert all("pinned by override" in reason for reason in chosen.reasons.values())


def test_forcing_a_gpu_that_fedvox_would_skip():
    chosen = profile(REFERENCE_DEVICES["mx450"], ProfileOverrides(device="cuda"))
    assert chosen.device == "cuda:0" and "despite" in chosen.reasons["device"]


def test_bf16_on_a_cpu_without_it_is_allowed_but_flagged():
    chosen = profile(REFERENCE_DEVICES["x86-avx2"], ProfileOverrides(precision="bf16"))
    assert chosen.precision == "bf16" and "emulated" in chosen.reasons["precision"]


def test_physical_batch_above_the_memory_model_is_flagged():
    facts = facts_of("x86-avx2", ram=2 * GiB)
    chosen = profile(facts, ProfileOverrides(physical_batch=10_000), config="v2")
    assert chosen.physical_batch == 10_000 and "halve" in chosen.reasons["physical_batch"]


@pytest.mark.parametrize(
    ("facts", "overrides", "message"),
    [
        ("x86-avx2", {"device": "cuda"}, "needs an NVIDIA or AMD GPU"),
        ("rtx3060", {"device": "mps"}, "needs an Apple GPU"),
        ("rtx3060", {"device": "cuda:1"}, "not the probed GPU cuda:0"),
        ("gtx1080ti", {"device": "cuda"}, "cu126"),
        ("t4", {"precision": "bf16"}, "no native bf16"),
        ("rx6800", {"precision": "bf16"}, "crashes on RDNA2"),
        ("x86-avx2", {"precision": "fp16"}, "not offered on CPU"),
        ("x86-avx2", {"threads": 64}, "exceeds this machine's 12 logical cores"),
        ("x86-avx2", {"checkpointing": True, "__stage": "s2"}, "no parameter-free region"),
    ],
)
def test_overrides_the_device_cannot_honour(facts, overrides, message):
    stage = overrides.pop("__stage", "s1")
    with pytest.raises(ConfigError, match=message):
        profile(REFERENCE_DEVICES[facts], ProfileOverrides(**overrides), stage=stage)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"device": "gpu"}, "cpu, cuda, cuda:N or mps"),
        ({"precision": "fp8"}, "bf16, fp16, fp32"),
        ({"physical_batch": 0}, "physical-batch must be >= 1, got 0"),
        ({"physical_batch": True}, "physical-batch must be an integer, got True"),
        ({"threads": 2.5}, "threads must be an integer, got 2.5"),
        ({"checkpointing": "yes"}, "true or false"),
    ],
)
def test_override_values_are_validated(values, message):
    with pytest.raises(ConfigError, match=message):
        ProfileOverrides(**values)


def test_overrides_from_node_config_and_toml(tmp_path):
    node = {"profile.physical-batch": 4, "profile.allow-mps": True, "data-path": "/data", "ledger": "x.db"}
    assert ProfileOverrides.from_mapping(node) == ProfileOverrides(physical_batch=4, allow_mps=True)
    with pytest.raises(ConfigError, match=r"unknown profile key 'profile.batch'; known keys: .*physical-batch"):
        ProfileOverrides.from_mapping({"profile.batch": 4})
    path = tmp_path / "client.toml"
    path.write_text('[profile]\ndevice = "cpu"\nthreads = 2\nphysical_batch = 8\n')
    from_file = ProfileOverrides.from_toml(path)
    assert from_file == ProfileOverrides(device="cpu", threads=2, physical_batch=8)
    flags = ProfileOverrides(threads=1, allow_mps=True)
    assert from_file.merged(flags) == ProfileOverrides(device="cpu", threads=1, physical_batch=8, allow_mps=True)
    path.write_text("[profile\n")
    with pytest.raises(ConfigError, match="cannot read profile settings"):
        ProfileOverrides.from_toml(path)
    path.write_text('profile = "fast"\n')
    with pytest.raises(ConfigError, match="must be a table"):
        ProfileOverrides.from_toml(path)
    path.write_text("[profile]\nthreads = 0\n")
    with pytest.raises(ConfigError, match=rf"^{path}: profile threads must be >= 1, got 0$"):
        ProfileOverrides.from_toml(path)
