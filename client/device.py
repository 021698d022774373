"""What this machine offers for training: the accelerator, its memory and number formats, the CPU.

:func:`probe` reads the facts through torch, psutil and platform. Each of those is a parameter,
so tests fake every backend without the hardware; simulated fleets build :class:`DeviceFacts`
by hand or take one from :data:`REFERENCE_DEVICES`. The facts are raw observations plus the few
judgements that need hardware knowledge torch gets wrong:

* **bf16.** ``torch.cuda.is_bf16_supported()`` answers True on every ROCm build, including
  RDNA1/RDNA2 GPUs that have no bf16 arithmetic, and on NVIDIA it counts slow emulation below
  compute capability 8.0. NVIDIA is asked with ``including_emulation=False``; AMD is judged from
  the gfx architecture (``gcnArchName``).
* **Kernels.** A CUDA wheel only runs on the architectures it was compiled for: cu128/cu130
  wheels start at sm_75, so a GTX 1080 (sm_61) is "available" and then fails with "no kernel
  image is available". The probe checks the capability against ``torch.cuda.get_arch_list()``.
* **CPU bf16.** ``torch.backends.cpu.get_cpu_capability()`` names only the vector width
  ("AVX2", "AVX512", "SVE256"), not bf16 instructions. torch exposes those through
  underscore-prefixed helpers only: ``torch.cpu._is_avx512_bf16_supported()`` /
  ``_is_amx_tile_supported()`` on x86 and ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``
  (cpuinfo's ARM FEAT_BF16 check) on ARM64. A torch without them reports no bf16.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Self

import psutil
import torch
from pydantic import Field, model_validator

from fedvox.shared.errors import ConfigError
from fedvox.shared.settings import choice, parse, settings

log = logging.getLogger(__name__)

BACKENDS = ("cuda", "rocm", "mps", "cpu")
"""``cuda``: NVIDIA; ``rocm``: AMD through HIP (torch still calls the device ``cuda``); ``mps``:
Apple GPU; ``cpu``: no usable accelerator was found."""

GiB = 2**30


@settings("device facts")
class DeviceFacts:
    """One machine as fedvox sees it. Build by hand for simulations and tests; :func:`probe` reads it.

    Memory is in bytes. For ``cpu`` the accelerator fields stay empty (``total_memory`` 0). For
    ``mps`` ``total_memory`` is Metal's recommended working set (unified memory).
    """

    backend: Annotated[str, choice(BACKENDS)]
    device_name: str
    total_memory: Annotated[int, Field(ge=0)] = 0
    device_index: int = 0
    compute_capability: tuple[int, int] | None = None  # NVIDIA only
    gfx_arch: str | None = None  # AMD only, e.g. "gfx1100" (gcnArchName without feature flags)
    bf16: bool = False  # the accelerator does bf16 arithmetic natively
    kernels: bool = True  # the installed torch build has kernels for this accelerator
    torch_archs: tuple[str, ...] = ()  # torch.cuda.get_arch_list()
    cpu_arch: str = "x86_64"  # "x86_64" or "arm64"
    cpu_name: str = ""
    cpu_isa: str = "DEFAULT"  # torch.backends.cpu.get_cpu_capability()
    cpu_bf16: bool = False  # AVX512-BF16 / AMX on x86, FEAT_BF16 on ARM64
    physical_cores: int = 1
    logical_cores: int = 1
    ram: Annotated[int, Field(ge=0)] = 0
    os: str = ""
    torch_version: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        """The facts each backend needs, and only those."""
        if self.compute_capability is not None and self.backend != "cuda":
            raise ValueError(f"compute_capability is an NVIDIA fact; this device's backend is {self.backend}")
        if self.gfx_arch is not None and self.backend != "rocm":
            raise ValueError(f"gfx_arch is an AMD fact; this device's backend is {self.backend}")
        if self.backend == "rocm" and not self.gfx_arch:
            raise ValueError("a rocm device needs its gfx_arch (gcnArchName, e.g. 'gfx1100')")
        if self.backend == "cuda" and self.compute_capability is None:
            raise ValueError("a cuda device needs its compute_capability, e.g. (8, 6)")
        if self.backend in ("cuda", "rocm", "mps") and self.total_memory <= 0:
            raise ValueError(f"a {self.backend} device needs its total_memory in bytes")
        if self.physical_cores < 1 or self.logical_cores < self.physical_cores:
            raise ValueError(
                f"cores must satisfy 1 <= physical ({self.physical_cores}) <= logical ({self.logical_cores})"
            )
        return self

    @property
    def accelerator(self) -> bool:
        return self.backend != "cpu"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples become lists)."""
        values = asdict(self)
        values["torch_archs"] = list(self.torch_archs)
        if self.compute_capability is not None:
            values["compute_capability"] = list(self.compute_capability)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str | Path = "") -> DeviceFacts:
        """Inverse of :meth:`to_dict` (e.g. a fleet file); unknown keys are a :class:`ConfigError`."""
        return parse(cls, values, where)


