"""The simulation report: ``OUT/report.md``, ``OUT/plots/*.png`` and ``OUT/summary.json``.

Built from the files a simulation leaves on disk (``simulations.runner`` lists them), never from
memory, so ``fedvox-sim report OUT`` can rebuild it. For each run: utility (validation loss per
round of the global model on seen and unseen speakers, beside the local-only and centralised
baselines), privacy (epsilon per client and unit, from the ledgers themselves), the fleet
(devices, profiles, measured step times and memory, simulated against real round times, bytes,
dropouts, stragglers and rejects) and the synthesised sample. With several runs, a comparison
and a privacy-utility plot.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedvox.shared.atomic import atomic_write_text
from fedvox.shared.errors import ConfigError
from fedvox.shared.privacy.ledger import Ledger, ledger_file
from fedvox.shared.runconfig import RunConfig
from fedvox.shared.stages import recipe
from fedvox.simulations import plots
from fedvox.simulations.evaluation import mean_loss
from fedvox.simulations.fleet_app import read_events
from fedvox.simulations.quality import summary as quality_summary
from fedvox.simulations.quality.scoring import MIN_SPEAKERS

log = logging.getLogger(__name__)

MARKER = "simulation.json"


@dataclass
class RunData:
    """Everything on disk about one run."""

    name: str
    folder: Path
    spec: dict[str, Any]
    config: RunConfig
    completed: int
    calibration: dict[str, Any]  # the target epsilon and the noise multiplier that meets it (if any)
    timings: dict[str, float]
    spans: dict[str, list[float]]  # phase -> [start, end] in wall-clock seconds from the run's start
    peak_rss: int
    fleet: dict[str, Any]
    clients: list[dict[str, Any]]
    metrics: list[dict[str, Any]]
    events: list[dict[str, Any]]
    evaluation: dict[str, Any]
    utterance_epsilon: dict[int, dict[int, float]]  # partition -> round -> cumulative epsilon
    speaker_epsilon: dict[int, dict[int, float]]
    sample: dict[str, Any] | None
    quality: dict[str, Any] | None  # per-item speech-quality scores (quality.json), if measured
    host_load: dict[str, float]  # load average of this host during the run (measured)


def load_run(folder: Path) -> RunData:
    """Read one run folder (``simulations.runner`` layout)."""
    run = _json(folder / "run.json")
    fleet = _json(folder / "fleet.json")
    metrics_path = folder / "server" / "metrics.jsonl"
    metrics = (
        [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        if metrics_path.is_file()
        else []
    )
    partitions = {}
    for client in fleet["clients"]:
        identity = folder / "clients" / f"client-{client['partition']}" / "identity.json"
        if identity.is_file():
            partitions[json.loads(identity.read_text())["client_id"]] = client["partition"]
    sample_path = folder / "sample" / "sample.json"
    return RunData(
        name=folder.name,
        folder=folder,
        spec=run["spec"],
        config=RunConfig.from_flat(run["run-config"]),
        completed=run["completed-rounds"],
        calibration=run.get("calibration", {}),
        timings=run["timings-s"],
        spans=run.get("spans-s", {}),
        peak_rss=run["peak-rss-bytes"],
        fleet=fleet,
        clients=fleet["clients"],
        metrics=metrics,
        events=read_events(folder / "events"),
        evaluation=_json(folder / "evaluation.json"),
        utterance_epsilon=_epsilons(
            [folder / "clients" / f"client-{p}" for p in partitions.values()], "utterance", partitions
        ),
        speaker_epsilon=_epsilons([folder / "server"], "speaker", partitions),
        sample=_json(sample_path) if sample_path.is_file() else None,
        quality=_json(folder / "quality.json") if (folder / "quality.json").is_file() else None,
        host_load=run.get("host-load", {}),
    )


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path} ({exc}); run the simulation again to complete it") from None


def _epsilons(folders: Iterable[Path], unit: str, partitions: Mapping[str, int]) -> dict[int, dict[int, float]]:
    """Cumulative epsilon after each round, per partition, from the ledgers themselves."""
    out: dict[int, dict[int, float]] = defaultdict(dict)
    for folder in folders:
        if not ledger_file(folder).is_file():
            continue
        with Ledger(folder) as ledger:
            for row in ledger.rows(unit=unit):
                if row.client_id in partitions:
                    out[partitions[row.client_id]][row.round] = row.epsilon
    return dict(out)


# ---------------------------------------------------------------------- derived figures
def outcome(event: Mapping[str, Any]) -> str:
    """``ok``, ``straggler``, ``dropout``, ``refused`` or ``error``."""
    return "refused" if event["outcome"].startswith("refused") else event["outcome"]


def outcome_counts(events: Iterable[Mapping[str, Any]]) -> dict[int, Counter]:
    counts: dict[int, Counter] = defaultdict(Counter)
    for event in events:
        counts[event["round"]][outcome(event)] += 1
    return dict(counts)


def simulated_round_times(events: Iterable[Mapping[str, Any]], round_timeout: float) -> dict[int, float]:
    """The fleet's simulated time per round: the slowest accepted client, or the deadline when
    a selected client dropped out or straggled (the server waits for it until then; without a
    deadline, until the round timeout). Refusals and errors answer at once."""
    by_round: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for event in events:
        by_round[event["round"]].append(event)
    times = {}
    for r, round_events in by_round.items():
        deadlines = [e["deadline-s"] for e in round_events if e.get("deadline-s") is not None]
        deadline = max(deadlines) if deadlines else round_timeout
        accepted = [e["simulated-s"] for e in round_events if e["outcome"] == "ok"]
        late = any(outcome(e) in ("straggler", "dropout") for e in round_events)
        times[r] = max([*accepted, deadline if late else 0.0])
    return times


def carried(epsilons: Mapping[int, float], last_round: int) -> dict[int, float]:
    """Cumulative epsilon at every round from 0 to ``last_round`` (unchanged in rounds without a release)."""
    out, value = {}, 0.0
    for r in range(last_round + 1):
        value = epsilons.get(r, value)
        out[r] = value
    return out


def _per_round_bytes(events: Iterable[Mapping[str, Any]]) -> dict[int, tuple[float, float]]:
    sums: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for e in events:
        if "bytes-down" in e:
            s = sums[e["round"]]
            s[0] += e["bytes-down"]
            s[1] += e["bytes-up"]
            s[2] += 1
    return {r: (s[0] / s[2], s[1] / s[2]) for r, s in sums.items() if s[2]}


def _losses_by_round(rounds: Mapping[str, Any], group: str, speakers: list[str] | None = None) -> dict[int, float]:
    return {int(r): mean_loss(v.get(group, {}), speakers) for r, v in rounds.items()}


def loss_series(run: RunData) -> dict[str, dict[str, dict[int, float]]]:
    """``{group: {model: {round: mean loss over speakers}}}`` for the plot and tables.

    The local-only line on *seen* speakers is each baseline client's model on its own held-out
    utterances, so the global line beside it is taken over the same speakers.
    """
    evaluation = run.evaluation
    local = evaluation.get("local") or []
    local_speakers = [entry["speaker"] for entry in local]
    initial = evaluation["global"].get("0", {})
    curves: dict[str, dict[str, dict[int, float]]] = {"seen": {}, "unseen": {}}
    for group in curves:
        curves[group]["global (federated)"] = _losses_by_round(evaluation["global"], group)
        if local:
            if group == "seen" and set(local_speakers) != set(initial.get("seen", {})):
                curves[group]["global, on the local-baseline speakers"] = _losses_by_round(
                    evaluation["global"], group, local_speakers
                )
            per_round: dict[int, list[float]] = defaultdict(list)
            for entry in local:
                for r, losses in entry["losses"].items():
                    if (value := mean_loss(losses.get(group, {}))) is not None:
                        per_round[int(r)].append(value)
            start = mean_loss(initial.get(group, {}), local_speakers if group == "seen" else None)
            curves[group]["local only (same privacy)"] = {
                0: start,
                **{r: sum(v) / len(v) for r, v in per_round.items()},
            }
        if evaluation.get("central"):
            start = mean_loss(initial.get(group, {}))
            curves[group]["centralised, non-private"] = {
                0: start,
                **_losses_by_round(evaluation["central"]["losses"], group),
            }
    return {g: {k: v for k, v in c.items() if any(x is not None for x in v.values())} for g, c in curves.items()}


# ---------------------------------------------------------------------- markdown
def _table(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _mib(value: float | None) -> str:
    return "–" if not value else f"{value / 2**20:,.0f} MiB"


def run_section(run: RunData, out: Path) -> tuple[str, dict[str, Any]]:
    """The markdown section of one run and its summary numbers."""
    config, _spec = run.config, run.spec
    plot_dir = out / "plots"
    classes = {c["partition"]: c["class"] for c in run.clients}
    curves = loss_series(run)
    references = reference_levels(run)
    loss_png = plots.loss_curves(
        plot_dir / f"{run.name}-loss.png", curves, recipe(config.stage).headline_description, references
    )
    eps_png = plots.epsilon_curves(
        plot_dir / f"{run.name}-epsilon.png",
        {f"client-{p}": carried(v, run.completed) for p, v in run.utterance_epsilon.items()},
        {f"client-{p}": carried(v, run.completed) for p, v in run.speaker_epsilon.items()},
        {f"client-{p}": c for p, c in classes.items()},
        target=run.calibration.get("target-epsilon"),
        budget=config.client_budget_epsilon,
    )
    sim_times = simulated_round_times(run.events, config.round_timeout)
    real_times = {m["round"]: m["round-time-s"] for m in run.metrics}
    counts = outcome_counts(run.events)
    step_times: dict[str, list[float]] = defaultdict(list)
    for e in run.events:
        if "step-time-s" in e:
            step_times[e["class"]].append(e["step-time-s"])
    bytes_per_client = _per_round_bytes(run.events)
    system_png = (
        plots.system(
            plot_dir / f"{run.name}-system.png",
            step_times,
            {r: (sim_times.get(r, 0.0), real_times.get(r, 0.0)) for r in real_times},
            bytes_per_client,
            counts,
        )
        if run.events
        else None
    )

    seen, unseen = curves["seen"].get("global (federated)", {}), curves["unseen"].get("global (federated)", {})
    final = run.completed
    summary = {
        "rounds": final,
        "seen-loss": {"initial": seen.get(0), "final": seen.get(final)},
        "unseen-loss": {"initial": unseen.get(0), "final": unseen.get(final)},
        "epsilon-utterance-max": max((max(v.values()) for v in run.utterance_epsilon.values()), default=None),
        "epsilon-speaker-max": max((max(v.values()) for v in run.speaker_epsilon.values()), default=None),
        "simulated-time-s": sum(sim_times.values()),
        "federation-real-s": run.timings.get("federation"),
        "timings-s": run.timings,
        "peak-rss-bytes": run.peak_rss,
        "target-epsilon": run.calibration.get("target-epsilon"),
        "speech-quality": _quality_summary(run),
        "clients": client_accounts(run),
        "host-load": run.host_load,
        "baselines": {
            model: {g: curves[g].get(model, {}).get(final) for g in curves}
            for model in (
                "local only (same privacy)",
                "centralised, non-private",
                "global, on the local-baseline speakers",
            )
        },
    }

    parts = [f"## Run `{run.name}`", "", _overview(run), ""]
    if run.quality:
        parts += ["### Verdict", "", _verdict(run), ""]
    if run.completed < config.num_server_rounds:
        parts += [
            f"**The federation stopped after round {run.completed} of {config.num_server_rounds}** "
            "(see the log: usually every client's privacy budget was spent, or too few clients were "
            "eligible).",
            "",
        ]
    parts += [
        "### Utility",
        "",
        f"![validation loss]({loss_png.relative_to(out)})",
        "",
        _utility_table(curves, final, references),
        "",
        _utility_notes(run),
        "",
    ]
    if run.quality:
        parts += ["### Speech quality", "", _quality_section(run, out), ""]
    parts += [
        "### Privacy",
        "",
        f"![epsilon]({eps_png.relative_to(out)})",
        "",
        _privacy_text(run),
        "",
        _privacy_table(run, classes),
        "",
    ]
    parts += ["### Fleet and system", ""]
    if system_png:
        parts += [f"![system]({system_png.relative_to(out)})", ""]
    parts += [
        _fleet_text(run),
        "",
        _class_table(run, step_times),
        "",
        _round_table(run, sim_times, real_times, counts, bytes_per_client),
        "",
    ]
    parts += [_timing_text(run, sim_times), ""]
    if run.sample:
        parts += ["### Sample", "", _sample_text(run, out), ""]
    return "\n".join(parts), summary


def _overview(run: RunData) -> str:
    c, spec = run.config, run.spec
    cal = run.calibration
    dp = (
        f"target utterance-level epsilon {cal['target-epsilon']:g} per client over the run: noise multiplier "
        f"{c.dp.noise_multiplier:.4g}, calibrated once for the client with the fewest training utterances "
        f"({cal['smallest-client']}, sample rate {cal['sample-rate']:.3g}, {cal['steps']} steps)"
        if cal
        else f"noise multiplier {c.dp.noise_multiplier:g}"
    )
    speaker = (
        f"speaker-level DP-FedAvg on (noise multiplier {c.speaker_dp.noise_multiplier:g}, clip "
        f"{c.speaker_dp.clip_norm:g})"
        if c.speaker_dp.enabled
        else "speaker-level DP off"
    )
    step = f" with server step {c.server_step:g}" if c.server_step != 1 else ""
    return (
        f"{len(run.clients)} clients ({run.fleet['fleet']['name']} fleet, seed {spec['seed']}), "
        f"{c.num_server_rounds} rounds of {c.stage} `{c.model_config}` ({c.subset}"
        f"{f' r={c.lora_rank}' if c.subset == 'lora' else ''}), up to "
        f"{c.clients_per_round or len(run.clients)} clients per round, {c.local_steps} local DP-SGD steps of "
        f"logical batch {c.logical_batch}, learning rate {c.learning_rate:g}, {c.aggregation}{step}; DP-SGD: {dp}, "
        f"clip {c.dp.clip_norm:g}, delta {c.dp.delta:g}, budget {c.client_budget_epsilon:g}; {speaker}."
    )


def reference_levels(run: RunData) -> dict[str, dict[str, float | None]]:
    """Loss levels a model must beat: ``{name: {group: loss}}`` (s1: uniform and unigram)."""
    references = run.evaluation.get("references") or {}
    out: dict[str, dict[str, float | None]] = {}
    if "uniform" in references:
        out["uniform guess"] = {"seen": references["uniform"], "unseen": references["uniform"]}
    if references.get("unigram"):
        out["unigram (training code frequencies)"] = dict(references["unigram"])
    return out


def _utility_table(curves, final: int, references: Mapping[str, Mapping[str, float | None]]) -> str:
    rows = []
    for model in dict.fromkeys(m for g in curves.values() for m in g):
        seen, unseen = curves["seen"].get(model, {}), curves["unseen"].get(model, {})
        rows.append([model, seen.get(0), seen.get(final), unseen.get(0), unseen.get(final)])
    for name, levels in references.items():
        rows.append([f"*reference: {name}*", None, levels.get("seen"), None, levels.get("unseen")])
    return _table(["model", "seen, round 0", f"seen, round {final}", "unseen, round 0", f"unseen, round {final}"], rows)


def _utility_notes(run: RunData) -> str:
    local = run.evaluation.get("local") or []
    central = run.evaluation.get("central")
    notes = [
        f"Loss: {recipe(run.config.stage).headline_description} on held-out utterances, the mean over speakers (each "
        "counts "
        "once); lower is better. *Seen* speakers are the clients (utterances they never trained on), *unseen* "
        "speakers took no part. Round 0 is the initial model.",
    ]
    if local:
        notes.append(
            f"*Local only*: {len(local)} client(s) ({', '.join('client-' + str(e['partition']) for e in local)}) "
            "each trained alone with the same DP-SGD (same target epsilon, sample rate and device profile) "
            f"for {run.config.local_steps} steps per round; on seen speakers each is scored on its own voice, "
            "next to the global model on the same speakers."
        )
    if central:
        notes.append(
            f"*Centralised, non-private*: one model on the clients' {central['examples']} training utterances pooled, "
            f"{central['steps']} AdamW steps of {central['examples_per_step']} examples (as many as a round's "
            "participants process together), no clipping and no noise."
        )
    reused = [f"client-{e['partition']}" for e in local if e.get("reused")] + (
        ["the centralised model"] if central and central.get("reused") else []
    )
    if reused:
        notes.append(
            f"**Reused** from an earlier run in this folder with the same features, base, settings, seed and code "
            f"(`reuse/`, not trained again): the baseline(s) of {', '.join(reused)}."
        )
    return "\n".join(f"- {n}" for n in notes)


def _privacy_text(run: RunData) -> str:
    c = run.config
    text = [
        "- *Utterance level* (every client, Opacus DP-SGD): protects each recording within a client's data; "
        "epsilon is read from each client's own ledger "
        f"(`runs/{run.name}/clients/client-<p>/privacy_ledger.sqlite`).",
    ]
    if c.speaker_dp.enabled:
        text.append(
            "- *Speaker level* (server, DP-FedAvg): protects whether a speaker took part at all; every eligible "
            f"speaker is charged every round (`runs/{run.name}/server/privacy_ledger.sqlite`). With this few "
            "clients per round its noise is large against the mean update, and epsilon is high: it needs "
            "hundreds of clients per round to be useful."
        )
    else:
        text.append("- *Speaker level*: off (`--speaker-dp` turns on DP-FedAvg on the server).")
    text.append("- Audit every ledger with `fedvox-audit` (recomputes each epsilon from the recorded mechanisms).")
    return "\n".join(text)


def client_accounts(run: RunData) -> dict[int, dict[str, Any]]:
    """Per client: rounds trained, updates the server used, epsilon spent, and epsilon spent on
    rounds whose update was not used (a straggler's or a rejected update: charged, no contribution)."""
    used: dict[str, set[int]] = defaultdict(set)
    for m in run.metrics:
        for entry in m.get("clients", []):
            if entry.get("accepted"):
                used[entry["client-id"]].add(m["round"])
    ids = {e["partition"]: e["client-id"] for e in run.events if "client-id" in e}
    accounts = {}
    for client in run.clients:
        p = client["partition"]
        cumulative = run.utterance_epsilon.get(p, {})
        rounds_used = used.get(ids.get(p, ""), set())
        wasted, previous = 0.0, 0.0
        for r in sorted(cumulative):
            if r not in rounds_used:
                wasted += cumulative[r] - previous
            previous = cumulative[r]
        outcomes = Counter(outcome(e) for e in run.events if e["partition"] == p)
        accounts[p] = {
            "class": client["class"],
            "trained": len(cumulative),
            "accepted": len(rounds_used),
            "epsilon": max(cumulative.values()) if cumulative else 0.0,
            "epsilon-unused": wasted,
            "speaker-epsilon": max(run.speaker_epsilon[p].values()) if run.speaker_epsilon.get(p) else None,
            "outcomes": dict(outcomes),
        }
    return accounts


def _privacy_table(run: RunData, classes: Mapping[int, str]) -> str:
    accounts = client_accounts(run)
    rows = [
        [
            f"client-{p}",
            a["class"],
            a["trained"],
            a["accepted"],
            a["epsilon"],
            a["epsilon-unused"],
            a["speaker-epsilon"],
            ", ".join(f"{k} {v}" for k, v in sorted(a["outcomes"].items())) or "never selected",
        ]
        for p, a in accounts.items()
    ]
    wasted = [p for p, a in accounts.items() if a["epsilon-unused"] > 0]
    note = (
        f"\n\n**{len(wasted)} client(s) spent privacy budget on updates the server never used** "
        f"({', '.join(f'client-{p}' for p in wasted)}): stragglers past the deadline or rejected updates. "
        f"A client selected {run.config.max_misses} rounds in a row without a usable update is benched "
        "(run-config `max-misses`; 0 never benches)."
        if wasted
        else "\n\nEvery client's epsilon was spent on updates the server used."
    )
    return (
        _table(
            [
                "client",
                "device class",
                "rounds trained (charged)",
                "updates used",
                "utterance epsilon",
                "epsilon without contribution",
                "speaker epsilon",
                "outcomes",
            ],
            rows,
        )
        + note
    )


def _fleet_text(run: RunData) -> str:
    fleet = run.fleet["fleet"]
    host = run.fleet["host"]
    deadline = (
        f"rounds close at {fleet['deadline-factor']:g}x the median client's time for the same work"
        if fleet["deadline-factor"]
        else "no round deadline"
    )
    facts = host["facts"]
    nodes = {e["node"] for e in run.events if e.get("node")}
    cluster = (
        f" The clients ran on the Ray cluster at `{host['ray-address']}`, on {len(nodes)} node(s)."
        if host.get("ray-address")
        else ""
    )
    return (
        f"Fleet `{fleet['name']}`: {fleet['description'] or 'custom'}; {deadline}.{cluster} "
        "Each client runs on this host "
        f"({facts['cpu_name'] or facts['device_name']}, {facts['physical_cores']} cores; {host['workers']} "
        f"ClientApps at a time with {host['threads']} torch thread(s) each) with its simulated device's "
        "physical batch and checkpointing, and its precision where the host has it natively. Simulated times "
        "divide the measured compute by the device's assumed speed (relative to this host) and add the "
        "transfer time of the measured bytes over the device's assumed link: they are a model, the real "
        "times beside them are measurements."
    )


def _class_table(run: RunData, step_times: Mapping[str, list[float]]) -> str:
    by_class: dict[str, list[dict]] = defaultdict(list)
    for client in run.clients:
        by_class[client["class"]].append(client)
    sims: dict[str, list[float]] = defaultdict(list)
    rss: dict[str, int] = defaultdict(int)
    counts: dict[str, Counter] = defaultdict(Counter)
    for e in run.events:
        counts[e["class"]][outcome(e)] += 1
        if "simulated-s" in e:
            sims[e["class"]].append(e["simulated-s"])
        rss[e["class"]] = max(rss[e["class"]], e.get("peak-rss-bytes", 0))
    profiles, measured = [], []
    for name, members in sorted(by_class.items()):
        c = members[0]
        ran_as = c["host"].get("precision", "–") + (" *" if c["host-note"] else "")
        profiles.append(
            [
                name,
                c["device"],
                len(members),
                c["speed"],
                c["dropout"],
                c["profile"],
                c["physical-batch"],
                c["precision"],
                ran_as,
                "on" if c["checkpointing"] else "off",
                _mib(c["planned-memory-bytes"]),
            ]
        )
        measured.append(
            [
                name,
                statistics.median(step_times[name]) if step_times.get(name) else None,
                _mib(rss.get(name)),
                statistics.median(sims[name]) if sims.get(name) else None,
                ", ".join(f"{k} {v}" for k, v in sorted(counts[name].items())) or "never selected",
            ]
        )
    notes = sorted({f"{c['class']}: {c['host-note']}" for c in run.clients if c["host-note"]})
    return "\n".join(
        [
            _table(
                [
                    "class",
                    "device",
                    "clients",
                    "speed",
                    "dropout p",
                    "simulated profile",
                    "physical batch",
                    "precision",
                    "ran here as",
                    "checkpointing",
                    "planned memory",
                ],
                profiles,
            ),
            "",
            *(f"\\* {note}" + "  " for note in notes),
            "",
            _table(
                [
                    "class",
                    "DP step s on this host (median)",
                    "worker peak RSS",
                    "simulated round s (median)",
                    "outcomes",
                ],
                measured,
            ),
            "",
            "*Planned memory* is the profile's memory model on the simulated device. *Worker peak RSS* is measured: "
            "the peak resident memory of the Ray worker process that ran those clients (torch and the runtime "
            "included, shared by every client that worker ran).",
        ]
    )


def _round_table(run: RunData, sim_times, real_times, counts, bytes_per_client) -> str:
    metrics = {m["round"]: m for m in run.metrics}
    seen = loss_series(run)["seen"].get("global (federated)", {})
    unseen = loss_series(run)["unseen"].get("global (federated)", {})
    rows = []
    for r in sorted(metrics):
        m, c = metrics[r], counts.get(r, Counter())
        down, up = bytes_per_client.get(r, (None, None))
        rejects = ", ".join(f"{k} {v}" for k, v in sorted(m.get("rejects", {}).items())) or "none"
        rows.append(
            [
                r,
                m.get("selected"),
                c.get("ok", 0),
                c.get("dropout", 0),
                c.get("straggler", 0),
                c.get("refused", 0),
                rejects,
                sim_times.get(r),
                real_times.get(r),
                None if down is None else down / 1e3,
                None if up is None else up / 1e3,
                seen.get(r),
                unseen.get(r),
                m.get("epsilon-utterance-max"),
                m.get("epsilon-speaker-max"),
            ]
        )
    return _table(
        [
            "round",
            "selected",
            "accepted",
            "dropouts",
            "stragglers",
            "refused",
            "server rejects",
            "simulated s",
            "real s",
            "kB down/client",
            "kB up/client",
            "seen loss",
            "unseen loss",
            "utterance eps max",
            "speaker eps max",
        ],
        rows,
    ) + (
        "\n\nA dropped client answers at once without training (nothing charged); a straggler trained and was "
        "charged, but its update came after the deadline and was not used. The server counts both as "
        "`error` rejects; rounds go on with the other clients. Round 1's real time includes starting the Ray "
        "workers and every client's first status query."
    )


UNINFORMATIVE_WER = 0.8
"""The recordings' own WER from which WER says nothing about the models: pocketsphinx scores
espeak-ng's formant voices 0.8-1.0 on their own recordings (docs/simulation.md)."""

PHASE_NAMES = {"speech-quality": "speech-quality scoring"}


def _timing_text(run: RunData, sim_times: Mapping[int, float]) -> str:
    t = run.timings
    if run.spans:
        phases = ", ".join(
            f"{PHASE_NAMES.get(k, k)} {start:.0f}-{end:.0f} s"
            for k, (start, end) in sorted(run.spans.items(), key=lambda kv: kv[1])
        )
        measured = (
            f"**Measured on this host**: the run took **{t['wall']:.0f} s** of wall clock: the federation "
            f"{t.get('federation', 0.0):.0f} s, then {t['after-federation']:.0f} s waiting for the work beside it "
            f"and after it. Phases, from the run's start: {phases} (the baselines and the speech-quality scoring "
            "run in a pool of processes beside the federation, sharing the cores with it; "
            "bench/baselines_cost.py measures what the baselines cost the run); peak resident memory of all "
            f"processes {_mib(run.peak_rss)}"
        )
    elif t:  # a run folder from before the phases were timed as spans
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in t.items())
        measured = (
            f"**Measured on this host**: wall clock {phases} (peak resident memory of all processes "
            f"{_mib(run.peak_rss)})"
        )
    else:
        measured = "**Measured on this host**: no timings"
    load = run.host_load
    if load:
        measured += (
            f"; load average {load['mean']:.1f} (max {load['max']:.1f}) on {load['cores']} cores, "
            f"of which this run used at most {load['own-max']:.1f} busy cores: "
            + (
                "the host was shared, so measured times are inflated by other work."
                if load["mean"] > load["cores"]
                else "the host was not overloaded."
            )
        )
    return (
        measured + f"\n\n**Simulated**: the fleet would have needed {sum(sim_times.values()):.1f} s for its "
        f"{len(sim_times)} rounds of training (each device's assumed speed applied to the compute measured "
        "here, plus its link's transfer time: a model, which inherits any slowdown of this host)."
    )


