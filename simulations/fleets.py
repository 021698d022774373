"""Device fleets: which device each virtual client has, how fast it is, and when it is away.

A fleet is a mix of device classes in stated proportions. A class names a machine
(:class:`~client.device.DeviceFacts`, usually one of ``client.device``'s reference devices) and
models how it behaves in a federation:

- ``speed``: training throughput relative to the machine running the simulation (1.0 = as fast
  as it). A client's simulated compute time is its measured compute time on this host divided by
  its speed. Speeds are *assumptions* of the model, not measurements; edit them for your fleet.
- ``uplink-mbps`` / ``downlink-mbps`` / ``latency-s``: its network link (transfer time of the
  update and of the global model).
- ``dropout``: probability that a selected client goes offline during a round: no update, and
  nothing trained or charged.
- ``jitter``: sigma of a log-normal slowdown drawn per client and round (background load,
  throttling), so the same device is sometimes late.

The fleet's ``deadline-factor`` closes each round at that multiple of the time the fleet's
median client needs for the same work (the FedScale/Oort way of pacing rounds); an update that
would arrive later is a *straggler* and is discarded. 0 means no deadline.

Every virtual client gets a resource profile for its simulated device
(:func:`client.profiles.select_profile`) and runs on this host with that profile's physical
batch and checkpointing, and its precision where the host supports it natively
(:func:`host_settings`). Assignment and every random draw are keyed by the seed, so a seed
always gives the same fleet and the same dropouts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import Field, StrictFloat, model_validator

from fedvox.client.device import DeviceFacts, reference_device
from fedvox.client.profiles import ProfileOverrides, ResourceProfile, select_profile
from fedvox.shared.errors import ConfigError, DeviceError
from fedvox.shared.models.subsets import SubsetSpec
from fedvox.shared.runconfig import RunConfig
from fedvox.shared.settings import accepts, parse, read_toml, settings

ASSIGN_STREAM = 11
ROUND_STREAM = 12
"""Sub-streams of the seed (``np.random.default_rng([seed, stream, ...])``)."""

Positive = Annotated[StrictFloat, Field(gt=0)]
NonNegative = Annotated[StrictFloat, Field(ge=0)]


def _no_deadline_or_a_multiple(factor: float) -> bool:
    return factor == 0 or factor >= 1


@settings("fleet")
class DeviceClass:
    """One kind of device in a fleet and how it behaves (module docstring).

    In a fleet file it is a ``[devices.<name>]`` table with a ``reference`` device or a
    ``[devices.<name>.facts]`` table, never both.
    """

    name: str
    facts: DeviceFacts
    share: Annotated[Positive, Field(description="its relative number of clients")]
    speed: Positive = 1.0
    uplink_mbps: Positive = 20.0
    downlink_mbps: Positive = 100.0
    latency_s: NonNegative = 0.05
    dropout: Annotated[
        StrictFloat, Field(ge=0, le=1, description="the probability that a selected client goes offline in a round")
    ] = 0.0
    jitter: NonNegative = 0.0
    reference: str = ""  # the client.device reference device it was built from, if any

    @model_validator(mode="before")
    @classmethod
    def _reference_or_facts(cls, data: Any) -> Any:
        """A table names a reference device or writes out its facts."""
        if not isinstance(data, Mapping):  # built in code, with its facts
            return data
        if ("reference" in data) == ("facts" in data):
            raise ValueError('needs exactly one of reference = "<device>" or a [facts] table')
        if "reference" in data:
            try:
                return {**data, "facts": reference_device(str(data["reference"]))}
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return data

    def transfer_s(self, bytes_down: float, bytes_up: float) -> float:
        """Seconds to receive the global model and send the update back."""
        return (
            bytes_down * 8 / (self.downlink_mbps * 1e6) + bytes_up * 8 / (self.uplink_mbps * 1e6) + 2 * self.latency_s
        )

    def duration_s(self, compute_host_s: float, bytes_down: float, bytes_up: float, slowdown: float = 1.0) -> float:
        """Simulated round time of this device for work that took ``compute_host_s`` on the host."""
        return compute_host_s / self.speed * slowdown + self.transfer_s(bytes_down, bytes_up)


@settings("fleet")
class Fleet:
    """A named mix of device classes (keyed by name, as the ``[devices.<name>]`` tables) and the round deadline."""

    name: str
    devices: Annotated[
        dict[str, DeviceClass], Field(min_length=1, description="a [devices.<name>] table per class of device")
    ]
    deadline_factor: Annotated[
        StrictFloat,
        accepts(_no_deadline_or_a_multiple, "0 (no deadline) or >= 1 (a multiple of the median client's round time)"),
    ] = 0.0
    description: str = ""

    @model_validator(mode="before")
    @classmethod
    def _named_devices(cls, data: Any) -> Any:
        """A device table's name is its key."""
        if isinstance(data, Mapping) and isinstance(data.get("devices"), Mapping):
            named = {k: {"name": k, **v} if isinstance(v, Mapping) else v for k, v in data["devices"].items()}
            return {**data, "devices": named}
        return data

    @property
    def classes(self) -> tuple[DeviceClass, ...]:
        return tuple(self.devices.values())

    def counts(self, n: int) -> list[int]:
        """Clients per class for ``n`` clients: the shares, rounded by largest remainder."""
        total = sum(c.share for c in self.classes)
        quotas = [n * c.share / total for c in self.classes]
        counts = [math.floor(q) for q in quotas]
        by_remainder = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
        for i in by_remainder[: n - sum(counts)]:
            counts[i] += 1
        return counts

    def assign(self, n: int, seed: int) -> list[DeviceClass]:
        """The device class of each of ``n`` clients (index = Flower partition id)."""
        classes = [c for c, count in zip(self.classes, self.counts(n), strict=True) for _ in range(count)]
        order = np.random.default_rng([seed, ASSIGN_STREAM]).permutation(n)
        return [classes[i] for i in order]

    def deadline_s(
        self, devices: Sequence[DeviceClass], compute_host_s: float, bytes_down: float, bytes_up: float
    ) -> float:
        """The round deadline for work that took ``compute_host_s`` on the host (inf: none).

        ``deadline-factor`` times the median over ``devices`` (the fleet's clients) of the time
        each would need for that work, without jitter.
        """
        if self.deadline_factor <= 0:
            return math.inf
        times = [d.duration_s(compute_host_s, bytes_down, bytes_up) for d in devices]
        return self.deadline_factor * float(np.median(times))


