"""What the operator's dashboard shows, read from files the server (or a simulation) already wrote.

A dashboard serves one folder: a server home (``fedvox-server init``), a plain run directory (a
run's ``checkpoint-dir``), or a ``fedvox-sim run`` output with its runs under ``runs/``. Nothing
here asks a device for anything: rounds, losses and each device's epsilon come from the run's
``metrics.jsonl`` (what the devices' replies already carried), devices from ``devices.json`` and
the SuperLink's node list, keys waiting for registration from ``state/waiting.json``, speaker-level
epsilons from the server's ledger, and a simulation's held-out losses, speech-quality figures and
audio sample from the files the simulation wrote.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedvox.server.checkpoints import RoundCheckpoints
from fedvox.server.deploy.control import SuperNode
from fedvox.server.deploy.devices import Registry, WaitingRoom, device_report
from fedvox.server.deploy.home import ServerHome
from fedvox.shared.errors import ConfigError
from fedvox.shared.privacy.ledger import LEDGER_FILENAME, read_rows

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
NodeList = Callable[[], tuple[list[SuperNode] | None, str]]
"""The SuperLink's nodes while a server runs, or ``None`` and why they are unknown."""


@dataclass
class Run:
    """One run the dashboard can show: its server-side folder and, for a simulation, its run folder."""

    name: str
    server_dir: Path  # metrics.jsonl, checkpoints/, the speaker-level ledger
    sim_dir: Path | None = None  # fleet.json, evaluation.json, quality figures, sample/


@dataclass
class Source:
    """The folder a dashboard serves (see the module docstring)."""

    root: Path
    runs: list[Run]
    home: ServerHome | None = None
    nodes: NodeList | None = None  # live: the running server's node list
    audio: dict[str, Path] = field(default_factory=dict)  # what /audio may serve, by name

    @property
    def live(self) -> bool:
        return self.nodes is not None

    def run(self, name: str | None) -> Run:
        for run in self.runs:
            if run.name == name:
                return run
        return self.runs[0]


def open_source(folder: Path, nodes: NodeList | None = None) -> Source:
    """The dashboard's view of ``folder``, or a :class:`ConfigError` naming what it expects."""
    root = Path(folder).expanduser().resolve()
    home = ServerHome(root)
    if home.settings_file.is_file():
        return Source(root, [Run("run", home.run_dir)], home=home, nodes=nodes)
    if (root / "metrics.jsonl").is_file() or (root / "checkpoints").is_dir():
        return Source(root, [Run(root.name, root)])
    runs = sorted(p for p in (root / "runs").glob("*") if (p / "server").is_dir())
    if runs:
        return Source(root, [Run(p.name, p / "server", p) for p in runs])
    raise ConfigError(
        f"{root} is not a server home, a run directory (metrics.jsonl, checkpoints/) or a fedvox-sim "
        "output (runs/*/server): give one of those"
    )


def snapshot(source: Source, run_name: str | None = None) -> dict[str, Any]:
    """Everything the page draws, JSON-ready."""
    run = source.run(run_name)
    rows = _metric_rows(run.server_dir / "metrics.jsonl")
    store = RoundCheckpoints(run.server_dir / "checkpoints", keep=1)
    committed = store.rounds()
    out: dict[str, Any] = {
        "folder": str(source.root),
        "mode": "live" if source.live else "finished run",
        "runs": [r.name for r in source.runs],
        "run": run.name,
        "updated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "target-rounds": _target_rounds(source, store, committed),
        "committed": committed[-1] if committed else 0,
        "export": None,
        "rounds": [_round(row) for row in rows],
        "losses": _losses(rows, run),
        "quality": _quality(run),
        "speakers": _speakers(run.server_dir, rows),
        "samples": _samples(source, run),
    }
    if committed:
        chosen, why = store.export_choice()
        out["export"] = {"round": chosen, "why": why}
    devices = _devices(source, rows)
    out["devices"] = devices
    out["epsilon"] = _epsilon_series(rows, devices, source)
    out["waiting"] = WaitingRoom(source.home).waiting() if source.home else []
    out["profiles"] = _profiles(devices, run)
    return _finite(out)


# ---------------------------------------------------------------------- rounds
def _metric_rows(path: Path) -> list[dict[str, Any]]:
    """Complete lines of ``metrics.jsonl`` (a line being appended is left for the next update)."""
    text = path.read_text() if path.is_file() else ""
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]