# ---------------------------------------------------------------------- AMD architectures
ROCM_FAMILIES: tuple[tuple[str, str], ...] = (
    # (gcnArchName prefix, family); the first matching prefix wins.
    ("gfx908", "cdna1"),
    ("gfx90a", "cdna2"),
    ("gfx94", "cdna3"),
    ("gfx95", "cdna4"),
    ("gfx101", "rdna1"),
    ("gfx103", "rdna2"),
    ("gfx115", "rdna3.5"),
    ("gfx11", "rdna3"),
    ("gfx12", "rdna4"),
    ("gfx9", "gcn5"),
    ("gfx8", "gcn4"),
)
"""gfx targets by family (LLVM AMDGPUUsage). gfx9xx outside CDNA is Vega (GCN5)."""

ROCM_BF16_FAMILIES = frozenset({"cdna1", "cdna2", "cdna3", "cdna4", "rdna3", "rdna3.5", "rdna4"})
"""Families with bf16 arithmetic (HIP's hardware feature table: RDNA1 and RDNA2 have none)."""


def rocm_family(gfx_arch: str) -> str:
    """The family of a gfx target (``"gfx1100"`` -> ``"rdna3"``); ``"unknown"`` if none matches."""
    for prefix, family in ROCM_FAMILIES:
        if gfx_arch.startswith(prefix):
            return family
    return "unknown"


# ---------------------------------------------------------------------- NVIDIA kernels
def cuda_kernels_available(capability: tuple[int, int], arch_list: tuple[str, ...]) -> bool:
    """Whether a build compiled for ``arch_list`` runs on a GPU of ``capability``.

    A cubin ``sm_XY`` runs on the same major version with minor >= Y; PTX ``compute_XY`` is
    JIT-compiled for any capability >= XY. An empty list (a CPU-only build) runs nothing.
    """
    device = capability[0] * 10 + capability[1]
    for arch in arch_list:
        kind, _, version = arch.partition("_")
        digits = version.rstrip("af")
        if not digits.isdigit():
            continue
        code = int(digits)
        if kind == "sm" and code // 10 == device // 10 and code % 10 <= device % 10:
            return True
        if kind == "compute" and code <= device:
            return True
    return False


# ---------------------------------------------------------------------- probing
def probe(
    index: int = 0,
    *,
    torch_module: Any = torch,
    psutil_module: Any = psutil,
    platform_module: Any = platform,
    cpuinfo_path: str | os.PathLike[str] = "/proc/cpuinfo",
) -> DeviceFacts:
    """Read this machine's facts; ``index`` picks the GPU when there are several.

    Never raises for missing hardware: a machine without a usable accelerator is ``cpu``.
    """
    host = _host_facts(torch_module, psutil_module, platform_module, cpuinfo_path)
    accelerator = _accelerator_facts(torch_module, index, host)
    facts = DeviceFacts(**host, **accelerator, torch_version=str(torch_module.__version__))
    log.debug("probed %s", facts)
    return facts


