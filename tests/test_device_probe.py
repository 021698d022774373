"""Device probe: every backend faked through the torch/psutil/platform surface it reads."""

from __future__ import annotations

import json
import platform
from types import SimpleNamespace

import psutil
import pytest
import torch

from fedvox.client.device import (
    BACKENDS,
    REFERENCE_DEVICES,
    DeviceFacts,
    GiB,
    cuda_kernels_available,
    probe,
    reference_device,
    rocm_family,
)
from fedvox.shared.errors import ConfigError

CU130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
ROCM = [
    "gfx900",
    "gfx906",
    "gfx908",
    "gfx90a",
    "gfx942",
    "gfx1030",
    "gfx1100",
    "gfx1101",
    "gfx1102",
    "gfx1200",
    "gfx1201",
]


class _DeviceContext:
    def __init__(self, cuda, index):
        self.cuda, self.index = cuda, index

    def __enter__(self):
        self.cuda.current = self.index

    def __exit__(self, *exc):
        self.cuda.current = 0


def fake_torch(
    *,
    gpu=None,
    hip=None,
    archs=(),
    mps=None,
    isa="AVX2",
    avx512_bf16=False,
    amx=False,
    mkldnn_bf16=False,
    cpu_helpers=True,
):
    """The slice of torch's API that ``probe`` reads, with torch's own rules for bf16."""
    cuda = SimpleNamespace(current=0, bf16_calls=[])
    cuda.is_available = lambda: gpu is not None
    cuda.get_device_properties = lambda i: gpu[i]
    cuda.get_arch_list = lambda: list(archs)
    cuda.device = lambda i: _DeviceContext(cuda, i)

    def is_bf16_supported(including_emulation=True):
        cuda.bf16_calls.append((cuda.current, including_emulation))
        if hip:
            return True  # torch's answer on every ROCm build
        return gpu[cuda.current].major >= 8 or including_emulation

    cuda.is_bf16_supported = is_bf16_supported
    mps_backend = SimpleNamespace(
        is_available=lambda: mps is not None,
        get_name=lambda: mps["name"],
        is_macos_or_newer=lambda major, minor: (mps or {}).get("macos", 15) >= major,
    )
    cpu = SimpleNamespace()
    if cpu_helpers:
        cpu._is_avx512_bf16_supported = lambda: avx512_bf16
        cpu._is_amx_tile_supported = lambda: amx
    return SimpleNamespace(
        __version__="2.14.1+fake",
        version=SimpleNamespace(hip=hip, cuda=None if hip else "13.0"),
        cuda=cuda,
        mps=SimpleNamespace(recommended_max_memory=lambda: (mps or {}).get("memory", 0)),
        backends=SimpleNamespace(mps=mps_backend, cpu=SimpleNamespace(get_cpu_capability=lambda: isa)),
        cpu=cpu,
        ops=SimpleNamespace(mkldnn=SimpleNamespace(_is_mkldnn_bf16_supported=lambda: mkldnn_bf16)),
    )


def fake_psutil(physical=8, logical=16, ram_gib=32, affinity=None):
    def cpu_count(logical=True):
        return logical_count if logical else physical

    logical_count = logical
    process = SimpleNamespace()
    if affinity is not None:
        process.cpu_affinity = lambda: list(range(affinity))
    return SimpleNamespace(
        cpu_count=cpu_count,
        virtual_memory=lambda: SimpleNamespace(total=ram_gib * GiB),
        Process=lambda: process,
    )


def fake_platform(machine="x86_64", system="Linux", release="6.8.0", processor=""):
    return SimpleNamespace(
        machine=lambda: machine, system=lambda: system, release=lambda: release, processor=lambda: processor
    )


def nvidia(name, gib, major, minor):
    return SimpleNamespace(name=name, total_memory=int(gib * GiB), major=major, minor=minor, gcnArchName=name)


def amd(name, gib, gcn):
    return SimpleNamespace(name=name, total_memory=int(gib * GiB), major=11, minor=0, gcnArchName=gcn)


def run_probe(tmp_path, torch_module, index=0, **host):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Fake CPU 9000\n")
    machine = host.pop("machine", "x86_64")
    return probe(
        index,
        torch_module=torch_module,
        psutil_module=fake_psutil(**host),
        platform_module=fake_platform(machine),
        cpuinfo_path=cpuinfo,
    )


# ---------------------------------------------------------------------- NVIDIA
def test_nvidia_ampere_has_native_bf16_and_kernels(tmp_path):
    tm = fake_torch(gpu=[nvidia("NVIDIA GeForce RTX 3060", 11.76, 8, 6)], archs=CU130)
    facts = run_probe(tmp_path, tm)
    assert facts.backend == "cuda" and facts.device_name == "NVIDIA GeForce RTX 3060"
    assert facts.compute_capability == (8, 6) and facts.gfx_arch is None
    assert facts.total_memory == int(11.76 * GiB)
    assert facts.bf16 and facts.kernels
    assert tm.cuda.bf16_calls == [(0, False)]  # asked without emulation


