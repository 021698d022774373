"""The run configuration of a federation, validated up front.

One configuration drives server and clients alike. Its defaults live in ``pyproject.toml``
(``[tool.flwr.app.config]``, so ``flwr run .`` works), and can be overridden by a TOML file and
by ``--run-config "key=value ..."``. Flower flattens nested TOML tables into dotted keys
(``dp.clip-norm``); :meth:`RunConfig.from_flat` reads exactly that form and rejects unknown keys
and out-of-range values with one clear message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Self, cast

from pydantic import Field, model_validator

from fedvox.shared.models.config import CONFIG_NAMES, SHIPPED_BASE, SHIPPED_BASE_CONFIG, shipped_base_mismatch
from fedvox.shared.settings import choice, dump, flatten, parse, read_toml, settings, unflatten
from fedvox.shared.stages import STAGES

if TYPE_CHECKING:
    from torch import nn

    from fedvox.shared.models.subsets import SubsetSpec

SUBSETS = ("full", "lora", "groups")
AGGREGATIONS = ("fedavg", "fedadam", "fedprox", "median", "trimmed-mean")
WIRE_PRECISIONS = ("fp16", "fp32")
UPDATE_ENCODINGS = ("int4", "int8", "fp16", "fp32")
"""How a client's update travels (:mod:`fedvox.shared.wire`): int4/int8 deltas, or fp16/fp32 values."""
WHAT = "run-config"

Positive = Field(gt=0)
Probability = Field(gt=0, lt=1)


@settings(WHAT)
class UtteranceDP:
    """Utterance-level DP-SGD on every client (Opacus).

    ``sample_rate`` is the plan's Poisson rate ``q``: a device's expected logical batch is
    ``q * N``, so its epsilon depends on plan values only and reveals nothing of ``N``. ``delta``
    is what the server plans with; a device accounts at its owner's delta (docs/privacy.md).
    """

    noise_multiplier: Annotated[float, Field(ge=0)] = 1.0
    target_epsilon: Annotated[
        float, Field(ge=0, description="> 0: calibrate the noise to reach this after the planned rounds")
    ] = 0.0
    clip_norm: Annotated[float, Positive] = 1.0
    delta: Annotated[float, Probability] = 1e-5
    sample_rate: Annotated[float, Field(gt=0, le=1)] = 0.05
    # a released validation loss (evaluate = true); checked when evaluate is on
    loss_noise_multiplier: float = 10.0
    loss_clip: float = 10.0  # per-utterance losses are clipped to [0, loss-clip] before noising


@settings(WHAT)
class SpeakerDP:
    """Speaker-level DP-FedAvg on the server: clip each client update, noise the aggregate.

    Its values are checked when it is enabled (:meth:`RunConfig._across_keys`).
    """

    enabled: bool = False
    noise_multiplier: float = 1.0
    clip_norm: float = 1.0
    delta: float = 1e-5
    budget_epsilon: float = 0.0  # > 0: never select a speaker whose epsilon would pass this


S2_LORA = ("decoder", "all")
"""Which generator convs an s2 LoRA run adapts: the decoder's (the voice it renders), or every
LoRA target (text side, flow and decoder; ``SynthesizerTrn.lora_targets``)."""


@settings(WHAT)
class S2Training:
    """What an s2 (SoVITS) run trains; s1 runs ignore it.

    The defaults, LoRA on the decoder alone and no adversary, give the same epsilon one DP
    release per step instead of two over fewer coordinates, at half the compute per step; in
    simulation they lowered the clients' held-out mel loss, though no s2 setting tried there
    moved speaker similarity measurably (docs/simulation.md).
    """

    lora: Annotated[str, choice(S2_LORA)] = "decoder"
    adversarial: bool = False  # true: the discriminator trains beside the generator (GAN losses)


def group_names(groups: str) -> tuple[str, ...]:
    """A ``groups`` setting (comma-separated module group names) as a tuple of names."""
    return tuple(name.strip() for name in groups.split(",") if name.strip())


def subset_spec(stage: str, subset: str, lora_rank: int, lora_alpha: float, groups: str, s2: S2Training) -> SubsetSpec:
    """The trainable subset these settings name: one reading for federated and local runs alike."""
    from fedvox.shared.models.subsets import SubsetKind, SubsetSpec  # torch: loaded when a model is built

    is_s2 = stage == "s2"
    return SubsetSpec(
        kind=cast("SubsetKind", subset),
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        groups=group_names(groups),
        lora_groups=("decoder",) if is_s2 and subset == "lora" and s2.lora == "decoder" else (),
        adversary=not is_s2 or s2.adversarial,
    )