def _accelerator_facts(tm: Any, index: int, host: Mapping[str, Any]) -> dict[str, Any]:
    if tm.cuda.is_available():
        props = tm.cuda.get_device_properties(index)
        archs = tuple(tm.cuda.get_arch_list())
        common = {
            "device_name": props.name,
            "total_memory": int(props.total_memory),
            "device_index": index,
            "torch_archs": archs,
        }
        if getattr(tm.version, "hip", None):
            gfx = props.gcnArchName.split(":")[0]  # drop feature flags (":sramecc+:xnack-")
            return {
                **common,
                "backend": "rocm",
                "gfx_arch": gfx,
                "bf16": rocm_family(gfx) in ROCM_BF16_FAMILIES,
                "kernels": gfx in archs,
            }
        capability = (int(props.major), int(props.minor))
        with tm.cuda.device(index):
            bf16 = bool(tm.cuda.is_bf16_supported(including_emulation=False))
        return {
            **common,
            "backend": "cuda",
            "compute_capability": capability,
            "bf16": bf16,
            "kernels": cuda_kernels_available(capability, archs),
        }
    mps = getattr(tm.backends, "mps", None)
    if mps is not None and mps.is_available():
        get_name = getattr(mps, "get_name", None)
        macos14 = getattr(mps, "is_macos_or_newer", lambda major, minor: False)(14, 0)
        return {
            "backend": "mps",
            "device_name": get_name() if get_name else host["cpu_name"],
            "total_memory": int(tm.mps.recommended_max_memory()),
            # Metal has bf16 from macOS 14; the GPUs of chips with ARM FEAT_BF16 (M2 on) run it.
            "bf16": bool(macos14 and host["cpu_bf16"]),
        }
    return {"backend": "cpu", "device_name": host["cpu_name"]}


def _host_facts(tm: Any, pm: Any, plat: Any, cpuinfo_path: str | os.PathLike[str]) -> dict[str, Any]:
    cpu_arch = _normalise_arch(plat.machine())
    logical = pm.cpu_count(logical=True) or 1
    affinity = getattr(pm.Process(), "cpu_affinity", None)
    if affinity is not None:  # a container or taskset may leave us fewer CPUs than the host has
        logical = min(logical, len(affinity()) or logical)
    physical = min(pm.cpu_count(logical=False) or logical, logical)
    return {
        "cpu_arch": cpu_arch,
        "cpu_name": _cpu_name(plat, cpuinfo_path),
        "cpu_isa": str(tm.backends.cpu.get_cpu_capability()),
        "cpu_bf16": _cpu_bf16(tm, cpu_arch),
        "physical_cores": physical,
        "logical_cores": logical,
        "ram": int(pm.virtual_memory().total),
        "os": f"{plat.system()} {plat.release()}".strip(),
    }


def _normalise_arch(machine: str) -> str:
    lowered = machine.lower()
    if lowered in ("x86_64", "amd64", "x64"):
        return "x86_64"
    if lowered in ("arm64", "aarch64", "armv8", "armv9"):
        return "arm64"
    return lowered or "unknown"