def _sample_text(run: RunData, out: Path) -> str:
    s = run.sample
    folder = (run.folder / "sample").relative_to(out)
    text = (
        f'[`{folder}/{s["wav"]}`]({folder}/{s["wav"]}) ({s["seconds"]:.1f} s): "{s["text"]}" ({s["language"]}) '
        f"in the voice of {s['speaker']}'s held-out recording `{Path(s['reference']).name}`, by the global "
        f"{s['trained-stage']} model of round {s['round']} with "
        f"**{s.get('partner', 'a fresh, untrained ' + s['fresh-stage'] + ' model of the same seed')}** "
        f"(this run trained {s['trained-stage']} only)."
    )
    check = s.get("speech-check")
    if check:
        verdict = (
            "**It is speech by measurement**"
            if check["is-speech"]
            else f"**It is not speech by measurement**: {check['reason']}"
        )
        text += (
            f" {verdict} (silero-vad detects speech over {check['speech_fraction']:.0%} of its length, "
            f"level {check['rms_dbfs']:.0f} dBFS, {check['distinct_values']:,} distinct 16-bit values)."
        )
    if "differs-from-base" in s:
        text += (
            " It differs from the base model's sample of the same sentence and seed: training changed what "
            "the model says."
            if s["differs-from-base"]
            else " **It is identical to the base model's sample** of the same sentence and seed: training did not "
            "change it."
        )
    return text + f"\n\n![sample spectrogram]({folder}/{s['png']})"


