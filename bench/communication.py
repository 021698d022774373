"""Figure 3, communication: bytes one client moves per round, and what the update encoding costs the aggregate.

    python -m bench.communication                                         # sizes; the effect at s1 v2 r8
    python -m bench.communication --stage s1 --config v2 --lora-rank 4 --lora-rank 8 --lora-rank 16
    python -m bench.communication --effect-rank 0                         # sizes only

**Sizes.** For each (stage, config, subset) the model is built as a run builds it
(``shared.models.factory``), its trainable subset packed exactly as client and server pack it
(``shared.wire``: the global subset down in ``wire-precision``, an update up in
``update-encoding``), and the real Flower ``ArrayRecord`` measured: its payload (``record_bytes``,
what the strategy's ``bytes-up``/``bytes-down`` count) and its serialised protobuf size. fp16 and
fp32 sizes do not depend on the values; an int8 delta's size before deflate does not either
(one byte a value plus one fp32 scale per slice), so the sizes table gives it for every row.
The reference is the full model (all of its parameters, frozen ones included; s2: generator and
discriminator) in fp32.

**Effect on the aggregate** (s1 v2 LoRA at each ``--effect-rank``). ``--clients`` devices each
run one round of the run's plan (``RunConfig`` defaults: ``local-steps`` DP-SGD steps of
``logical-batch`` synthetic utterances, AdamW at ``learning-rate``, noise multiplier and clip of
``dp``) with the client's own DP engine (``client.dp.engine``) from the same received global
subset, each on its own data; every device runs its round twice with the same data and two noise
draws. Measured on those real updates: the deflated int8 record each would send, and

* ``error``: the L2 distance of the server's mean (``RoundUpdates.combine`` on the int8 records,
  decoded as the server decodes them) to the exact fp32 mean of the same updates;
* ``noise``: the L2 norm of the DP noise in that exact mean, ``|mean_a - mean_b| / sqrt(2)``
  (the two draws differ only in their noise, so this is the noise as it reaches the model,
  through AdamW, without assuming how it propagates); the plan's per-step gradient noise std
  per coordinate, ``noise-multiplier * clip / logical-batch``, is reported beside it.

The fp16 values encoding is measured the same way, for comparison.
"""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import torch
import typer
from flwr.app import ArrayRecord, Message, MessageType, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.supercore.task_identity import TaskIdentity

from bench.common import host, load_average, table, write_json
from bench.dp_step import synthetic_dataset
from fedvox.client.dp.engine import make_private, run_logical_step
from fedvox.client.stages import client_stage
from fedvox.server.aggregators import Accepted, RoundUpdates
from fedvox.shared.cli import run_cli
from fedvox.shared.models.factory import build_model
from fedvox.shared.models.subsets import SubsetSpec, load_trainable_state_dict, trainable_state_dict
from fedvox.shared.protocol import ARRAYS
from fedvox.shared.runconfig import RunConfig
from fedvox.shared.wire import LEVELS, encode_update, from_wire, read_update, record_bytes, to_wire

app = typer.Typer(add_completion=False)
TARGET_FRACTION = 0.005
"""Issue 17's target: an s1 v2 LoRA rank-8 update under 0.5 % of the full s1 model in fp32."""
ENCODINGS = ("fp32", "fp16", "int8", "int4")
GENERATOR = torch.Generator()


def serialised_bytes(record: ArrayRecord) -> int:
    return recorddict_to_proto(RecordDict({ARRAYS: record})).ByteSize()


def size_rows(stage: str, config: str, spec: SubsetSpec, full_bytes: int) -> list[dict]:
    state = trainable_state_dict(build_model(stage, config, spec, seed=0))
    rows = []
    for encoding in ENCODINGS:
        if encoding in LEVELS:  # before deflate: its size does not depend on the values
            zero = {n: torch.zeros_like(t) for n, t in state.items()}
            record = encode_update(state, zero, encoding, GENERATOR, deflate=False)
        else:
            record = to_wire(state, encoding)
        serialised = serialised_bytes(record)
        rows.append(
            {
                "stage": stage,
                "config": config,
                "subset": spec.kind,
                "lora_rank": spec.lora_rank if spec.kind == "lora" else None,
                "encoding": encoding,
                "tensors": len(state),
                "trainable_params": sum(t.numel() for t in state.values()),
                "record_payload_bytes": record_bytes(record),
                "record_serialised_bytes": serialised,
                "fraction_of_full_fp32": serialised / full_bytes,
                "full_model_fp32_bytes": full_bytes,
            }
        )
    return rows