def _cpu_bf16(tm: Any, cpu_arch: str) -> bool:
    """Native bf16 instructions, through the only helpers torch has (see the module docstring)."""
    try:
        if cpu_arch == "x86_64":
            return bool(tm.cpu._is_avx512_bf16_supported() or tm.cpu._is_amx_tile_supported())
        if cpu_arch == "arm64":
            return bool(tm.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        log.debug("this torch build cannot tell whether the CPU has bf16 instructions")
    return False


def _cpu_name(plat: Any, cpuinfo_path: str | os.PathLike[str]) -> str:
    try:
        for line in Path(cpuinfo_path).read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    except OSError:
        pass
    return plat.processor() or plat.machine() or "unknown CPU"


# ---------------------------------------------------------------------- reference devices
def _host(
    cpu: str,
    cores: int,
    ram_gib: int,
    *,
    arch: str = "x86_64",
    isa: str = "AVX2",
    bf16: bool = False,
    smt: bool = True,
    os_name: str = "Linux",
) -> dict[str, Any]:
    return {
        "cpu_arch": arch,
        "cpu_name": cpu,
        "cpu_isa": isa,
        "cpu_bf16": bf16,
        "physical_cores": cores,
        "logical_cores": cores * (2 if smt else 1),
        "ram": ram_gib * GiB,
        "os": os_name,
    }


_CU130 = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")  # torch 2.14.1+cu130 (measured)
_ROCM = (
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
)  # PyTorch ROCm 6.x wheel targets
_DESKTOP = _host("AMD Ryzen 7 7700X", 8, 32, isa="AVX512", bf16=True)
_OLD_DESKTOP = _host("Intel Core i7-9700K", 8, 16, smt=False)


def _nvidia(name: str, gib: float, cc: tuple[int, int], host: dict[str, Any]) -> DeviceFacts:
    return DeviceFacts(
        backend="cuda",
        device_name=name,
        total_memory=int(gib * GiB),
        compute_capability=cc,
        bf16=cc >= (8, 0),
        kernels=cuda_kernels_available(cc, _CU130),
        torch_archs=_CU130,
        **host,
    )


def _amd(name: str, gib: float, gfx: str, host: dict[str, Any]) -> DeviceFacts:
    return DeviceFacts(
        backend="rocm",
        device_name=name,
        total_memory=int(gib * GiB),
        gfx_arch=gfx,
        bf16=rocm_family(gfx) in ROCM_BF16_FAMILIES,
        kernels=gfx in _ROCM,
        torch_archs=_ROCM,
        **host,
    )


REFERENCE_DEVICES: dict[str, DeviceFacts] = {
    # Memory sizes approximate what torch reports (a little under the marketed size).
    "h100": _nvidia(
        "NVIDIA H100 80GB HBM3", 79.18, (9, 0), _host("Intel Xeon Platinum 8480+", 16, 128, isa="AVX512", bf16=True)
    ),
    "rtx4090": _nvidia("NVIDIA GeForce RTX 4090", 23.99, (8, 9), _DESKTOP),
    "rtx3060": _nvidia("NVIDIA GeForce RTX 3060", 11.76, (8, 6), _DESKTOP),
    "rtx3070": _nvidia("NVIDIA GeForce RTX 3070", 7.79, (8, 6), _DESKTOP),
    "t4": _nvidia("Tesla T4", 14.58, (7, 5), _host("Intel Xeon @ 2.20GHz", 4, 16, isa="AVX512")),
    "rtx2060": _nvidia("NVIDIA GeForce RTX 2060", 5.79, (7, 5), _OLD_DESKTOP),
    "gtx1660": _nvidia("NVIDIA GeForce GTX 1660 SUPER", 5.79, (7, 5), _OLD_DESKTOP),
    "gtx1080ti": _nvidia("NVIDIA GeForce GTX 1080 Ti", 10.91, (6, 1), _OLD_DESKTOP),
    "mx450": _nvidia("NVIDIA GeForce MX450", 1.95, (7, 5), _host("Intel Core i5-1135G7", 4, 8, isa="AVX512")),
    "rx7900xtx": _amd("AMD Radeon RX 7900 XTX", 23.98, "gfx1100", _DESKTOP),
    "rx9070xt": _amd("AMD Radeon RX 9070 XT", 15.92, "gfx1201", _DESKTOP),
    "rx6800": _amd("AMD Radeon RX 6800", 15.98, "gfx1030", _DESKTOP),
    "mi300x": _amd("AMD Instinct MI300X", 191.98, "gfx942", _host("AMD EPYC 9654", 16, 256, isa="AVX512", bf16=True)),
    "rx5700xt": _amd("AMD Radeon RX 5700 XT", 7.98, "gfx1010", _DESKTOP),
    "m2": DeviceFacts(
        backend="mps",
        device_name="Apple M2",
        total_memory=int(10.67 * GiB),
        bf16=True,
        **_host("Apple M2", 8, 16, arch="arm64", isa="DEFAULT", bf16=True, smt=False, os_name="Darwin 24.1.0"),
    ),
    "x86-avx2": DeviceFacts(backend="cpu", device_name="Intel Core i5-10400", **_host("Intel Core i5-10400", 6, 16)),
    "xeon-amx": DeviceFacts(
        backend="cpu",
        device_name="Intel Xeon Gold 6430",
        **_host("Intel Xeon Gold 6430", 32, 256, isa="AVX512", bf16=True),
    ),
    "graviton3": DeviceFacts(
        backend="cpu",
        device_name="AWS Graviton3",
        **_host("AWS Graviton3", 8, 32, arch="arm64", isa="SVE256", bf16=True, smt=False),
    ),
    "raspberry-pi5": DeviceFacts(
        backend="cpu",
        device_name="Cortex-A76",
        **_host("Cortex-A76", 4, 8, arch="arm64", isa="DEFAULT", smt=False),
    ),
}
"""Representative machines (facts, not measurements), for fleets, docs and ``probe --as``."""


def reference_device(name: str) -> DeviceFacts:
    """The reference machine called ``name``; :class:`ConfigError` lists the names otherwise."""
    try:
        return REFERENCE_DEVICES[name]
    except KeyError:
        raise ConfigError(f"unknown reference device {name!r}; choose one of {', '.join(REFERENCE_DEVICES)}") from None


__all__ = [
    "BACKENDS",
    "REFERENCE_DEVICES",
    "ROCM_BF16_FAMILIES",
    "ROCM_FAMILIES",
    "DeviceFacts",
    "GiB",
    "cuda_kernels_available",
    "probe",
    "reference_device",
    "rocm_family",
]