# ---------------------------------------------------------------------- speech quality
def _estimate(e: Any) -> str:
    return "–" if e is None else f"{e.mean:.3g} [{e.low:.3g}, {e.high:.3g}]"


def _quality_summary(run: RunData) -> dict[str, Any] | None:
    if not run.quality:
        return None
    groups = quality_summary.speaker_groups(run.quality)
    return {
        "levels": {
            g: {
                model: {m: e.to_dict() if e else None for m, e in metrics.items()}
                for model, metrics in quality_summary.levels(run.quality, speakers).items()
            }
            for g, speakers in groups.items()
            if speakers
        },
        "comparisons": [
            {
                "first": c.first,
                "second": c.second,
                "group": c.group,
                **{m: e.to_dict() if e else None for m, e in c.differences.items()},
            }
            for c in quality_summary.comparisons(run.quality)
        ],
    }


def _verdict(run: RunData) -> str:
    found = quality_summary.comparisons(run.quality)
    target = run.calibration.get("target-epsilon")
    context = f" at epsilon {target:g}" if target else ""
    at = [context if "local only" in (c.first, c.second) else "" for c in found]  # epsilon where it differs
    lines = ["- " + c.sentence("similarity", a) for c, a in zip(found, at, strict=True)]
    # The other metrics: the headline comparison's WER and MCD whatever they say, and every
    # difference that was measured (a spectral gain over the base, say) whichever comparison it is in.
    for n, c in enumerate(found):
        for metric in ("wer", "mcd", "speech"):
            wanted = (n == 0 and metric != "speech") or c.called(metric)
            if wanted and (sentence := c.sentence(metric, at[n])):
                lines.append("- " + sentence)
    groups = quality_summary.speaker_groups(run.quality)
    levels = quality_summary.levels(run.quality, groups["clients"])
    reference = [
        f"{quality_summary.LABELS[m]} {levels[m]['similarity'].mean:.3g}"
        for m in ("recordings", "base")
        if m in levels and levels[m].get("similarity")
    ]
    if reference:
        lines.append("- Reference levels of speaker similarity on the clients: " + ", ".join(reference) + ".")
    ceiling = levels.get("recordings", {}).get("wer")
    if ceiling is not None and ceiling.mean >= UNINFORMATIVE_WER:
        lines.append(
            f"- WER cannot separate the models here: the recogniser misses most words of the recordings "
            f"themselves (WER {ceiling.mean:.2f}), as on espeak-ng's formant voices (docs/simulation.md)."
        )
    lines.append(
        "\nIntervals: 95 % percentile bootstrap over speakers (each speaker's sentences together); a "
        f"difference is called only when its interval excludes zero, on at least {MIN_SPEAKERS} speakers. "
        "Metrics and their limits: "
        "docs/simulation.md."
    )
    return "\n".join(lines)