@settings(WHAT)
class RunConfig:
    stage: Annotated[str, choice(STAGES)] = "s1"
    model_config: Annotated[str, choice(CONFIG_NAMES)] = SHIPPED_BASE_CONFIG
    subset: Annotated[str, choice(SUBSETS)] = "lora"
    # module groups trained in full, comma-separated: the whole subset with subset = "groups" (s2: decoder,
    # ref_enc, ...), or beside the adapters with "lora" (e.g. norms); SubsetSpec checks the pair
    groups: str = ""
    lora_rank: Annotated[int, Positive] = 8
    lora_alpha: float = 16.0
    num_server_rounds: Annotated[int, Positive] = 3
    clients_per_round: Annotated[int, Field(ge=0, description="0 selects every available client")] = 0
    min_clients: Annotated[int, Positive] = 2
    local_steps: Annotated[int, Positive] = 5
    logical_batch: Annotated[int, Positive] = 8
    learning_rate: Annotated[float, Positive] = 1e-3
    wire_precision: Annotated[str, choice(WIRE_PRECISIONS)] = "fp16"  # the global subset sent to clients
    # a client's update: int4/int8 deltas (stochastic rounding) or fp16/fp32 values (shared/wire.py)
    update_encoding: Annotated[str, choice(UPDATE_ENCODINGS)] = "int4"
    aggregation: Annotated[str, choice(AGGREGATIONS)] = "fedavg"
    proximal_mu: float = 0.01
    trim_fraction: Annotated[float, Field(ge=0, lt=0.5)] = 0.2
    server_learning_rate: float = 0.01  # fedadam's Adam step
    # every rule but fedadam: the global model moves server-step times the aggregate's move
    server_step: Annotated[float, Positive] = 1.0
    max_update_norm: Annotated[float, Positive] = 1e3
    client_budget_epsilon: Annotated[float, Positive] = 10.0
    checkpoint_dir: str = ""
    keep_checkpoints: Annotated[int, Positive] = 3
    model_seed: int = 0
    # the frozen base: fedvox's shipped one, a GPT-SoVITS checkpoint (s1 .ckpt, s2G .pth) or fedvox export; "": seeded
    pretrained: str = SHIPPED_BASE
    data_root: str = ""
    round_timeout: Annotated[float, Positive] = 3600.0
    max_misses: Annotated[
        int,
        Field(
            ge=0,
            description="a client selected this many rounds in a row without a usable update is benched; 0: never",
        ),
    ] = 3
    evaluate: bool = False  # true: each round, clients release a DP validation loss (charged)
    dp: UtteranceDP = field(default_factory=UtteranceDP)
    speaker_dp: SpeakerDP = field(default_factory=SpeakerDP)
    s2: S2Training = field(default_factory=S2Training)

    @model_validator(mode="after")
    def _across_keys(self) -> Self:
        """Checks that involve several keys (each message names them)."""
        mismatch = shipped_base_mismatch(self.model_config, self.pretrained)
        if mismatch:
            raise ValueError(mismatch)
        if self.clients_per_round and self.clients_per_round < self.min_clients:
            raise ValueError(
                f"clients-per-round ({self.clients_per_round}) is below min-clients "
                f"({self.min_clients}); raise it or lower min-clients"
            )
        if self.dp.noise_multiplier == 0 and self.dp.target_epsilon == 0:
            raise ValueError(
                "utterance-level DP needs dp.noise-multiplier > 0 or dp.target-epsilon > 0 "
                "(training without noise gives no privacy guarantee)"
            )
        if self.aggregation == "fedadam" and self.server_step != 1:
            raise ValueError(
                f"server-step ({self.server_step}) scales the move of a mean, median or trimmed mean; "
                "fedadam steps with server-learning-rate instead: leave server-step at 1"
            )
        if self.evaluate:
            _positive("dp.loss-noise-multiplier", self.dp.loss_noise_multiplier, "with evaluate = true")
            _positive("dp.loss-clip", self.dp.loss_clip, "with evaluate = true")
        speaker = self.speaker_dp
        if speaker.enabled:
            _positive("speaker-dp.noise-multiplier", speaker.noise_multiplier, "with speaker-dp.enabled")
            _positive("speaker-dp.clip-norm", speaker.clip_norm, "with speaker-dp.enabled")
            if not 0 < speaker.delta < 1:
                raise ValueError(f"speaker-dp.delta must be in (0, 1), got {speaker.delta}")
            if speaker.budget_epsilon < 0:
                raise ValueError("speaker-dp.budget-epsilon must be >= 0 (0: no speaker-level cap)")
            if self.aggregation in ("median", "trimmed-mean"):
                raise ValueError(
                    "speaker-level DP needs a mean aggregation (fedavg, fedadam, fedprox): the "
                    "noise is calibrated to the sensitivity of a clipped mean"
                )
        return self

    @property
    def subset_spec(self) -> SubsetSpec:
        """The trainable subset of the run's model, built here for every caller."""
        return subset_spec(self.stage, self.subset, self.lora_rank, self.lora_alpha, self.groups, self.s2)

    def build_model(self) -> nn.Module:
        """The run's model: its stage and config, from the base it fine-tunes (the shipped base, a
        checkpoint, or its seed), with its trainable subset applied. Server, devices and every
        simulated baseline build it here, so a trainable state saved by one loads into another's."""
        from fedvox.shared.models.factory import build_model  # torch: loaded when a model is built

        return build_model(
            self.stage, self.model_config, self.subset_spec, seed=self.model_seed, pretrained=self.pretrained or None
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], where: str | Path = "") -> RunConfig:
        """Build from Flower's flattened run config (``dp.clip-norm`` style keys)."""
        return parse(cls, unflatten(flat, WHAT), where)

    @classmethod
    def from_toml(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
        """Read a TOML file (top-level keys or a ``[tool.flwr.app.config]`` table) plus overrides."""
        data = read_toml(path, "run configuration")
        data = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", data)
        flat = flatten(data)
        flat.update(overrides or {})
        return cls.from_flat(flat, path)

    def with_overrides(self, overrides: Mapping[str, Any]) -> RunConfig:
        """A copy with Flower-style flat overrides applied and validated."""
        flat = self.to_flat()
        flat.update(overrides)
        return RunConfig.from_flat(flat)

    def to_flat(self) -> dict[str, Any]:
        """Flower's flat form (kebab-case, dotted groups)."""
        return flatten(dump(self))


def _positive(key: str, value: float, when: str) -> None:
    if not value > 0:
        raise ValueError(f"{key} must be > 0 {when}, got {value}")


__all__ = ["AGGREGATIONS", "RunConfig", "S2Training", "SpeakerDP", "UtteranceDP"]
