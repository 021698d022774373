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
from collections.abc import Mapping
from dataclasses import field, replace
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import Field, StrictBool, StrictFloat, StrictInt, field_validator, model_validator

from fedvox.shared.errors import ConfigError
from fedvox.shared.settings import accepts, choice, dump, flatten, kebab, parse, read_toml, settings
from fedvox.shared.stages import STAGES
from fedvox.simulations.speakers import SpeakersConfig

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
Count = Annotated[StrictInt, Field(ge=0)]


def _folder_name(name: str) -> bool:
    return NAME.fullmatch(name) is not None


@settings("run")
class RunSpec:
    """One federated run of a scenario; each field is the ``fedvox-sim run`` option of that name."""

    name: Annotated[str, accepts(_folder_name, "letters, digits, '_', '.', '-' (a folder name)")] = "run"
    rounds: Annotated[StrictInt, Field(ge=1)] = 3
    stage: Annotated[str, choice(STAGES)] = "s1"
    fleet: str = "mixed"  # a built-in fleet or a fleet .toml file
    epsilon: Annotated[
        StrictFloat, Field(ge=0, description="utterance-level target epsilon per client; 0: use dp.noise-multiplier")
    ] = 8.0
    speaker_dp: StrictBool = False
    clients_per_round: Annotated[Count, Field(description="at most this many train a round; 0: every eligible one")] = (
        10
    )
    seed: Count = 0  # fleet assignment, availability draws, sampling and noise of the server
    local_baselines: Annotated[Count, Field(description="clients that also train alone; 0: none")] = 8
    central_baseline: StrictBool = True  # a non-private model trained on everyone's data
    sample: StrictBool = True  # synthesise a sample from the final global model
    quality_sentences: Annotated[Count, Field(description="held-out sentences per speaker each model speaks")] = 2
    config: dict[str, Any] = field(default_factory=dict)  # extra run-config keys (flat, Flower style)

    @field_validator("config", mode="before")
    @classmethod
    def _flat(cls, value: Any) -> Any:
        """A ``[run.config]`` table may nest (``[run.config.dp]``); the run configuration takes it flat."""
        return flatten(value) if isinstance(value, Mapping) else value


@settings("scenario")
class Scenario:
    """A speaker set and the runs made on it."""

    name: str
    speakers: SpeakersConfig
    runs: Annotated[tuple[RunSpec, ...], Field(min_length=1)]
    description: str = ""

    @model_validator(mode="after")
    def _distinct_runs(self) -> Self:
        names = [run.name for run in self.runs]
        if len(set(names)) != len(names):
            raise ValueError(f"runs share a name: {names} (each run's folder is its name)")
        return self


def build_scenario(path: str | Path | None, speakers: Mapping[str, Any], run: Mapping[str, Any]) -> Scenario:
    """The scenario of ``path`` (or a single run), with explicit command-line values on top.

    ``speakers`` uses :class:`SpeakersConfig` field names, ``run`` :class:`RunSpec` field names;
    values of ``None`` were not given. A bad value is named by its scenario key.
    """
    given_speakers = {k: v for k, v in speakers.items() if v is not None}
    given_run = {k: v for k, v in run.items() if v is not None}
    scenario = Scenario("run", SpeakersConfig(), (RunSpec(),)) if path is None else read_scenario(path)
    config = {**given_run.pop("config", {})}
    return replace(
        scenario,
        speakers=replace(scenario.speakers, **given_speakers),
        runs=tuple(replace(r, **given_run, config={**r.config, **config}) for r in scenario.runs),
    )


def read_scenario(path: str | Path) -> Scenario:
    """Read a scenario file (module docstring); every problem names the key and the file.

    Each ``[[runs]]`` table is read on top of ``[run]`` (its ``config`` keys on top of
    ``[run.config]``'s), so a problem is reported in the table that has it.
    """
    data = read_toml(path, "scenario")
    unknown = sorted(set(data) - {"name", "description", "speakers", "run", "runs"})
    if unknown:
        raise ConfigError(f"{path}: unknown scenario key(s) {unknown}; known: name, description, speakers, run, runs")
    defaults = dump(parse(RunSpec, _table(data.get("run", {}), path, "[run]"), f"{path} [run]"))
    runs = data.get("runs", [{}])
    if not isinstance(runs, list):
        raise ConfigError(f"{path}: runs must be [[runs]] tables")
    specs = []
    for k, table in enumerate(runs):
        where = f"[[runs]] #{k + 1}"
        values = {kebab(key): value for key, value in _table(table, path, where).items()}
        if isinstance(values.get("config", {}), Mapping):
            values["config"] = {**defaults["config"], **flatten(values.get("config", {}))}
        specs.append(parse(RunSpec, {**defaults, **values}, f"{path} {where}"))
    return parse(
        Scenario,
        {
            "name": data.get("name", Path(path).stem),
            "speakers": _table(data.get("speakers", {}), path, "[speakers]"),
            "runs": specs,
            "description": data.get("description", ""),
        },
        path,
    )


def _table(value: Any, path: str | Path, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: {where} must be a table")
    return value


__all__ = ["RunSpec", "Scenario", "build_scenario", "read_scenario"]