def _quality_section(run: RunData, out: Path) -> str:
    quality = run.quality
    groups = {g: s for g, s in quality_summary.speaker_groups(quality).items() if s}
    parts = [
        f"Each model said {quality['items'] and max(i['index'] for i in quality['items'].values()) + 1} held-out "
        "sentence(s) per speaker, prompted with another held-out recording of that speaker; each utterance is "
        "scored against the speaker's own recordings: *speaker similarity* (cosine of GE2E d-vectors, resemblyzer's "
        "encoder; higher is better), *WER* (pocketsphinx, English sentences only; lower is better), *MCD* "
        "(mel-cepstral distortion in dB after DTW against the recording of the same sentence; lower is better) and "
        "*speech fraction* (silero-vad). Each cell: mean over speakers [95 % bootstrap interval].",
        "",
    ]
    everyone_alone = groups.get(quality_summary.ALONE) == groups.get("clients")
    series = {}
    for group, speakers in groups.items():
        levels = quality_summary.levels(quality, speakers)
        if not levels or (group == quality_summary.ALONE and everyone_alone):
            continue  # the clients' table says it
        title = group.capitalize() + (", each also trained alone" if group == "clients" and everyone_alone else "")
        rows = [
            [quality_summary.LABELS.get(model, model), *(_estimate(metrics[m]) for m in quality_summary.METRIC_NAMES)]
            for model, metrics in levels.items()
        ]
        parts += [
            f"**{title}** ({len(speakers)}):",
            "",
            _table(["model", *quality_summary.METRIC_NAMES.values()], rows),
            "",
        ]
        series[group] = levels
    found = quality_summary.comparisons(quality)
    if found:
        rows = [
            [
                f"{quality_summary.LABELS[c.first]} − {quality_summary.LABELS[c.second]}",
                c.group,
                *(_estimate(c.differences.get(m)) for m in quality_summary.METRIC_NAMES),
            ]
            for c in found
        ]
        parts += [
            "Paired differences (same items):",
            "",
            _table(["comparison", "speakers", *quality_summary.METRIC_NAMES.values()], rows),
            "",
        ]
    parts += [_per_speaker_table(quality), ""]
    if series:
        png = plots.speech_quality(
            out / "plots" / f"{run.name}-speech-quality.png",
            series,
            quality_summary.METRIC_NAMES,
            quality_summary.LABELS,
        )
        parts += [f"![speech quality]({png.relative_to(out)})", ""]
    parts.append(
        f"Scoring took {quality['total-seconds']:.0f} s of wall clock, one job per model in the pool beside the "
        "baselines (each job's own time: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in quality["seconds"].items())
        + ")."
        + (
            f" Reused from an earlier run with the same model, sentences and seed: {', '.join(quality['reused'])}."
            if quality.get("reused")
            else ""
        )
    )
    return "\n".join(parts)