def _target_rounds(source: Source, store: RoundCheckpoints, committed: list[int]) -> int | None:
    if source.home is not None:
        return source.home.run_config().num_server_rounds
    return store.load(committed[-1]).meta["run-config"]["num-server-rounds"] if committed else None


def _round(row: Mapping[str, Any]) -> dict[str, Any]:
    """One round: who took part and how it went (accepted, refused by devices, late, rejected)."""
    rejects = row.get("rejects", {})
    refused = sum(v for k, v in rejects.items() if k.startswith("refused-"))
    late = rejects.get("no-reply", 0)
    return {
        "round": row["round"],
        "selected": row.get("selected", 0),
        "accepted": row.get("participants", 0),
        "refused": refused,
        "late": late,
        "rejected": sum(rejects.values()) - refused - late,
        "aggregated": row.get("aggregated"),
        "round-time-s": row.get("round-time-s"),
        "bytes-up": row.get("bytes-up", 0),
        "bytes-down": row.get("bytes-down", 0),
        "epsilon-speaker-max": row.get("epsilon-speaker-max"),
    }


def _losses(rows: list[dict[str, Any]], run: Run) -> dict[str, list[list[float]]]:
    """The global model's losses per round: what the devices' replies carried (the privacy
    policy decides which) and, for a simulation, its held-out losses scored on the server."""
    series: dict[str, list[list[float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key.endswith("-loss") and isinstance(value, (int, float)):
                series.setdefault(key, []).append([row["round"], value])
    evaluation = _json(run.sim_dir / "evaluation.json") if run.sim_dir else None
    for round_, scores in sorted(((evaluation or {}).get("global") or {}).items(), key=lambda kv: int(kv[0])):
        for group, value in _numbers(scores).items():
            series.setdefault(f"held-out {group}", []).append([int(round_), value])
    return series


def _quality(run: Run) -> dict[str, Any] | None:
    """Speech-quality figures a simulation wrote (``quality.json`` or ``evaluation.json``'s
    ``quality``), flattened to ``{figure: value}`` per key it holds; ``None`` if there are none."""
    if run.sim_dir is None:
        return None
    figures = _json(run.sim_dir / "quality.json") or (_json(run.sim_dir / "evaluation.json") or {}).get("quality")
    if not isinstance(figures, Mapping) or not figures:
        return None
    return {str(key): _numbers(value) if isinstance(value, Mapping) else value for key, value in figures.items()}


def _speakers(server_dir: Path, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The server's speaker-level epsilon (with speaker-level DP): per round the largest, and now
    every speaker's, from the server's ledger."""
    key = "epsilon-speaker-max"
    series = [[r["round"], r[key]] for r in rows if isinstance(r.get(key), (int, float))]
    latest: dict[str, float] = {}
    if (server_dir / LEDGER_FILENAME).is_file():
        for row in read_rows(server_dir):
            if row.unit == "speaker":
                latest[row.client_id] = row.epsilon
    if not series and not latest:
        return None
    return {"series": series, "count": len(latest), "max": max(latest.values(), default=None)}


def _samples(source: Source, run: Run) -> list[dict[str, Any]]:
    """Audio the run folder holds (a simulation's ``sample/``, a run's ``samples/round-N.wav``)."""
    found = []
    folders = [run.server_dir / "samples"] + ([run.sim_dir / "sample"] if run.sim_dir else [])
    for folder in folders:
        info = _json(folder / "sample.json") or {}
        for path in sorted(folder.glob("*")) if folder.is_dir() else []:
            if path.suffix.lower() not in AUDIO_SUFFIXES:
                continue
            key = f"{run.name}/{folder.name}/{path.name}"
            source.audio[key] = path
            described = info.get("wav") == path.name  # sample.json says which round and sentence
            round_ = info.get("round") if described else _round_of(path.stem)
            found.append({"url": f"audio/{key}", "round": round_, "text": info.get("text") if described else None})
    return found


def _round_of(stem: str) -> int | None:
    digits = stem.rsplit("-", 1)[-1]
    return int(digits) if digits.isdigit() else None


# ---------------------------------------------------------------------- devices and budgets
def _devices(source: Source, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Registered devices (a home) or the clients the metrics name (a run or simulation), each
    with its last reported profile, epsilon and budget, and the rounds it can still afford."""
    if source.home is not None:
        nodes, unknown = source.nodes() if source.nodes else (None, "server stopped")
        devices = device_report(source.home, nodes, unknown or "server stopped")
        owner = {n: d.name for d in Registry(source.home).devices() for n in d.node_ids}
    else:
        owner, devices = {}, []
        for row in rows:
            for entry in row.get("clients", []):
                if entry.get("client-id") and entry["client-id"] not in owner.values():
                    owner[entry["client-id"]] = entry["client-id"]
        devices = [{"name": name, "status": "-", "node-id": None, "fingerprint": None} for name in owner.values()]
    last = _last_entries(rows, owner, by_client=source.home is None)
    for device in devices:
        entry = last.get(device["name"], {})
        for key in ("profile", "epsilon-spent", "epsilon-budget", "epsilon-next"):
            device[key] = entry.get(key, device.get(key))
        device["rounds-left"] = rounds_left(entry)
        if "rounds-joined" not in device:
            device["rounds-joined"] = sum(
                1
                for row in rows
                for e in row.get("clients", [])
                if e.get("client-id") == device["name"] and e.get("accepted")
            )
    return devices


def _last_entries(rows: list[dict[str, Any]], owner: Mapping[Any, str], by_client: bool) -> dict[str, dict[str, Any]]:
    last: dict[str, dict[str, Any]] = {}
    for row in rows:
        for entry in row.get("clients", []):
            name = owner.get(entry.get("client-id") if by_client else entry.get("node-id"))
            if name is not None and entry.get("epsilon-budget") is not None:
                last[name] = entry
    return last


def rounds_left(entry: Mapping[str, Any]) -> int | None:
    """Rounds a device can still afford, from what it reported: its budget, its epsilon spent and
    the epsilon one more round would take it to. Linear in that next-round cost, so a lower bound
    (epsilon composes sub-linearly over rounds); ``None`` where the device reported no next cost."""
    spent, budget, after = entry.get("epsilon-spent"), entry.get("epsilon-budget"), entry.get("epsilon-next")
    if not all(isinstance(v, (int, float)) for v in (spent, budget, after)):
        return None
    if not math.isfinite(after) or after > budget:  # inf: no noise level fits another round
        return 0
    step = after - spent
    return int((budget - spent) // step) if step > 0 else None


def _epsilon_series(rows: list[dict[str, Any]], devices: list[dict[str, Any]], source: Source) -> dict[str, Any]:
    """Per device, the utterance-level epsilon it reported after each round, and its budget."""
    names = {d["name"] for d in devices}
    owner = {} if source.home is None else {n: d.name for d in Registry(source.home).devices() for n in d.node_ids}
    series: dict[str, list[list[float]]] = {name: [] for name in sorted(names)}
    for row in rows:
        for entry in row.get("clients", []):
            name = entry.get("client-id") if source.home is None else owner.get(entry.get("node-id"))
            if name in series and isinstance(entry.get("epsilon-spent"), (int, float)):
                series[name].append([row["round"], entry["epsilon-spent"]])
    budgets = {d["name"]: d.get("epsilon-budget") for d in devices if d.get("epsilon-budget") is not None}
    return {"series": series, "budgets": budgets}


def _profiles(devices: list[dict[str, Any]], run: Run) -> list[dict[str, Any]]:
    """Resource profiles: a simulation's fleet plan (backend, precision, batch), else the profile
    name each device reported."""
    fleet = _json(run.sim_dir / "fleet.json") if run.sim_dir else None
    if fleet:
        return [
            {
                "client": f"client-{c['partition']}",
                "device": c.get("device"),
                "profile": c.get("profile"),
                "precision": c.get("precision"),
                "physical-batch": c.get("physical-batch"),
            }
            for c in fleet.get("clients", [])
        ]
    return [{"client": d["name"], "profile": d.get("profile")} for d in devices if d.get("profile")]


# ---------------------------------------------------------------------- helpers
def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _numbers(value: Any, prefix: str = "") -> dict[str, float]:
    """Every finite number in a nested mapping, keys joined with spaces."""
    out: dict[str, float] = {}
    if isinstance(value, Mapping):
        for key, inner in value.items():
            out.update(_numbers(inner, f"{prefix} {key}".strip()))
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        out[prefix or "value"] = float(value)
    return out


def _finite(value: Any) -> Any:
    """JSON has no inf or NaN: they become ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


__all__ = ["NodeList", "Run", "Source", "open_source", "rounds_left", "snapshot"]
