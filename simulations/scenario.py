"""What to simulate: one speaker set and one or more federated runs on it (a *scenario*).

``fedvox-sim run`` with options is a scenario of one run. A scenario file makes a study
repeatable, e.g. a privacy-utility sweep over epsilon (``simulations/scenarios/``)::

    name = "privacy-utility"
    description = "..."

    [speakers]              # the speaker set every run shares (`fedvox-sim speakers` options)
    n = 8
    utterances = 20

    [run]                   # defaults of every run (`fedvox-sim run` options)
    rounds = 3
    fleet = "mixed"

    [run.config]            # run-configuration keys (pyproject's [tool.flwr.app.config])
    local-steps = 5

    [[runs]]                # one table per run; each overrides [run] and [run.config]
    name = "eps-1"
    epsilon = 1.0

Command-line options given explicitly override the file's ``[speakers]`` and ``[run]`` for
every run.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fedvox.shared.errors import ConfigError
from fedvox.shared.settings import flatten
from fedvox.shared.stages import STAGES
from fedvox.simulations.speakers import SpeakersConfig

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SPEAKER_KEYS = {"n": "n_speakers", "lang": "language"}  # `fedvox-sim speakers` option names


@dataclass(frozen=True)
class RunSpec:
    """One federated run of a scenario; each field is the ``fedvox-sim run`` option of that name."""

    name: str = "run"
    rounds: int = 3
    stage: str = "s1"
    fleet: str = "mixed"  # a built-in fleet or a fleet .toml file
    epsilon: float = 8.0  # utterance-level target epsilon per client over the run; 0: use dp.noise-multiplier
    speaker_dp: bool = False
    clients_per_round: int = 10  # at most this many clients train a round (0: every eligible one)
    seed: int = 0  # fleet assignment, availability draws, sampling and noise of the server
    local_baselines: int = 8  # clients that also train alone (0: no local-only baseline)
    central_baseline: bool = True  # a non-private model trained on everyone's data
    sample: bool = True  # synthesise a sample from the final global model
    quality_sentences: int = 2  # held-out sentences per speaker each model speaks and is scored on (0: none)
    config: Mapping[str, Any] = field(default_factory=dict)  # extra run-config keys (flat, Flower style)

    def validate(self) -> None:
        defaults = RunSpec()
        for f in fields(self):
            value, kind = getattr(self, f.name), type(getattr(defaults, f.name))
            ok = (
                isinstance(value, Mapping)
                if f.name == "config"
                else (
                    (isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool))
                    or (kind is float and isinstance(value, int) and not isinstance(value, bool))
                )
            )
            if not ok:
                raise ConfigError(f"run {f.name.replace('_', '-')} must be a {kind.__name__}, got {value!r}")
        if not NAME.fullmatch(self.name):
            raise ConfigError(f"run name {self.name!r} must be letters, digits, '_', '.', '-' (a folder name)")
        if self.rounds < 1:
            raise ConfigError(f"--rounds must be >= 1, got {self.rounds}")
        if self.stage not in STAGES:
            raise ConfigError(f"--stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.epsilon < 0:
            raise ConfigError(f"--epsilon must be > 0 (or 0 to use dp.noise-multiplier), got {self.epsilon}")
        for name in ("clients_per_round", "local_baselines", "seed", "quality_sentences"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class Scenario:
    """A speaker set and the runs made on it."""

    name: str
    speakers: SpeakersConfig
    runs: tuple[RunSpec, ...]
    description: str = ""

    def validate(self) -> None:
        self.speakers.validate()
        if not self.runs:
            raise ConfigError(f"scenario {self.name!r} has no runs")
        names = [run.name for run in self.runs]
        if len(set(names)) != len(names):
            raise ConfigError(f"scenario {self.name!r} has runs with the same name: {names}")
        for run in self.runs:
            run.validate()


def build_scenario(path: str | Path | None, speakers: Mapping[str, Any], run: Mapping[str, Any]) -> Scenario:
    """The scenario of ``path`` (or a single run), with explicit command-line values on top.

    ``speakers`` uses :class:`SpeakersConfig` field names, ``run`` :class:`RunSpec` field names;
    values of ``None`` were not given.
    """
    given_speakers = {k: v for k, v in speakers.items() if v is not None}
    given_run = {k: v for k, v in run.items() if v is not None}
    scenario = Scenario("run", _speakers({}, ""), (RunSpec(),)) if path is None else read_scenario(path)
    config = {**given_run.pop("config", {})}
    scenario = replace(
        scenario,
        speakers=replace(scenario.speakers, **given_speakers),
        runs=tuple(replace(r, **given_run, config={**r.config, **config}) for r in scenario.runs),
    )
    scenario.validate()
    return scenario


def read_scenario(path: str | Path) -> Scenario:
    """Read a scenario file (module docstring); every problem names the key and the file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read scenario {path}: {exc}") from exc
    _known(data, {"name", "description", "speakers", "run", "runs"}, str(path))
    defaults = _run_values(data.get("run", {}), f"[run] in {path}")
    runs = data.get("runs", [{}])
    if not isinstance(runs, list) or not all(isinstance(r, Mapping) for r in runs):
        raise ConfigError(f"runs in {path} must be [[runs]] tables")
    specs = []
    for k, table in enumerate(runs):
        values = _run_values(table, f"[[runs]] #{k + 1} in {path}")
        config = {**defaults.get("config", {}), **values.pop("config", {})}
        specs.append(RunSpec(**{**defaults, **values, "config": config}))
    scenario = Scenario(
        name=str(data.get("name", path.stem)),
        speakers=_speakers(data.get("speakers", {}), f"[speakers] in {path}"),
        runs=tuple(specs),
        description=str(data.get("description", "")),
    )
    scenario.validate()
    return scenario


def _speakers(table: Any, where: str) -> SpeakersConfig:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table")
    names = {f.name for f in fields(SpeakersConfig)} - {"workers"}
    values = {}
    for key, value in table.items():
        name = SPEAKER_KEYS.get(key, key.replace("-", "_"))
        if name not in names:
            raise ConfigError(
                f"unknown key {key!r} in {where}; known: n, utterances, lang, seed, zipf, "
                "heldout-utterances, unseen-speakers, engine"
            )
        values[name] = value
    return SpeakersConfig(**values)


def _run_values(table: Any, where: str) -> dict[str, Any]:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table")
    names = {f.name for f in fields(RunSpec)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in names:
            raise ConfigError(
                f"unknown key {key!r} in {where}; known: " + ", ".join(n.replace("_", "-") for n in sorted(names))
            )
        if name == "config":
            if not isinstance(value, Mapping):
                raise ConfigError(f"config in {where} must be a table of run-configuration keys")
            value = flatten(value)
        values[name] = value
    return values


def _known(data: Mapping[str, Any], keys: set[str], where: str) -> None:
    unknown = sorted(set(data) - keys)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; known: {', '.join(sorted(keys))}")


__all__ = ["RunSpec", "Scenario", "build_scenario", "read_scenario"]