def _per_speaker_table(quality: Mapping[str, Any]) -> str:
    """Speaker similarity per speaker and model (mean over its sentences)."""
    models = list(quality["scores"])
    by_speaker: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for model, scores in quality["scores"].items():
        for key, values in scores.items():
            if values.get("similarity") is not None:
                by_speaker[quality["items"][key]["speaker"]][model].append(values["similarity"])
    training = quality.get("training-utterances", {})
    rows = []
    for speaker in [*quality["clients"], *quality["unseen"]]:
        cells = by_speaker.get(speaker, {})
        rows.append(
            [
                speaker,
                training.get(speaker, "unseen" if speaker in quality["unseen"] else None),
                *(statistics.mean(cells[m]) if cells.get(m) else None for m in models),
            ]
        )
    return "Speaker similarity per speaker:\n\n" + _table(
        ["speaker", "training utterances", *(quality_summary.LABELS.get(m, m) for m in models)], rows
    )


def comparison_section(runs: list[RunData], summaries: Mapping[str, dict], out: Path) -> str:
    rows = []
    points: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for run in runs:
        s = summaries[run.name]
        eps = s["epsilon-utterance-max"]
        rows.append(
            [
                run.name,
                s["target-epsilon"],
                eps,
                s["epsilon-speaker-max"],
                s["seen-loss"]["final"],
                s["unseen-loss"]["final"],
                s["baselines"]["local only (same privacy)"]["seen"],
                s["simulated-time-s"],
                s["federation-real-s"],
            ]
        )
        if eps:
            points["global, seen speakers"].append((eps, s["seen-loss"]["final"]))
            points["global, unseen speakers"].append((eps, s["unseen-loss"]["final"]))
            local = s["baselines"]["local only (same privacy)"]["seen"]
            if local is not None:
                points["local only, own voice"].append((eps, local))
    central = [summaries[r.name]["baselines"]["centralised, non-private"]["seen"] for r in runs]
    central = [value for value in central if value is not None]
    references = {"centralised, non-private (seen)": central[0]} if central else {}
    parts = [
        "## Comparison",
        "",
        _table(
            [
                "run",
                "target epsilon",
                "utterance eps (max)",
                "speaker eps (max)",
                "final seen loss",
                "final unseen loss",
                "local only (own voice)",
                "simulated s",
                "federation real s",
            ],
            rows,
        ),
    ]
    if len({s["target-epsilon"] for s in summaries.values()}) > 1:
        png = plots.privacy_utility(
            out / "plots" / "privacy-utility.png", points, references, recipe(runs[0].config.stage).headline_description
        )
        parts += ["", f"![privacy-utility]({png.relative_to(out)})"]
    return "\n".join(parts)


