"""The devices an operator has authorised, and what each did in the run.

A device is its SuperNode public key (an OpenSSH EC key that ``fedvox-client enroll`` creates on
the device and prints): ``fedvox-server register`` records it in ``DIR/devices.json`` under a
name and authorises it with the SuperLink (at once while the server runs, otherwise at the next
``start``). The SuperLink gives every key a node id, kept with the device. What a device did
comes from the run's ``metrics.jsonl``: every round lists each train reply's node id with the
client id, profile and utterance-level epsilon its status reported.

A key the SuperLink refused at activation is a device waiting for registration: the gateway
notes its fingerprint in ``DIR/state/waiting.json`` (:class:`WaitingRoom`), so the operator sees
it in ``fedvox-server devices`` and the dashboard and can register it by that fingerprint once
the device's owner has confirmed it.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.supercore.primitives.asymmetric import bytes_to_public_key, public_key_to_bytes

from fedvox.server.deploy.control import Control, SuperNode
from fedvox.server.deploy.home import ServerHome
from fedvox.shared.atomic import atomic_write_text
from fedvox.shared.device_keys import fingerprint, parse_public_key, ssh_text
from fedvox.shared.errors import ConfigError, DeploymentError

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
UNKNOWN_DEVICE = "NOT-REGISTERED-HERE"
"""What ``fedvox-server devices`` calls a SuperLink node whose key is not in ``devices.json``."""


@dataclass
class Device:
    name: str
    public_key: str  # OpenSSH one-line form
    fingerprint: str  # SHA256:... as ssh-keygen -l prints it
    registered: str  # when the operator registered it (UTC, ISO 8601)
    node_ids: list[int] = field(default_factory=list)  # every node id the SuperLink gave it, newest last

    def flower_key(self) -> bytes:
        """The key as Flower stores and compares it (PEM SubjectPublicKeyInfo)."""
        return public_key_to_bytes(parse_public_key(self.public_key))


class Registry:
    """``DIR/devices.json``, read and written under a file lock (``register`` may run beside ``start``)."""

    def __init__(self, home: ServerHome) -> None:
        self.path = home.devices_file
        self.lock_path = home.state / "devices.lock"

    def devices(self) -> list[Device]:
        if not self.path.is_file():
            return []
        try:
            return [Device(**entry) for entry in json.loads(self.path.read_text())["devices"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise DeploymentError(f"{self.path} is damaged ({exc}); restore it or register the devices again") from exc

    def add(self, public_key: str, name: str | None = None) -> tuple[Device, bool]:
        """Record a device; returns it and whether it is new (the same key and name again is a no-op)."""
        key = parse_public_key(public_key)
        key_print = fingerprint(key)
        name = name or "device-" + re.sub(r"[^A-Za-z0-9]", "", key_print[7:])[:8]
        if not NAME.fullmatch(name):
            raise ConfigError(f"device name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        with self._locked() as devices:
            for device in devices:
                if device.fingerprint == key_print:
                    if device.name != name:
                        raise DeploymentError(f"this key is already registered as {device.name!r}")
                    return device, False
                if device.name == name:
                    raise DeploymentError(
                        f"the name {name!r} is taken by another key ({device.fingerprint}); choose another --name"
                    )
            device = Device(name, ssh_text(key), key_print, dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
            devices.append(device)
        return device, True

    def record_node(self, name: str, node_id: int) -> None:
        with self._locked() as devices:
            for device in devices:
                if device.name == name and (not device.node_ids or device.node_ids[-1] != node_id):
                    device.node_ids.append(node_id)

    @contextmanager
    def _locked(self) -> Iterator[list[Device]]:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            devices = self.devices()
            yield devices
            text = json.dumps({"devices": [asdict(d) for d in devices]}, indent=1) + "\n"
            atomic_write_text(self.path, text)


class WaitingRoom:
    """``DIR/state/waiting.json``: device keys refused at activation, by fingerprint (first and last
    attempt, attempts). A key leaves it when it is registered."""

    def __init__(self, home: ServerHome) -> None:
        self.path = home.state / "waiting.json"
        self.lock_path = home.state / "waiting.lock"
        self.registry = Registry(home)

    def note(self, flower_key: bytes) -> None:
        """Record an activation refused for ``flower_key`` (PEM, as Flower's request header carries it)."""
        try:
            key = bytes_to_public_key(flower_key)
        except ValueError:
            return  # not a key at all: a stranger's garbage, logged by the gateway
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        key_print = fingerprint(key)
        with self._locked() as waiting:
            entry = waiting.setdefault(
                key_print, {"fingerprint": key_print, "public-key": ssh_text(key), "first-seen": now, "attempts": 0}
            )
            entry["last-seen"] = now
            entry["attempts"] += 1

    def waiting(self) -> list[dict[str, Any]]:
        """Keys still waiting (registered ones left out), oldest first."""
        registered = {d.fingerprint for d in self.registry.devices()}
        entries = self._read()
        return sorted((e for f, e in entries.items() if f not in registered), key=lambda e: e["first-seen"])

    def public_key(self, key_print: str) -> str:
        """The OpenSSH line of a waiting key, by its fingerprint."""
        for entry in self.waiting():
            if entry["fingerprint"] == key_print:
                return entry["public-key"]
        raise DeploymentError(
            f"no device with key {key_print} is waiting for registration; check the fingerprint with the "
            "device's owner (`fedvox-server devices` lists the waiting ones)"
        )

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            return json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, ValueError):
            return {}  # a lost list of waiting keys refills at the devices' next attempt

    @contextmanager
    def _locked(self) -> Iterator[dict[str, dict[str, Any]]]:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            waiting = self._read()
            yield waiting
            atomic_write_text(self.path, json.dumps(waiting, indent=1) + "\n")