def test_turing_bf16_is_emulated_so_it_counts_as_absent(tmp_path):
    tm = fake_torch(gpu=[nvidia("Tesla T4", 14.58, 7, 5)], archs=CU130)
    facts = run_probe(tmp_path, tm)
    assert tm.cuda.is_bf16_supported() is True  # torch's default answer counts emulation
    assert not facts.bf16 and facts.kernels


def test_pascal_has_no_kernels_in_current_wheels_but_in_cu126(tmp_path):
    gpu = [nvidia("NVIDIA GeForce GTX 1080 Ti", 10.91, 6, 1)]
    assert not run_probe(tmp_path, fake_torch(gpu=gpu, archs=CU130)).kernels
    assert run_probe(tmp_path, fake_torch(gpu=gpu, archs=CU126)).kernels


def test_the_requested_gpu_is_probed(tmp_path):
    tm = fake_torch(gpu=[nvidia("Tesla T4", 14.58, 7, 5), nvidia("NVIDIA A100", 79.2, 8, 0)], archs=CU130)
    facts = run_probe(tmp_path, tm, index=1)
    assert facts.device_index == 1 and facts.compute_capability == (8, 0) and facts.bf16
    assert tm.cuda.bf16_calls == [(1, False)]


@pytest.mark.parametrize(
    ("capability", "archs", "expected"),
    [
        ((8, 9), ["sm_86"], True),  # same major, newer minor runs the cubin
        ((8, 6), ["sm_89"], False),  # older minor cannot
        ((8, 9), ["sm_90"], False),
        ((12, 1), CU130, True),
        ((10, 0), ["sm_90", "compute_90"], True),  # PTX is JIT-compiled forward
        ((8, 6), ["compute_90"], False),
        ((9, 0), ["sm_90a"], True),
        ((7, 0), CU130, False),
        ((7, 5), [], False),
    ],
)
def test_cuda_kernel_compatibility(capability, archs, expected):
    assert cuda_kernels_available(capability, tuple(archs)) is expected


# ---------------------------------------------------------------------- AMD
@pytest.mark.parametrize(
    ("gcn", "arch", "family", "bf16", "kernels"),
    [
        ("gfx1100", "gfx1100", "rdna3", True, True),
        ("gfx1201", "gfx1201", "rdna4", True, True),
        ("gfx90a:sramecc+:xnack-", "gfx90a", "cdna2", True, True),
        ("gfx942:sramecc+:xnack-", "gfx942", "cdna3", True, True),
        ("gfx1030", "gfx1030", "rdna2", False, True),
        ("gfx1032", "gfx1032", "rdna2", False, False),
        ("gfx1010:xnack-", "gfx1010", "rdna1", False, False),
    ],
)
def test_rocm_bf16_comes_from_the_architecture_not_from_torch(tmp_path, gcn, arch, family, bf16, kernels):
    tm = fake_torch(gpu=[amd("AMD Radeon", 16, gcn)], hip="6.2.41133", archs=ROCM)
    facts = run_probe(tmp_path, tm)
    assert tm.cuda.is_bf16_supported() is True  # what torch would have claimed
    assert facts.backend == "rocm" and facts.gfx_arch == arch and facts.compute_capability is None
    assert rocm_family(arch) == family
    assert facts.bf16 is bf16 and facts.kernels is kernels


def test_rocm_families():
    assert [rocm_family(g) for g in ("gfx908", "gfx950", "gfx1151", "gfx1036", "gfx906", "gfx803", "gfx1")] == [
        "cdna1",
        "cdna4",
        "rdna3.5",
        "rdna2",
        "gcn5",
        "gcn4",
        "unknown",
    ]


# ---------------------------------------------------------------------- Apple, CPUs
def test_apple_silicon_reports_mps_with_unified_memory(tmp_path):
    tm = fake_torch(
        mps={"name": "Apple M2 Pro", "memory": int(21.3 * GiB), "macos": 15}, isa="DEFAULT", mkldnn_bf16=True
    )
    facts = run_probe(tmp_path, tm, machine="arm64", physical=10, logical=10, ram_gib=32)
    assert facts.backend == "mps" and facts.device_name == "Apple M2 Pro"
    assert facts.total_memory == int(21.3 * GiB) and facts.cpu_arch == "arm64"
    assert facts.cpu_bf16 and facts.bf16


