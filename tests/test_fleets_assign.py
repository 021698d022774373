"""Fleets: proportions, determinism per seed, availability draws, host settings, the TOML schema."""

import math
from collections import Counter
from dataclasses import replace

import pytest

from fedvox.client.device import reference_device
from fedvox.client.profiles import select_profile
from fedvox.shared.errors import ConfigError
from fedvox.shared.runconfig import RunConfig
from fedvox.simulations.fleets import NAMED_FLEETS, DeviceClass, host_settings, load_fleet, plan_clients, round_draw
from tests.tiny import TINY

MIXED = load_fleet("mixed")
CPU_HOST = replace(reference_device("x86-avx2"), physical_cores=2, logical_cores=2)


def test_the_mixed_fleet_holds_every_device_kind_the_issue_names():
    names = {c.name: c for c in MIXED.classes}
    assert set(names) == {"nvidia-24gb", "nvidia-12gb", "nvidia-6gb", "amd-rdna3", "apple-cpu", "x86-cpu", "arm-cpu"}
    assert names["apple-cpu"].facts.backend == "mps"
    assert names["arm-cpu"].facts.cpu_arch == "arm64" and names["arm-cpu"].facts.backend == "cpu"
    assert names["amd-rdna3"].facts.gfx_arch.startswith("gfx11")
    assert {round(names[n].facts.total_memory / 2**30) for n in ("nvidia-24gb", "nvidia-12gb", "nvidia-6gb")} == {
        24,
        12,
        6,
    }


@pytest.mark.parametrize("n", [1, 3, 8, 100, 1000])
def test_counts_follow_the_shares_within_one_client(n):
    counts = MIXED.counts(n)
    assert sum(counts) == n
    total = sum(c.share for c in MIXED.classes)
    for count, device in zip(counts, MIXED.classes, strict=True):
        assert abs(count - n * device.share / total) < 1


def test_assignment_is_deterministic_per_seed_and_keeps_the_counts():
    first, again, other = MIXED.assign(100, seed=3), MIXED.assign(100, seed=3), MIXED.assign(100, seed=4)
    assert [c.name for c in first] == [c.name for c in again]
    assert [c.name for c in first] != [c.name for c in other]
    expected = dict(zip((c.name for c in MIXED.classes), MIXED.counts(100), strict=True))
    assert Counter(c.name for c in first) == Counter(c.name for c in other) == Counter(expected)


def test_round_draws_are_deterministic_and_follow_the_dropout_probability():
    device = replace(MIXED.classes[0], dropout=0.25, jitter=0.5)
    draws = [round_draw(device, 7, p, r) for p in range(40) for r in range(1, 26)]
    assert draws == [round_draw(device, 7, p, r) for p in range(40) for r in range(1, 26)]
    rate = sum(d.dropped for d in draws) / len(draws)
    assert 0.2 < rate < 0.3  # 1000 draws: 4.3 standard deviations either side
    slowdowns = [math.log(d.slowdown) for d in draws]
    assert abs(sum(slowdowns) / len(slowdowns)) < 0.05
    never = replace(device, dropout=0.0, jitter=0.0)
    assert all(not round_draw(never, 7, p, 1).dropped and round_draw(never, 7, p, 1).slowdown == 1.0 for p in range(50))


def test_a_slow_device_misses_a_deadline_set_by_the_median_client():
    fast, slow = (DeviceClass("fast", CPU_HOST, 1, speed=10.0), DeviceClass("slow", CPU_HOST, 1, speed=0.5))
    fleet = replace(MIXED, devices={"fast": fast, "slow": slow}, deadline_factor=3.0)
    devices = [fast] * 9 + [slow]
    deadline = fleet.deadline_s(devices, compute_host_s=10.0, bytes_down=0, bytes_up=0)
    assert deadline == pytest.approx(3 * fast.duration_s(10.0, 0, 0))
    assert fast.duration_s(10.0, 0, 0) < deadline < slow.duration_s(10.0, 0, 0)
    assert replace(fleet, deadline_factor=0.0).deadline_s(devices, 10.0, 0, 0) == math.inf


def test_transfer_time_counts_both_directions_and_the_latency():
    device = DeviceClass("d", CPU_HOST, 1, uplink_mbps=8.0, downlink_mbps=80.0, latency_s=0.1)
    assert device.transfer_s(bytes_down=10e6, bytes_up=1e6) == pytest.approx(1.0 + 1.0 + 0.2)