def full_model_bytes(stage: str, config: str) -> int:
    model = build_model(stage, config, SubsetSpec(kind="full"), seed=0)
    return sum(p.numel() * 4 for p in model.parameters())


def local_round(
    base: torch.nn.Module, received: dict[str, torch.Tensor], dataset: list, plan: RunConfig, noise_seed: int
) -> dict[str, torch.Tensor]:
    """One device's round from ``received``: the plan's DP-SGD steps with the client's engine."""
    model = copy.deepcopy(base)
    load_trainable_state_dict(model, received)
    task = client_stage("s1").task(model, dataset, torch.device("cpu"), "fp32")
    optimizer = task.optimizer("s1", model, plan.learning_rate)
    private = make_private(
        model,
        optimizer,
        noise_multiplier=plan.dp.noise_multiplier,
        clip_norm=plan.dp.clip_norm,
        expected_batch_size=plan.logical_batch,
        noise_generator=torch.Generator().manual_seed(noise_seed),
    )
    wrapped = {"s1": private.module}
    for step in range(plan.local_steps):
        indices = torch.arange(step * plan.logical_batch, (step + 1) * plan.logical_batch)
        run_logical_step(
            indices, plan.logical_batch, lambda chunk: task.accumulate(wrapped, chunk, step_seed=0), [private.optimizer]
        )
    return trainable_state_dict(model)


def server_mean(records: list[ArrayRecord], sent: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The uniform mean update as the server computes it from the received records."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as a ServerApp has
    accepted = [
        Accepted(Message(RecordDict({ARRAYS: r}), dst_node_id=0, message_type=MessageType.TRAIN), None, {}, 0.0)
        for r in records
    ]
    updates = RoundUpdates(0, sent, sent, accepted, len(records), torch.Generator())
    return updates.combine([1.0 / len(records)] * len(records))


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(math.fsum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in a))