def write_report(out: str | Path) -> Path:
    """Write ``out/report.md`` (and plots, ``summary.json``) from the simulation folder ``out``."""
    out = Path(out)
    marker = _json(out / MARKER)
    names = list(marker["scenario"]["runs"])
    runs = [load_run(out / "runs" / name) for name in names if (out / "runs" / name / "run.json").is_file()]
    if not runs:
        raise ConfigError(f"{out} holds no finished run; run `fedvox-sim run --out {out}` to make one")
    sections, summaries = [], {}
    for run in runs:
        section, summaries[run.name] = run_section(run, out)
        sections.append(section)
    scenario = marker["scenario"]
    speakers = marker["speakers"]
    prep = marker.get("preparation", {})
    head = [
        f"# fedvox simulation: {scenario['name']}",
        "",
        *([scenario["description"], ""] if scenario["description"] else []),
        f"{speakers['n_speakers']} synthetic speakers as clients ({speakers['language']}, {speakers['utterances']} "
        f"training and {speakers['heldout_utterances']} held-out utterances each, {speakers['unseen_speakers']} "
        f"unseen speakers, seed {speakers['seed']}) from `{marker['speakers-root']}`. Preparation: "
        + (", ".join(f"{k} {v:.1f} s" for k, v in prep.get("timings-s", {}).items()) or "reused")
        + f". {len(runs)} run(s): "
        + ", ".join(f"[`{r.name}`](#run-{r.name.lower()})" for r in runs)
        + ".",
        "",
    ]
    body = head + ([comparison_section(runs, summaries, out), ""] if len(runs) > 1 else []) + sections
    body += ["## Files", "", FILES_TEXT]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(body) + "\n")
    atomic_write_text(out / "summary.json", json.dumps(summaries, indent=1, default=_plain) + "\n")
    log.info("report: %s", path)
    return path