def test_clients_train_with_their_devices_batch_and_a_precision_the_host_has():
    config = RunConfig().with_overrides(TINY)
    clients = plan_clients(MIXED, 30, 0, config, CPU_HOST, workers=2)
    for client in clients:
        overrides = client.node_config
        assert overrides["profile.device"] == "cpu" and overrides["profile.threads"] == 1
        assert overrides["profile.physical-batch"] == client.physical_batch
        assert overrides["profile.precision"] == "fp32"  # this host has no native bf16 or fp16
        if client.precision != "fp32":
            assert "runs as fp32" in client.host_note
    six = next(c for c in clients if c.device.name == "nvidia-6gb")
    assert six.precision == "fp16"  # sm_75: no native bf16
    bf16_host = replace(CPU_HOST, cpu_bf16=True)
    host_profile = select_profile(bf16_host, "s1", "tiny", "lora", logical_batch=8)
    simulated = select_profile(reference_device("rtx4090"), "s1", "tiny", "lora", logical_batch=8)
    overrides, note = host_settings(simulated, bf16_host, host_profile, threads=1)
    assert overrides["profile.precision"] == "bf16" and note == ""


def test_named_fleets_load_and_bad_fleet_files_say_what_is_wrong(tmp_path):
    for name in NAMED_FLEETS:
        assert load_fleet(name).classes
    with pytest.raises(ConfigError, match="unknown fleet 'nope'"):
        load_fleet("nope")
    cases = {
        "[devices.a]\nreference = 'rtx3060'\nshare = 1\nspeed = 0": (
            "fleet0.toml: fleet devices.a.speed must be > 0, got 0$"
        ),
        "[devices.a]\nreference = 'rtx3060'\nshare = 1\ndropout = 1.5": "dropout .* probability",
        "[devices.a]\nreference = 'rtx3060'\nshare = 1\ncolour = 'red'": (
            "unknown fleet key 'devices.a.colour'; known keys: name, facts, share"
        ),
        "[devices.a]\nshare = 1": "exactly one of reference",
        "[devices.a]\nreference = 'gtx9999'\nshare = 1": "unknown reference device",
        "deadline-factor = 0.5\n[devices.a]\nreference = 'rtx3060'\nshare = 1": "deadline-factor",
        "name = 'x'": "needs devices \\(a \\[devices.<name>\\] table",
        "[devices.a]\nshare = 1\n[devices.a.facts]\nbackend = 'tpu'\ndevice_name = 'x'": (
            "fleet devices.a.facts.backend must be one of cuda, rocm, mps, cpu, got 'tpu'"
        ),
    }
    for k, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"fleet{k}.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_fleet(path)


def test_a_custom_fleet_file_with_written_out_facts(tmp_path):
    path = tmp_path / "lab.toml"
    path.write_text(
        "deadline-factor = 2.0\n"
        "[devices.gpu]\nreference = 'rtx3060'\nshare = 3\nspeed = 12.0\n"
        "[devices.board]\nshare = 1\nspeed = 0.3\ndropout = 0.2\n"
        "[devices.board.facts]\nbackend = 'cpu'\ndevice_name = 'Cortex-A72'\ncpu_arch = 'arm64'\n"
        "physical_cores = 4\nlogical_cores = 4\nram = 4294967296\n"
    )
    fleet = load_fleet(path)
    assert fleet.name == "lab" and fleet.deadline_factor == 2.0
    assert fleet.counts(8) == [6, 2]
    board = fleet.classes[1]
    assert board.facts.device_name == "Cortex-A72" and board.dropout == 0.2


def test_where_memory_binds_6_gb_12_gb_and_cpu_devices_run_different_batches():
    """With a v2-sized s1 trained in full (not the tiny config: every class fits it whole), the
    simulated memory decides what each class runs: physical batch, precision, checkpointing."""
    config = RunConfig().with_overrides({"model-config": "v2", "pretrained": "", "subset": "full", "logical-batch": 32})
    plan = {c.device.name: c for c in plan_clients(MIXED, 2 * len(MIXED.classes), 0, config, CPU_HOST, 2)}
    six, twelve, cpu = plan["nvidia-6gb"], plan["nvidia-12gb"], plan["x86-cpu"]
    assert len({six.physical_batch, twelve.physical_batch, cpu.physical_batch}) == 3
    assert six.physical_batch < twelve.physical_batch
    assert {six.precision, twelve.precision, cpu.precision} == {"fp16", "bf16", "fp32"}
    assert all(c.checkpointing for c in (six, twelve, cpu))