def effect(config: str, rank: int, clients: int, plan: RunConfig, phonemes: int, tokens: int, full_bytes: int) -> dict:
    spec = SubsetSpec(kind="lora", lora_rank=rank, lora_alpha=2.0 * rank)
    base = build_model("s1", config, spec, seed=0)
    down = to_wire(trainable_state_dict(base), plan.wire_precision)
    received = from_wire(down)
    utterances = plan.logical_batch * plan.local_steps
    draws: list[list[dict[str, torch.Tensor]]] = [[], []]
    for client, draw in itertools.product(range(clients), range(2)):
        dataset = synthetic_dataset("s1", utterances, phonemes, tokens, seed=1000 + client)
        draws[draw].append(local_round(base, received, dataset, plan, noise_seed=2 * client + draw))

    def exact_mean(trained: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {n: sum(t[n].double() - received[n].double() for t in trained) / clients for n in received}

    mean_a, mean_b = exact_mean(draws[0]), exact_mean(draws[1])
    noise = distance(mean_a, mean_b) / math.sqrt(2)
    coordinates = sum(t.numel() for t in received.values())
    row = {
        "lora_rank": rank,
        "trainable_params": coordinates,
        "down_encoding": plan.wire_precision,
        "down_payload_bytes": record_bytes(down),
        "down_serialised_bytes": serialised_bytes(down),
        "noise_l2": noise,
        "noise_rms_per_coordinate": noise / math.sqrt(coordinates),
        "update_rms_per_coordinate": math.sqrt(
            sum(distance(t, received) ** 2 for t in draws[0]) / clients / coordinates
        ),
        "encodings": {},
    }
    for encoding in ENCODINGS:
        records = [
            encode_update(t, received, encoding, torch.Generator().manual_seed(7 + i)) for i, t in enumerate(draws[0])
        ]
        error = distance(server_mean(records, received), mean_a)
        up = sum(serialised_bytes(r) for r in records) / clients
        row["encodings"][encoding] = {
            "up_payload_bytes": sum(record_bytes(r) for r in records) / clients,
            "up_serialised_bytes": up,
            "deflated_tensors": sum(read_update(r).deflated_tensors for r in records) / clients,
            "up_fraction_of_full_fp32": up / full_bytes,
            "round_fraction_of_full_fp32": (up + row["down_serialised_bytes"]) / full_bytes,
            "error_l2": error,
            "error_over_noise": error / noise,
        }
    return row


@app.command()
def main(
    stage: list[str] = typer.Option(["s1", "s2"], help="s1 and/or s2 (sizes)"),
    config: list[str] = typer.Option(["tiny", "v2"], help="model configs (sizes)"),
    lora_rank: list[int] = typer.Option([4, 8, 16], help="LoRA ranks (sizes; run default 8)"),
    effect_rank: list[int] = typer.Option([8], help="s1 LoRA ranks trained for the effect (0: none)"),
    effect_config: str = typer.Option("v2", help="s1 model config trained for the effect"),
    clients: int = typer.Option(3, help="devices whose updates are averaged"),
    phonemes: int = typer.Option(16, help="phonemes per synthetic utterance"),
    tokens: int = typer.Option(48, help="semantic tokens per synthetic utterance"),
    out: Path = typer.Option(None, help="JSON path (default runs/bench/communication.json)"),
) -> None:
    torch.set_num_threads(1)
    plan = RunConfig()
    facts = host(torch.device("cpu"))
    rows = []
    for st, cfg in itertools.product(stage, config):
        full = full_model_bytes(st, cfg)
        for spec in [SubsetSpec(kind="full")] + [
            SubsetSpec(kind="lora", lora_rank=r, lora_alpha=2.0 * r) for r in lora_rank
        ]:
            rows.extend(size_rows(st, cfg, spec, full))
    s1_full = full_model_bytes("s1", effect_config)
    effects = [effect(effect_config, r, clients, plan, phonemes, tokens, s1_full) for r in effect_rank if r > 0]
    result = {
        "figure": "communication",
        "host": {**facts, "load_average_end": load_average()},
        "plan": {
            "wire_precision": plan.wire_precision,
            "update_encoding": plan.update_encoding,
            "local_steps": plan.local_steps,
            "logical_batch": plan.logical_batch,
            "learning_rate": plan.learning_rate,
            "noise_multiplier": plan.dp.noise_multiplier,
            "clip_norm": plan.dp.clip_norm,
            "gradient_noise_std_per_coordinate": plan.dp.noise_multiplier * plan.dp.clip_norm / plan.logical_batch,
            "clients": clients,
            "utterance": {"phonemes": phonemes, "tokens": tokens},
        },
        "rows": rows,
        "effect": {"config": effect_config, "ranks": effects},
        "target": {
            "fraction": TARGET_FRACTION,
            "met": {
                f"s1-{effect_config}-r{e['lora_rank']}-{enc}": v["up_fraction_of_full_fp32"] <= TARGET_FRACTION
                and v["error_over_noise"] <= 1.0
                for e in effects
                for enc, v in e["encodings"].items()
            },
        },
    }
    path = write_json(result, out, "communication")
    print(f"one record = one direction; {path}")
    print(
        table(
            ("stage", "config", "subset", "encoding", "params", "record MB", "x full fp32"),
            [
                (
                    r["stage"],
                    r["config"],
                    r["subset"] + (f" r{r['lora_rank']}" if r["lora_rank"] else ""),
                    r["encoding"] + (" (before deflate)" if r["encoding"] in LEVELS else ""),
                    f"{r['trainable_params']:,}",
                    r["record_serialised_bytes"] / 1e6,
                    f"{r['fraction_of_full_fp32']:.2%}",
                )
                for r in rows
            ],
        )
    )
    if effects:
        print(f"s1 {effect_config} LoRA, {clients} devices, real DP-SGD updates of the run's plan:")
        print(
            table(
                (
                    "rank",
                    "update",
                    "up MB",
                    "up x full",
                    "round x full",
                    "|error|",
                    "|DP noise|",
                    "error/noise",
                ),
                [
                    (
                        e["lora_rank"],
                        enc,
                        v["up_serialised_bytes"] / 1e6,
                        f"{v['up_fraction_of_full_fp32']:.3%}",
                        f"{v['round_fraction_of_full_fp32']:.3%}",
                        f"{v['error_l2']:.3g}",
                        f"{e['noise_l2']:.3g}",
                        f"{v['error_over_noise']:.3g}",
                    )
                    for e in effects
                    for enc, v in e["encodings"].items()
                ],
            )
        )


if __name__ == "__main__":
    run_cli(app)
