"""The fedvox ClientApp as a fleet of simulated devices: a Flower mod around the real handlers.

Flower's simulation engine gives every virtual SuperNode the same resources and only a
``partition-id`` in its node config. :class:`FleetMod` is a ClientApp mod (Flower's middleware
hook) that turns node ``p`` into client ``p`` of the fleet, without the ClientApp knowing it is
simulated:

- before every message it puts the client's ``profile.*`` overrides into the node config, the
  keys a real SuperNode takes with ``--node-config``, so the unchanged ClientApp trains with
  the simulated device's physical batch, precision and checkpointing;
- on a ``train`` message it applies the availability model: a client that drops out this round
  answers with an error at once, without training (nothing is charged); a client whose
  simulated time passes the round deadline trained and released its update (its ledger is
  charged), but the update arrives too late and is replaced by an error reply, which the server
  counts as not used. Both replies are immediate, so a dropped client never stalls the round;
  the simulated clock charges the deadline for them instead.
- it writes one JSON line per ``train`` message to ``events/client-<p>.jsonl``: the outcome, the
  Ray node and worker process that ran it and when it started, and the measured and simulated
  figures the report is built from (the message's time on the host, and the DP steps' part of
  it, which the ClientApp keeps in the node's own context state).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from fedvox.client.app import LOCAL_TIMING
from fedvox.client.identity import client_identity
from fedvox.shared.errors import ProtocolError
from fedvox.shared.protocol import CONFIG, METRICS, REFUSED, SERVER_ROUND, STATUS, ClientStatus, Plan
from fedvox.simulations.fleets import Fleet, VirtualClient, round_draw

log = logging.getLogger(__name__)

DROPOUT_ERROR = 9001
STRAGGLER_ERROR = 9002
"""Error codes of the simulated availability model (Flower's own codes are small integers)."""


class FleetMod:
    """A Flower ClientApp mod that makes virtual node ``p`` behave like ``clients[p]``."""

    def __init__(self, fleet: Fleet, clients: Sequence[VirtualClient], seed: int, events_dir: str | Path) -> None:
        self.fleet = fleet
        self.clients = tuple(clients)
        self.devices = tuple(c.device for c in self.clients)
        self.seed = seed
        self.events_dir = Path(events_dir)

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        client = self.clients[int(context.node_config["partition-id"])]
        context.node_config.update(client.node_config)
        if client.refusal:
            return _refusal(msg, client)
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        server_round = int(msg.content.config_records[CONFIG][SERVER_ROUND])
        draw = round_draw(client.device, self.seed, client.partition, server_round)
        event: dict[str, Any] = {
            "round": server_round,
            "partition": client.partition,
            "class": client.device.name,
            "profile": client.profile,
            "slowdown": draw.slowdown,
            "node": _ray_node(),
            "worker": os.getpid(),  # which ClientApp process (Ray actor) ran it: the rounds' timeline per core
            "niceness": os.nice(0),  # the worker's CPU priority: a niced ClientApp loses to every other job
            "started": time.time(),  # wall clock, comparable across the simulation's processes
        }
        if draw.dropped:
            self._write(event | {"outcome": "dropout"})
            return Message(
                Error(
                    DROPOUT_ERROR,
                    f"simulated dropout of {client.device.name} client {client.partition} in round {server_round}",
                ),
                reply_to=msg,
            )
        if LOCAL_TIMING in context.state:  # the last message's; a replayed release trains nothing
            del context.state[LOCAL_TIMING]
        started = time.perf_counter()
        reply = call_next(msg, context)
        event["host-s"] = time.perf_counter() - started
        if LOCAL_TIMING in context.state:  # the DP steps alone, as the ClientApp measured them on the node
            event["train-s"] = float(context.state.metric_records[LOCAL_TIMING]["steps-s"])
        event["peak-rss-bytes"] = _peak_rss_bytes()
        if reply.has_error():
            self._write(event | {"outcome": "error", "detail": reply.error.reason})
            return reply
        try:
            status = ClientStatus.from_record(reply.content.config_records[STATUS])
        except (KeyError, ProtocolError) as exc:  # the server rejects it as a protocol error
            self._write(event | {"outcome": "error", "detail": f"malformed reply: {exc}"})
            return reply
        event |= {"client-id": status.client_id, "epsilon": status.epsilon_spent}
        if not status.ok:
            self._write(event | {"outcome": f"refused-{status.reason}", "detail": status.detail})
            return reply
        if METRICS not in reply.content.metric_records:
            self._write(event | {"outcome": "error", "detail": "reply without metrics"})
            return reply
        event |= self._timing(client, msg, reply, draw.slowdown, event["host-s"])
        if event["deadline-s"] is not None and event["simulated-s"] > event["deadline-s"]:
            self._write(event | {"outcome": "straggler"})
            return Message(
                Error(
                    STRAGGLER_ERROR,
                    (
                        f"simulated straggler: {client.device.name} client {client.partition} needed "
                        f"{event['simulated-s']:.1f} s, past the round deadline of {event['deadline-s']:.1f} s"
                    ),
                ),
                reply_to=msg,
            )
        self._write(event | {"outcome": "ok"})
        return reply

    def _timing(
        self, client: VirtualClient, msg: Message, reply: Message, slowdown: float, host_s: float
    ) -> dict[str, Any]:
        """Host compute (the whole message, set-up included, measured here on the device's side:
        the reply carries no timing), bytes, the simulated duration and the round deadline."""
        metrics = reply.content.metric_records[METRICS]
        steps = Plan.from_record(msg.content.config_records[CONFIG]).config.local_steps
        down, up = float(metrics.get("bytes-down", 0.0)), float(metrics.get("bytes-up", 0.0))
        deadline = self.fleet.deadline_s(self.devices, host_s, down, up)
        return {
            "compute-host-s": host_s,
            "step-time-s": host_s / steps,
            "steps": steps,
            "bytes-down": down,
            "bytes-up": up,
            "simulated-s": client.device.duration_s(host_s, down, up, slowdown),
            "deadline-s": deadline if math.isfinite(deadline) else None,
        }

    def _write(self, event: dict[str, Any]) -> None:
        self.events_dir.mkdir(parents=True, exist_ok=True)
        with open(self.events_dir / f"client-{event['partition']}.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(event, sort_keys=True) + "\n")


def _refusal(msg: Message, client: VirtualClient) -> Message:
    """A ``device`` refusal for a simulated device that cannot train the plan at all."""
    plan = Plan.from_record(msg.content.config_records[CONFIG])
    data = Path(plan.config.data_root) / f"client-{client.partition}"
    status = ClientStatus(
        client_id=client_identity(data),
        outcome=REFUSED,
        reason="device",
        detail=f"simulated {client.device.name}: {client.refusal}",
        profile=client.profile,
    )
    return Message(RecordDict({STATUS: status.to_record()}), reply_to=msg)


def _ray_node() -> str | None:
    """The id of the Ray node running this ClientApp (None outside Ray): which machine trained."""
    try:
        import ray
    except ImportError:
        return None
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _peak_rss_bytes() -> int:
    """Peak resident set of this worker process so far (every client it has run included)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def fleet_client_app(mod: FleetMod, base: ClientApp) -> ClientApp:
    """A ClientApp that runs ``base`` (the fedvox ClientApp) for every message type, under ``mod``."""
    app = ClientApp(mods=[mod])

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return base(msg, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return base(msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return base(msg, context)

    return app


def read_events(events_dir: str | Path) -> list[dict[str, Any]]:
    """Every event of a run, sorted by round and partition (a torn last line is skipped)."""
    events = []
    for path in sorted(Path(events_dir).glob("client-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                log.warning("skipping a torn line in %s", path)
    return sorted(events, key=lambda e: (e["round"], e["partition"]))


__all__ = ["DROPOUT_ERROR", "STRAGGLER_ERROR", "FleetMod", "fleet_client_app", "read_events"]
