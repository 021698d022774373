"""The run configuration of a federation, validated up front.

One configuration drives server and clients alike. Its defaults live in ``pyproject.toml``
(``[tool.flwr.app.config]``, so ``flwr run .`` works), and can be overridden by a TOML file and
by ``--run-config "key=value ..."``. Flower flattens nested TOML tables into dotted keys
(``dp.clip-norm``); :meth:`RunConfig.from_flat` reads exactly that form and rejects unknown keys
and out-of-range values with one clear message.
"""

from __future__ import annotations

import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from fedvox.shared.errors import ConfigError
from fedvox.shared.models.config import CONFIG_NAMES
from fedvox.shared.stages import STAGES

if TYPE_CHECKING:
    from fedvox.shared.models.subsets import SubsetSpec

SUBSETS = ("full", "lora")
AGGREGATIONS = ("fedavg", "fedadam", "fedprox", "median", "trimmed-mean")
WIRE_PRECISIONS = ("fp16", "fp32")


@dataclass(frozen=True)
class UtteranceDP:
    """Utterance-level DP-SGD on every client (Opacus).

    ``sample_rate`` is the plan's Poisson rate ``q``: a device's expected logical batch is
    ``q * N``, so its epsilon depends on plan values only and reveals nothing of ``N``. ``delta``
    is what the server plans with; a device accounts at its owner's delta (docs/privacy.md).
    """

    noise_multiplier: float = 1.0
    target_epsilon: float = 0.0  # > 0: calibrate the noise to reach this after the planned rounds
    clip_norm: float = 1.0
    delta: float = 1e-5
    sample_rate: float = 0.05
    loss_noise_multiplier: float = 10.0  # a released validation loss (evaluate = true)
    loss_clip: float = 10.0  # per-utterance losses are clipped to [0, loss-clip] before noising


@dataclass(frozen=True)
class SpeakerDP:
    """Speaker-level DP-FedAvg on the server: clip each client update, noise the aggregate."""

    enabled: bool = False
    noise_multiplier: float = 1.0
    clip_norm: float = 1.0
    delta: float = 1e-5
    budget_epsilon: float = 0.0  # > 0: never select a speaker whose epsilon would pass this


