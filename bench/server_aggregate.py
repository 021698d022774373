"""Figure 4, server: screening and aggregating N client updates, against reading them once.

    python -m bench.server_aggregate --clients 100                 # s1-v2 full subset, fp16 wire
    python -m bench.server_aggregate --clients 10                  # same, to show memory does not grow with N
    python -m bench.server_aggregate --clients 8 --aggregation median
    python -m bench.server_aggregate --clients 100 --speaker-dp

The real strategy (``fedvox.server.strategy.FedvoxStrategy``) runs rounds against an in-process grid:
``configure_train`` selects N nodes and packs the global subset, N train replies come back (each
an update in the wire precision, as ``client.app`` sends it), and ``aggregate_train`` screens
(status, keys, shapes, dtypes, finite values, norm), re-bases and aggregates them. Timed in one
process, alternating the order every repeat:

* ``read once``: decode every array of every reply and reduce it, once (the floor any
  aggregation pays: one pass over the received bytes);
* ``aggregate``: ``aggregate_train`` itself.

A first round, untimed, measures memory: the peak resident memory of ``aggregate_train`` above
what was resident before it (``/proc/self/clear_refs``), with glibc told to return freed blocks
(so memory the heap kept from earlier work cannot hide an allocation), is what the strategy
adds to the replies.

The replies share ``--distinct`` update records (distinct ``Message`` objects): Flower itself
holds every reply of a round (``Grid.send_and_receive`` returns a list), N records in the wire
precision, which this benchmark states but does not allocate.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import typer
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from bench.common import (
    HEAP_REUSE_THRESHOLD,
    LIVE_MEMORY_THRESHOLD,
    host,
    load_average,
    peak_rss_bytes,
    reset_peak_rss,
    set_mmap_threshold,
    table,
    write_json,
)
from fedvox.server.aggregators import build_aggregator
from fedvox.server.strategy import FedvoxStrategy
from fedvox.shared.cli import run_cli
from fedvox.shared.models.factory import build_model
from fedvox.shared.models.subsets import SubsetSpec, trainable_state_dict
from fedvox.shared.protocol import ARRAYS, METRICS, STATUS, ClientStatus
from fedvox.shared.runconfig import RunConfig
from fedvox.shared.wire import encode_update, from_record, from_wire, read_update, record_bytes, to_record, to_wire

app = typer.Typer(add_completion=False)


class BenchGrid:
    """``Grid`` with ``nodes`` connected clients that answer status queries (and nothing else)."""

    def __init__(self, nodes: int) -> None:
        self.nodes = list(range(1, nodes + 1))
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as a ServerApp has

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return [Message(RecordDict({STATUS: status(m.metadata.dst_node_id).to_record()}), reply_to=m) for m in messages]


def status(node: int) -> ClientStatus:
    return ClientStatus(
        client_id=f"client-{node:03d}", profile="bench", epsilon_spent=0.5, epsilon_budget=10.0, epsilon_next=1.0
    )


def run_config(stage: str, config: str, subset: str, wire: str, aggregation: str, speaker_dp: bool) -> RunConfig:
    return RunConfig.from_flat(
        {
            "stage": stage,
            "model-config": config,
            "pretrained": "",  # a seeded base: aggregation does not depend on the weights
            "subset": subset,
            "min-clients": 1,
            "wire-precision": wire,
            "update-encoding": wire,  # updates as values: this figure predates int8 deltas
            "aggregation": aggregation,
            "speaker-dp.enabled": speaker_dp,
            "max-update-norm": 1e9,
        }
    )


def strategy_for(run: RunConfig) -> FedvoxStrategy:
    """The run's strategy; under speaker-level DP with accounting on a throw-away ledger."""
    speaker = None
    if run.speaker_dp.enabled:
        from fedvox.server.speaker_accounting import SpeakerAccounting
        from fedvox.shared.privacy.ledger import Ledger

        ledger = Ledger(Path(tempfile.mkdtemp(prefix="fedvox-bench-")))
        speaker = SpeakerAccounting(ledger, "bench", run.stage, run.speaker_dp)
    return FedvoxStrategy(run, build_aggregator(run), run_id="bench", attempt="a", seed=0, speaker=speaker)


def updates(sent: dict[str, torch.Tensor], distinct: int, encoding: str) -> list[ArrayRecord]:
    """``distinct`` client updates: the received global plus a small, finite, different step,
    encoded as ``client.app`` encodes them."""
    g = torch.Generator().manual_seed(0)
    return [
        encode_update({n: t + 1e-3 * torch.randn(t.shape, generator=g) for n, t in sent.items()}, sent, encoding, g)
        for _ in range(distinct)
    ]


def train_replies(messages: list[Message], records: list[ArrayRecord]) -> list[Message]:
    """One train reply per message, as ``client.app`` builds it, sharing ``records`` round-robin."""
    replies = []
    for i, m in enumerate(messages):
        arrays = records[i % len(records)]
        metrics = MetricRecord({"bytes-down": record_bytes(arrays), "bytes-up": record_bytes(arrays)})
        content = RecordDict({STATUS: status(m.metadata.dst_node_id).to_record(), ARRAYS: arrays, METRICS: metrics})
        replies.append(Message(content, reply_to=m))
    return replies


def read_once(replies: list[Message]) -> float:
    """Decode and reduce every array of every reply once; returns the checksum (kept live)."""
    total = 0.0
    for reply in replies:
        update = read_update(reply.content.array_records[ARRAYS])
        for name in update:
            total += float(np.sum(update[name].numpy(), dtype=np.float64))
    return total