def authorise(registry: Registry, control: Control) -> list[tuple[Device, int]]:
    """Make the SuperLink know every registered device (idempotent); returns (device, node id)."""
    known = {node.public_key: node for node in control.nodes() if node.status != "unregistered"}
    out = []
    for device in registry.devices():
        node = known.get(device.flower_key())
        node_id = node.node_id if node else control.register(device.flower_key(), device.name)
        if node is None:
            log.info("authorised device %s (%s) as node %d", device.name, device.fingerprint, node_id)
        registry.record_node(device.name, node_id)
        out.append((device, node_id))
    return out


def register_key(home: ServerHome, public_key: str, name: str | None, control: Control | None) -> list[str]:
    """Register a key (its OpenSSH line or file, or a waiting key's fingerprint) and authorise it
    through ``control`` if the server runs; what happened, in lines for the operator
    (``fedvox-server register`` and the dashboard's register action)."""
    if public_key.startswith("SHA256:"):
        public_key = WaitingRoom(home).public_key(public_key)
    registry = Registry(home)
    device, new = registry.add(public_key, name)
    lines = [f"{'registered' if new else 'already registered:'} {device.name} ({device.fingerprint})"]
    if control is None:
        return [*lines, "it is authorised when the server starts"]
    node_id = dict((d.name, n) for d, n in authorise(registry, control))[device.name]
    return [*lines, f"authorised as node {node_id}: the device can join now"]


def device_report(
    home: ServerHome, nodes: list[SuperNode] | None = None, unknown: str = "server stopped"
) -> list[dict[str, Any]]:
    """Every registered device with its connection status (when the server answers: ``nodes``;
    otherwise ``unknown`` says why), the rounds it trained, and its last reported profile and
    utterance-level epsilon. A key the SuperLink holds that ``devices.json`` does not (registered
    behind fedvox's back) is listed too, under the name ``NOT-REGISTERED-HERE``."""
    registry = Registry(home)
    status = {node.node_id: node.status for node in nodes or []}
    rounds = _rounds(home.run_dir / "metrics.jsonl")
    report = []
    known = {device.flower_key() for device in registry.devices()}
    for node in nodes or []:
        if node.status != "unregistered" and node.public_key not in known:
            key = serialization.load_pem_public_key(node.public_key)
            report.append(
                {
                    "name": UNKNOWN_DEVICE,
                    "fingerprint": fingerprint(key),
                    "node-id": node.node_id,
                    "status": node.status,
                    "rounds-joined": 0,
                    "last-round": None,
                    "client-id": None,
                    "profile": None,
                    "epsilon-spent": None,
                    "epsilon-budget": None,
                    "registered": None,
                }
            )
            log.warning("node %d holds a key that is not in %s (%s)", node.node_id, registry.path, fingerprint(key))
    for device in registry.devices():
        mine = set(device.node_ids)
        entries = [(r, e) for r, clients in rounds for e in clients if e.get("node-id") in mine]
        accepted = sorted({r for r, e in entries if e.get("accepted")})
        last = entries[-1][1] if entries else {}
        report.append(
            {
                "name": device.name,
                "fingerprint": device.fingerprint,
                "node-id": device.node_ids[-1] if device.node_ids else None,
                "status": status.get(device.node_ids[-1], "unknown")
                if nodes is not None and device.node_ids
                else ("not authorised yet" if not device.node_ids else unknown),
                "rounds-joined": len(accepted),
                "last-round": accepted[-1] if accepted else None,
                "client-id": last.get("client-id"),
                "profile": last.get("profile"),
                "epsilon-spent": last.get("epsilon-spent"),
                "epsilon-budget": last.get("epsilon-budget"),
                "registered": device.registered,
            }
        )
    return report


def _rounds(metrics: Path) -> list[tuple[int, list[dict[str, Any]]]]:
    if not metrics.is_file():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [(row["round"], row.get("clients", [])) for row in rows]


__all__ = ["UNKNOWN_DEVICE", "Device", "Registry", "WaitingRoom", "authorise", "device_report", "register_key"]