@dataclass(frozen=True)
class RoundDraw:
    """What happens to one client in one round."""

    dropped: bool
    slowdown: float


def round_draw(device: DeviceClass, seed: int, partition: int, server_round: int) -> RoundDraw:
    """Dropout and slowdown of ``partition`` in ``server_round`` (same seed, same draw)."""
    rng = np.random.default_rng([seed, ROUND_STREAM, partition, server_round])
    dropped, z = rng.random() < device.dropout, rng.standard_normal()
    return RoundDraw(dropped=bool(dropped), slowdown=float(math.exp(device.jitter * z)))


# ---------------------------------------------------------------------- virtual clients
@dataclass(frozen=True)
class VirtualClient:
    """One simulated client: its device, the profile that device would use, how the host runs it.

    ``node_config`` holds the ``profile.*`` overrides the ClientApp reads (the same keys a real
    SuperNode takes with ``--node-config``). ``refusal`` is set when the simulated device cannot
    train the plan at all; the client then refuses every round with reason ``device``.
    """

    partition: int
    device: DeviceClass
    profile: str  # the simulated device's profile name, e.g. "nvidia-12gb-bf16"
    physical_batch: int
    precision: str
    checkpointing: bool
    planned_memory_bytes: int  # the memory model's peak on the simulated device
    node_config: dict[str, Any] = field(default_factory=dict)
    host_note: str = ""  # where the host cannot follow the simulated profile
    refusal: str = ""

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (``fleet.json``)."""
        return {
            "partition": self.partition,
            "class": self.device.name,
            "device": self.device.facts.device_name,
            "reference": self.device.reference,
            "profile": self.profile,
            "physical-batch": self.physical_batch,
            "precision": self.precision,
            "checkpointing": self.checkpointing,
            "planned-memory-bytes": self.planned_memory_bytes,
            "speed": self.device.speed,
            "uplink-mbps": self.device.uplink_mbps,
            "downlink-mbps": self.device.downlink_mbps,
            "latency-s": self.device.latency_s,
            "dropout": self.device.dropout,
            "jitter": self.device.jitter,
            "host": {k.removeprefix("profile."): v for k, v in self.node_config.items()},
            "host-note": self.host_note,
            "refusal": self.refusal,
        }


def plan_clients(
    fleet: Fleet, n: int, seed: int, config: RunConfig, host: DeviceFacts, workers: int
) -> list[VirtualClient]:
    """Assign devices to ``n`` clients and decide how each trains on ``host``.

    ``workers`` ClientApps run at once on the host; each gets an equal share of its cores as
    torch threads (oversubscribed threads made a tiny-s1 DP step ten times slower here).
    """
    subset = config.subset_spec
    host_profile = select_profile(host, config.stage, config.model_config, subset, logical_batch=config.logical_batch)
    threads = max(1, host.physical_cores // max(workers, 1))
    planned: dict[str, VirtualClient] = {}
    for device in fleet.classes:
        planned[device.name] = _plan_class(device, config, subset, host, host_profile, threads)
    return [replace(planned[device.name], partition=p) for p, device in enumerate(fleet.assign(n, seed))]


def _plan_class(
    device: DeviceClass,
    config: RunConfig,
    subset: SubsetSpec,
    host: DeviceFacts,
    host_profile: ResourceProfile,
    threads: int,
) -> VirtualClient:
    try:
        simulated = select_profile(
            device.facts, config.stage, config.model_config, subset, logical_batch=config.logical_batch
        )
    except DeviceError as exc:  # the device cannot train this plan: it will refuse
        return VirtualClient(-1, device, "none", 0, "", False, 0, refusal=str(exc))
    except ConfigError as exc:
        raise ConfigError(f"fleet device {device.name!r}: {exc}") from None
    overrides, note = host_settings(simulated, host, host_profile, threads)
    planned = simulated.memory.fixed + simulated.physical_batch * simulated.memory.per_sample
    return VirtualClient(
        -1,
        device,
        simulated.name,
        simulated.physical_batch,
        simulated.precision,
        simulated.checkpointing,
        planned,
        node_config=overrides,
        host_note=note,
    )


def host_settings(
    simulated: ResourceProfile, host: DeviceFacts, host_profile: ResourceProfile, threads: int
) -> tuple[dict[str, Any], str]:
    """Node-config ``profile.*`` overrides that run ``simulated`` on ``host``, and what differs.

    The physical batch and checkpointing follow the simulated device (capped by what fits on the
    host); the precision follows it where the host's device does that format natively, else
    fp32 (emulated bf16 or fp16 on a CPU would only measure the emulation).
    """
    notes = []
    device = host_profile.device
    native = {"fp32"}
    if device == "cpu":
        native |= {"bf16"} if host.cpu_bf16 else set()
    else:
        native |= {"fp16"} | ({"bf16"} if host.bf16 else set())
    precision = simulated.precision if simulated.precision in native else "fp32"
    if precision != simulated.precision:
        notes.append(f"{simulated.precision} runs as fp32 (not native on this host's {device})")
    batch = simulated.physical_batch
    if host_profile.memory.max_batch and batch > host_profile.memory.max_batch:
        batch = host_profile.memory.max_batch
        notes.append(f"physical batch {simulated.physical_batch} capped at {batch} (host memory)")
    overrides = {
        "profile.device": device,
        "profile.precision": precision,
        "profile.physical-batch": batch,
        "profile.checkpointing": simulated.checkpointing,
        "profile.threads": threads,
    }
    ProfileOverrides.from_mapping(overrides)  # validate here, not in every worker
    return overrides, "; ".join(notes)


# ---------------------------------------------------------------------- named and custom fleets
NAMED_FLEETS: dict[str, dict[str, Any]] = {
    "mixed": {
        "description": (
            "a volunteer fleet: gaming PCs with NVIDIA 24/12/6 GB and AMD RDNA3 cards, Apple "
            "Silicon laptops (training on the CPU), x86 desktops and ARM single-board computers"
        ),
        "deadline-factor": 4.0,
        "devices": {
            "nvidia-24gb": {
                "reference": "rtx4090",
                "share": 10,
                "speed": 25.0,
                "uplink-mbps": 40.0,
                "downlink-mbps": 200.0,
                "dropout": 0.02,
                "jitter": 0.2,
            },
            "nvidia-12gb": {
                "reference": "rtx3060",
                "share": 15,
                "speed": 12.0,
                "uplink-mbps": 20.0,
                "downlink-mbps": 100.0,
                "dropout": 0.05,
                "jitter": 0.2,
            },
            "nvidia-6gb": {
                "reference": "rtx2060",
                "share": 10,
                "speed": 6.0,
                "uplink-mbps": 20.0,
                "downlink-mbps": 100.0,
                "dropout": 0.05,
                "jitter": 0.3,
            },
            "amd-rdna3": {
                "reference": "rx7900xtx",
                "share": 10,
                "speed": 18.0,
                "uplink-mbps": 40.0,
                "downlink-mbps": 200.0,
                "dropout": 0.02,
                "jitter": 0.2,
            },
            "apple-cpu": {
                "reference": "m2",
                "share": 15,
                "speed": 3.0,
                "uplink-mbps": 10.0,
                "downlink-mbps": 50.0,
                "dropout": 0.10,
                "jitter": 0.3,
            },
            "x86-cpu": {
                "reference": "x86-avx2",
                "share": 25,
                "speed": 2.0,
                "uplink-mbps": 10.0,
                "downlink-mbps": 50.0,
                "dropout": 0.05,
                "jitter": 0.3,
            },
            "arm-cpu": {
                "reference": "raspberry-pi5",
                "share": 15,
                "speed": 0.5,
                "uplink-mbps": 5.0,
                "downlink-mbps": 20.0,
                "dropout": 0.15,
                "jitter": 0.4,
            },
        },
    },
    "uniform-cpu": {
        "description": "identical x86 CPUs as fast as this host, always online, no deadline",
        "deadline-factor": 0.0,
        "devices": {
            "x86-cpu": {
                "reference": "x86-avx2",
                "share": 1,
                "speed": 1.0,
                "uplink-mbps": 1000.0,
                "downlink-mbps": 1000.0,
                "latency-s": 0.0,
            },
        },
    },
}
"""Built-in fleets, in the schema of a fleet TOML file. Shares are relative; speeds, links and
availability are modelling assumptions (docs/simulation.md), not measurements."""


def load_fleet(name_or_path: str | Path) -> Fleet:
    """A built-in fleet by name, or a fleet TOML file (schema: :data:`NAMED_FLEETS`)."""
    key = str(name_or_path)
    if key in NAMED_FLEETS:
        return fleet_from_mapping(key, NAMED_FLEETS[key])
    path = Path(name_or_path)
    if not path.suffix == ".toml":
        raise ConfigError(f"unknown fleet {key!r}; use one of {', '.join(NAMED_FLEETS)} or a fleet .toml file")
    data = read_toml(path, "fleet file")
    return fleet_from_mapping(str(data.get("name", path.stem)), data, where=path)


def fleet_from_mapping(name: str, data: Mapping[str, Any], where: str | Path = "") -> Fleet:
    """Validate and build a fleet; every problem names the key and the file."""
    return parse(Fleet, {**data, "name": name}, where)


__all__ = [
    "NAMED_FLEETS",
    "DeviceClass",
    "Fleet",
    "RoundDraw",
    "VirtualClient",
    "fleet_from_mapping",
    "host_settings",
    "load_fleet",
    "plan_clients",
    "round_draw",
]