@app.command()
def main(
    stage: str = typer.Option("s1", help="s1 or s2"),
    config: str = typer.Option("v2", help="model config"),
    subset: str = typer.Option("full", help="full or lora"),
    clients: int = typer.Option(100, help="client updates aggregated in the round"),
    wire: str = typer.Option("fp16", help="wire precision of the global subset and the updates (fp16/fp32 values)"),
    aggregation: str = typer.Option("fedavg", help="fedavg, fedprox, fedadam, median, trimmed-mean"),
    speaker_dp: bool = typer.Option(False, help="speaker-level DP (clip + noise) instead of the plain rule"),
    distinct: int = typer.Option(4, help="distinct update records the replies share"),
    repeats: int = typer.Option(3, help="rounds timed (read once and aggregate alternate first)"),
    out: Path = typer.Option(None, help="JSON path (default runs/bench/server_aggregate-....json)"),
) -> None:
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    freed = set_mmap_threshold(LIVE_MEMORY_THRESHOLD)  # for the memory round, first
    facts = host(torch.device("cpu"))
    state = trainable_state_dict(build_model(stage, config, SubsetSpec(kind=subset), seed=0))
    global_record = to_record(state, "fp32")
    model_fp32 = sum(t.numel() * 4 for t in state.values())
    del state
    strategy = strategy_for(run_config(stage, config, subset, wire, aggregation, speaker_dp))
    grid = BenchGrid(clients)
    records: list[ArrayRecord] = []
    samples: dict[str, dict[str, list[float]]] = {k: {"cpu_s": [], "wall_s": []} for k in ("read", "aggregate")}
    extra = 0
    for server_round in range(1, repeats + 2):
        messages = list(strategy.configure_train(server_round, global_record, ConfigRecord(), grid))
        if not records:
            records = updates(from_wire(to_wire(from_record(global_record), wire)), distinct, wire)
        replies = train_replies(messages, records)
        if server_round == 1:  # the memory round, untimed: fresh pages for every block are slow
            resident = _rss_bytes()
            reset_peak_rss()
            arrays, _ = strategy.aggregate_train(server_round, replies)
            extra = peak_rss_bytes() - resident
            assert arrays is not None and strategy.current is not None, "the round aggregated nothing"
            first = strategy.current
            set_mmap_threshold(HEAP_REUSE_THRESHOLD)
            continue
        for step in ("read", "aggregate") if server_round % 2 else ("aggregate", "read"):
            replies = train_replies(messages, records)  # the median's re-basing replaces reply contents
            cpu, wall = time.process_time(), time.perf_counter()
            if step == "read":
                read_once(replies)
            else:
                strategy.aggregate_train(server_round, replies)
            samples[step]["wall_s"].append(time.perf_counter() - wall)
            samples[step]["cpu_s"].append(time.process_time() - cpu)
        del replies, messages
    median = {step: {k: statistics.median(v) for k, v in s.items()} for step, s in samples.items()}
    one_record = record_bytes(records[0])
    result = {
        "figure": "server_aggregate",
        "host": {**facts, "load_average_end": load_average()},
        "setting": {
            "stage": stage,
            "config": config,
            "subset": subset,
            "clients": clients,
            "wire": wire,
            "aggregation": aggregation,
            "speaker_dp": speaker_dp,
            "distinct_records": distinct,
            "repeats": repeats,
            "torch_threads": 1,
            "freed_memory_returned": freed,
        },
        "record_bytes": one_record,
        "model_fp32_bytes": model_fp32,
        "flower_replies_bytes": one_record * clients,
        "samples": samples,
        "read_once": median["read"],
        "aggregate": median["aggregate"],
        "aggregate_over_read_cpu": median["aggregate"]["cpu_s"] / median["read"]["cpu_s"],
        "aggregate_over_read_wall": median["aggregate"]["wall_s"] / median["read"]["wall_s"],
        "aggregate_peak_extra_bytes": extra,
        "peak_extra_in_fp32_models": extra / model_fp32,
        "participants": len(first.participants),
        "rejects": dict(first.rejects),
    }
    path = write_json(
        result,
        out,
        f"server_aggregate-{stage}-{config}-{subset}-{wire}-{aggregation}"
        f"{'-speakerdp' if speaker_dp else ''}-n{clients}",
    )
    print(
        f"{clients} updates of {stage}-{config} {subset} ({one_record / 1e6:.0f} MB each in {wire}; Flower holds "
        f"{one_record * clients / 1e9:.1f} GB of replies), median of {repeats} rounds after a memory round; "
        f"{facts['cpu']}, 1 thread, "
        f"load {facts['load_average_start']:.1f} -> {load_average():.1f}; {path}"
    )
    rule = f"aggregate ({aggregation}{', speaker DP' if speaker_dp else ''})"
    print(
        table(
            ("step", "cpu s", "wall s", "x read once (cpu)", "peak extra GB", "x fp32 model"),
            [
                ("read once", median["read"]["cpu_s"], median["read"]["wall_s"], 1.0, "", ""),
                (
                    rule,
                    median["aggregate"]["cpu_s"],
                    median["aggregate"]["wall_s"],
                    result["aggregate_over_read_cpu"],
                    extra / 1e9,
                    extra / model_fp32,
                ),
            ],
        )
    )


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    run_cli(app)