def test_m1_on_old_macos_has_no_bf16(tmp_path):
    tm = fake_torch(mps={"name": "Apple M1", "memory": 10 * GiB, "macos": 13}, isa="DEFAULT")
    facts = run_probe(tmp_path, tm, machine="arm64")
    assert facts.backend == "mps" and not facts.bf16 and not facts.cpu_bf16


@pytest.mark.parametrize(
    ("flags", "expected"),
    [({"avx512_bf16": True}, True), ({"amx": True}, True), ({}, False), ({"cpu_helpers": False}, False)],
)
def test_x86_cpu_bf16_from_torch_helpers(tmp_path, flags, expected):
    facts = run_probe(tmp_path, fake_torch(isa="AVX512", **flags))
    assert facts.backend == "cpu" and facts.cpu_arch == "x86_64" and facts.cpu_isa == "AVX512"
    assert facts.cpu_bf16 is expected
    assert facts.device_name == facts.cpu_name == "Fake CPU 9000"
    assert facts.total_memory == 0 and not facts.bf16


@pytest.mark.parametrize("machine", ["aarch64", "arm64"])
def test_arm64_cpu_bf16_from_the_mkldnn_check(tmp_path, machine):
    facts = run_probe(tmp_path, fake_torch(isa="SVE256", mkldnn_bf16=True), machine=machine)
    assert facts.cpu_arch == "arm64" and facts.cpu_isa == "SVE256" and facts.cpu_bf16
    # On x86 the same mkldnn check only means "AVX512 can convert", which is not native bf16.
    assert not run_probe(tmp_path, fake_torch(isa="AVX512", mkldnn_bf16=True)).cpu_bf16


def test_cores_and_ram_respect_cpu_affinity(tmp_path):
    facts = run_probe(tmp_path, fake_torch(), physical=32, logical=64, ram_gib=256, affinity=4)
    assert (facts.physical_cores, facts.logical_cores, facts.ram) == (4, 4, 256 * GiB)
    facts = run_probe(tmp_path, fake_torch(), physical=None, logical=6)
    assert (facts.physical_cores, facts.logical_cores) == (6, 6)


# ---------------------------------------------------------------------- this machine
def test_probe_of_this_machine_is_sane():
    facts = probe()
    assert facts.backend in BACKENDS
    if not torch.cuda.is_available():
        assert facts.backend in ("cpu", "mps")
    assert facts.cpu_arch == {"x86_64": "x86_64", "AMD64": "x86_64"}.get(platform.machine(), "arm64")
    assert facts.cpu_isa == torch.backends.cpu.get_cpu_capability()
    assert 1 <= facts.physical_cores <= facts.logical_cores <= (psutil.cpu_count() or 1)
    assert facts.ram == psutil.virtual_memory().total > GiB
    assert facts.torch_version == torch.__version__ and facts.cpu_name
    if facts.cpu_arch == "x86_64":
        assert facts.cpu_bf16 == bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    assert DeviceFacts.from_dict(json.loads(json.dumps(facts.to_dict()))) == facts


# ---------------------------------------------------------------------- facts by hand
def test_facts_round_trip_and_validation():
    for facts in REFERENCE_DEVICES.values():
        assert DeviceFacts.from_dict(json.loads(json.dumps(facts.to_dict()))) == facts
    with pytest.raises(ConfigError, match="backend must be one of"):
        DeviceFacts(backend="tpu", device_name="x")
    with pytest.raises(ConfigError, match="needs its compute_capability"):
        DeviceFacts(backend="cuda", device_name="x", total_memory=GiB)
    with pytest.raises(ConfigError, match="needs its gfx_arch"):
        DeviceFacts(backend="rocm", device_name="x", total_memory=GiB)
    with pytest.raises(ConfigError, match="NVIDIA fact"):
        DeviceFacts(backend="rocm", device_name="x", total_memory=GiB, gfx_arch="gfx1100", compute_capability=(8, 0))
    with pytest.raises(ConfigError, match="total_memory"):
        DeviceFacts(backend="mps", device_name="x")
    with pytest.raises(ConfigError, match="cores"):
        DeviceFacts(backend="cpu", device_name="x", physical_cores=4, logical_cores=2)
    with pytest.raises(ConfigError, match="unknown device fact"):
        DeviceFacts.from_dict({"backend": "cpu", "device_name": "x", "vram": 3})
    with pytest.raises(ConfigError, match="device facts needs device-name"):
        DeviceFacts.from_dict({"backend": "cpu"})


def test_reference_devices():
    assert reference_device("rtx3060").compute_capability == (8, 6)
    assert not reference_device("gtx1080ti").kernels and reference_device("rx6800").gfx_arch == "gfx1030"
    with pytest.raises(ConfigError, match=r"choose one of .*rtx4090"):
        reference_device("rtx9999")