@dataclass(frozen=True)
class RunConfig:
    stage: str = "s1"
    model_config: str = "tiny"
    subset: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    num_server_rounds: int = 3
    clients_per_round: int = 0  # 0: every available client
    min_clients: int = 2
    local_steps: int = 5
    logical_batch: int = 8
    learning_rate: float = 1e-3
    wire_precision: str = "fp16"
    aggregation: str = "fedavg"
    proximal_mu: float = 0.01
    trim_fraction: float = 0.2
    server_learning_rate: float = 0.01
    max_update_norm: float = 1e3
    client_budget_epsilon: float = 10.0
    checkpoint_dir: str = ""
    keep_checkpoints: int = 3
    model_seed: int = 0
    pretrained: str = ""  # GPT-SoVITS checkpoint of the frozen base (s1 .ckpt, s2G .pth); "": seeded init
    data_root: str = ""
    round_timeout: float = 3600.0
    max_misses: int = 3  # a client selected this many rounds in a row without a usable update is benched; 0: never
    evaluate: bool = False  # true: each round, clients release a DP validation loss (charged)
    dp: UtteranceDP = field(default_factory=UtteranceDP)
    speaker_dp: SpeakerDP = field(default_factory=SpeakerDP)

    @property
    def subset_spec(self) -> SubsetSpec:
        """The trainable subset of the run's model, built here for every caller."""
        from fedvox.shared.models.subsets import SubsetKind, SubsetSpec  # torch: loaded when a model is built

        return SubsetSpec(kind=cast("SubsetKind", self.subset), lora_rank=self.lora_rank, lora_alpha=self.lora_alpha)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's flattened run config (``dp.clip-norm`` style keys)."""
        top: dict[str, Any] = {}
        groups: dict[str, dict[str, Any]] = {"dp": {}, "speaker_dp": {}}
        for key, value in flat.items():
            parts = key.replace("-", "_").split(".")
            if len(parts) == 2 and parts[0] in groups:
                groups[parts[0]][parts[1]] = value
            elif len(parts) == 1:
                top[parts[0]] = value
            else:
                raise ConfigError(f"unknown run-config key {key!r}")
        config = cls(
            **_typed(cls, top, skip={"dp", "speaker_dp"}),
            dp=UtteranceDP(**_typed(UtteranceDP, groups["dp"], prefix="dp.")),
            speaker_dp=SpeakerDP(**_typed(SpeakerDP, groups["speaker_dp"], prefix="speaker-dp.")),
        )
        config.validate()
        return config

    @classmethod
    def from_toml(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
        """Read a TOML file (top-level keys or a ``[tool.flwr.app.config]`` table) plus overrides."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read run configuration {path}: {exc}") from exc
        data = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", data)
        flat = flatten(data)
        flat.update(overrides or {})
        return cls.from_flat(flat)

    def with_overrides(self, overrides: Mapping[str, Any]) -> RunConfig:
        """A copy with Flower-style flat overrides applied and validated."""
        flat = self.to_flat()
        flat.update(overrides)
        return RunConfig.from_flat(flat)

    def to_flat(self) -> dict[str, Any]:
        """Flower's flat form (kebab-case, dotted groups)."""
        flat: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("dp", "speaker_dp"):
                group = f.name.replace("_", "-")
                for g in fields(value):
                    flat[f"{group}.{g.name.replace('_', '-')}"] = getattr(value, g.name)
            else:
                flat[f.name.replace("_", "-")] = value
        return flat

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        _choice("stage", self.stage, STAGES)
        _choice("model-config", self.model_config, CONFIG_NAMES)
        _choice("subset", self.subset, SUBSETS)
        _choice("aggregation", self.aggregation, AGGREGATIONS)
        _choice("wire-precision", self.wire_precision, WIRE_PRECISIONS)
        _positive("num-server-rounds", self.num_server_rounds)
        _positive("local-steps", self.local_steps)
        _positive("logical-batch", self.logical_batch)
        _positive("learning-rate", self.learning_rate)
        _positive("lora-rank", self.lora_rank)
        _positive("min-clients", self.min_clients)
        _positive("keep-checkpoints", self.keep_checkpoints)
        _positive("max-update-norm", self.max_update_norm)
        _positive("client-budget-epsilon", self.client_budget_epsilon)
        _positive("round-timeout", self.round_timeout)
        if self.max_misses < 0:
            raise ConfigError(f"max-misses must be >= 0 (0: never bench a client), got {self.max_misses}")
        _positive("dp.clip-norm", self.dp.clip_norm)
        _probability("dp.delta", self.dp.delta)
        if not 0 < self.dp.sample_rate <= 1:
            raise ConfigError(f"run-config dp.sample-rate must be in (0, 1], got {self.dp.sample_rate}")
        if self.evaluate:
            _positive("dp.loss-noise-multiplier", self.dp.loss_noise_multiplier)
            _positive("dp.loss-clip", self.dp.loss_clip)
        if self.clients_per_round < 0:
            raise ConfigError("clients-per-round must be >= 0 (0 selects every available client)")
        if self.clients_per_round and self.clients_per_round < self.min_clients:
            raise ConfigError(
                f"clients-per-round ({self.clients_per_round}) is below min-clients "
                f"({self.min_clients}); raise it or lower min-clients"
            )
        if self.dp.noise_multiplier < 0 or self.dp.target_epsilon < 0:
            raise ConfigError("dp.noise-multiplier and dp.target-epsilon must be >= 0")
        if self.dp.noise_multiplier == 0 and self.dp.target_epsilon == 0:
            raise ConfigError(
                "utterance-level DP needs dp.noise-multiplier > 0 or dp.target-epsilon > 0 "
                "(training without noise gives no privacy guarantee)"
            )
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"trim-fraction must be in [0, 0.5), got {self.trim_fraction}")
        if self.speaker_dp.enabled:
            _positive("speaker-dp.noise-multiplier", self.speaker_dp.noise_multiplier)
            _positive("speaker-dp.clip-norm", self.speaker_dp.clip_norm)
            _probability("speaker-dp.delta", self.speaker_dp.delta)
            if self.speaker_dp.budget_epsilon < 0:
                raise ConfigError("speaker-dp.budget-epsilon must be >= 0 (0: no speaker-level cap)")
            if self.aggregation in ("median", "trimmed-mean"):
                raise ConfigError(
                    "speaker-level DP needs a mean aggregation (fedavg, fedadam, fedprox): the "
                    "noise is calibrated to the sensitivity of a clipped mean"
                )


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested TOML tables into Flower's dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _typed(
    cls: type, values: Mapping[str, Any], skip: Collection[str] = frozenset(), prefix: str = ""
) -> dict[str, Any]:
    known = {f.name: f for f in fields(cls) if f.name not in skip}
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name not in known:
            nice = prefix + name.replace("_", "-")
            raise ConfigError(
                f"unknown run-config key {nice!r}; known keys: "
                + ", ".join(prefix + k.replace("_", "-") for k in known)
            )
        default = getattr(cls(), name) if name not in skip else None
        out[name] = _coerce(prefix + name.replace("_", "-"), value, type(default))
    return out


def _coerce(key: str, value: Any, kind: type) -> Any:
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false"):
                    raise ValueError(value)
                return value.lower() == "true"
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"run-config {key} must be a {kind.__name__}, got {value!r}") from None


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"run-config {key} = {value!r} is not one of {', '.join(options)}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"run-config {key} must be > 0, got {value}")


def _probability(key: str, value: float) -> None:
    if not 0 < value < 1:
        raise ConfigError(f"run-config {key} must be in (0, 1), got {value}")


__all__ = ["RunConfig", "SpeakerDP", "UtteranceDP", "flatten"]