def _plain(value: Any) -> Any:
    return str(value)


FILES_TEXT = """\
- `runs/<run>/server/`: global checkpoints of every round (`checkpoints/round-NNNNN.*`), the speaker-level
  ledger (with `--speaker-dp`), `metrics.jsonl` and TensorBoard logs, the exported best model (`export/`);
  `fedvox-server status` reads it.
- `runs/<run>/clients/client-<p>/privacy_ledger.sqlite`: each client's utterance-level ledger;
  `fedvox-audit runs/<run>/clients/* [runs/<run>/server]` recomputes every epsilon, and with
  `--heads runs/<run>/server` holds each client's ledger against the heads it signed in its replies.
- `runs/<run>/events/client-<p>.jsonl`: what each client did in each round (outcome, measured and simulated
  times, bytes, memory).
- `runs/<run>/fleet.json`: each client's device, simulated profile and how this host ran it.
- `runs/<run>/evaluation.json`, `summary.json`: the numbers behind the plots.
- `runs/<run>/baselines/`: the local-only runs (`fedvox-client` layout) and the centralised one.
- `reuse/`: trained baselines and models' scores that later runs in this folder reuse when
  everything they depend on is the same (`simulations/reuse.py`); delete it to train them again.
"""


__all__ = ["RunData", "load_run", "loss_series", "outcome_counts", "simulated_round_times", "write_report"]
