"""``fedvox-sim run``: speakers -> features -> a Flower simulation per run -> baselines -> report.

Every run of a scenario goes through Flower's simulation engine in this process
(``flwr.simulation.run_simulation`` with the fedvox ServerApp and the fedvox ClientApp under the
fleet's mod), then is scored and compared. Everything a report needs is written to disk first,
so the report can be rebuilt from the folder alone. Layout of ``OUT``::

    simulation.json                     what this folder holds (speakers config, scenario)
    report.md, plots/                   the report
    speakers/                           generated speakers (unless --speakers-dir)
    features/                           prepared caches, never trained on (simulations.features)
    runs/<run>/fleet.json               each client's device, profile and host settings
    runs/<run>/run.json                 the run's options, run configuration, timings, memory
    runs/<run>/clients/client-<p>/      the client's data folder: features, identity, utterance ledger
    runs/<run>/server/                  checkpoints, speaker-level ledger, metrics.jsonl, export
    runs/<run>/events/client-<p>.jsonl  what each client did in each round (simulations.fleet_app)
    runs/<run>/evaluation.json          per-round losses of the global model and the baselines
    runs/<run>/baselines/               local-only and centralised training folders
    runs/<run>/sample/                  the synthesised sample (WAV, PNG)
    reuse/<key>/                        baselines and scores later runs reuse (simulations.reuse)

Running the same command again on the same ``OUT`` resumes: generated speakers and prepared
features are reused, a finished federation is not run again, an interrupted one continues from
its last committed round (``server.run``), and the report is rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from fedvox.client.data.split import HELD_OUT_FRACTION
from fedvox.client.device import DeviceFacts, probe
from fedvox.client.identity import client_identity
from fedvox.client.owner import owner_budget
from fedvox.client.stages import datasets
from fedvox.server.checkpoints import RoundCheckpoints
from fedvox.shared.atomic import atomic_write_text
from fedvox.shared.cli import progress, set_offline_env
from fedvox.shared.errors import ConfigError, FederationError
from fedvox.shared.models.config import s1_config
from fedvox.shared.privacy.accounting import calibrate_noise_multiplier
from fedvox.shared.privacy.ledger import Ledger
from fedvox.shared.runconfig import RunConfig
from fedvox.simulations import reuse
from fedvox.simulations.baselines import CENTRAL_STATE, CentralJob, LocalJob, central_baseline, local_baseline
from fedvox.simulations.evaluation import Evaluator, reference_losses
from fedvox.simulations.features import SpeakerData, clone_cache, heldout_by_speaker, prepare_speakers, read_manifest
from fedvox.simulations.fleets import VirtualClient, load_fleet, plan_clients
from fedvox.simulations.quality.compare import Contender
from fedvox.simulations.quality.scoring import TestItem, test_items
from fedvox.simulations.scenario import RunSpec, Scenario
from fedvox.simulations.sidework import SideWork, Spans
from fedvox.simulations.speakers import SpeakersConfig, generate_speakers

log = logging.getLogger(__name__)

GENERATOR = "fedvox-sim run"
MARKER = "simulation.json"
ROUND_TIMEOUT_S = 1800.0
"""Wall-clock limit of one round in simulation (clients never go silent: dropouts reply at once)."""
LEARNING_RATE = 0.005
"""The simulation's default client learning rate, for LoRA (rank 8) on the shipped base. Measured
on one client's local DP fine-tuning (15 steps, epsilon 8, one seed; docs/simulation.md): the
held-out loss fell by 0.012 nats/token at 0.005, 0.007 at 0.003, 0.006 at 0.01 (noisy), and 0.03
(the old default, chosen for seeded random tiny models) raised it from 4.20 to 6.30."""
SERVER_STEP = 2.0
"""The simulation's default ``server-step``: the global model moves twice the clients' mean update.
Measured on the default run (docs/simulation.md): the seen held-out loss fell 0.003-0.004 in 4
runs at 1, 0.005-0.012 in 3 runs at 2, 0.007-0.015 in 3 runs at 3, and rose 0.45 at 8, where the
noise it also scales takes over."""


@dataclass(frozen=True)
class Host:
    """The machine running the simulation and how the ClientApps share it."""

    facts: DeviceFacts
    workers: int  # ClientApps running at once (Ray actors on this machine)
    ray_address: str | None = None  # an existing Ray cluster instead of a local one

    @property
    def threads(self) -> int:
        """torch threads (and Ray CPUs) per ClientApp: the cores shared out, at least one."""
        return max(1, self.facts.physical_cores // self.workers)


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def simulate(
    scenario: Scenario,
    out: str | Path,
    *,
    speakers_dir: str | Path | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
) -> Path:
    """Run ``scenario`` into ``out``; returns the report's path."""
    from fedvox.simulations.report import write_report

    set_offline_env()
    out = Path(out).absolute()
    speakers_root = Path(speakers_dir).absolute() if speakers_dir else out / "speakers"
    speakers = scenario.speakers
    if speakers_dir is not None:
        manifest = read_manifest(speakers_root)
        speakers = SpeakersConfig(**{**manifest["config"], "n_speakers": speakers.n_speakers})
    _claim(out, scenario, speakers, speakers_root)
    memory = PeakMemory()
    timings: dict[str, float] = {}
    host = Host(probe(), workers or usable_cpus(), ray_address)
    # Torch work in this process (the server's aggregation, scoring, the sample) gets the same
    # share of the cores as one ClientApp: a scoring pass with 2 threads beside a busy core took
    # 3x as long as with 1 here.
    torch.set_num_threads(host.threads)
    with memory:
        if speakers_dir is None:
            _timed(timings, "speakers", lambda: generate_or_reuse_speakers(speakers_root, speakers))
        symbols = s1_config(_model_config(scenario)).symbols_version
        data = _timed(
            timings, "features", lambda: prepare_speakers(speakers_root, speakers.n_speakers, out / "features", symbols)
        )
        for spec in scenario.runs:
            run_one(spec, data, out / "runs" / spec.name, host)
    document = json.loads((out / MARKER).read_text())
    document["preparation"] = {"timings-s": timings, "peak-rss-bytes": memory.peak}
    atomic_write_text(out / MARKER, json.dumps(document, indent=1) + "\n")
    return write_report(out)


def _model_config(scenario: Scenario) -> str:
    names = {RunConfig().with_overrides(dict(run.config)).model_config for run in scenario.runs}
    if len(names) > 1:
        raise ConfigError(f"runs of one scenario must share a model config (features use its symbols); got {names}")
    return names.pop()


def _claim(out: Path, scenario: Scenario, speakers: SpeakersConfig, speakers_root: Path) -> None:
    """Make ``out`` ours: new, empty, or an earlier simulation of the same speakers."""
    wanted = {
        "generator": GENERATOR,
        "speakers-root": str(speakers_root),
        "speakers": {k: v for k, v in asdict(speakers).items() if k != "workers"},
    }
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder (new or empty)")
    if out.is_dir() and any(out.iterdir()):
        try:
            previous = json.loads((out / MARKER).read_text())
        except (OSError, ValueError):
            raise ConfigError(
                f"--out {out} is not empty and holds no earlier `{GENERATOR}` output "
                f"(no {MARKER}); choose a new or empty folder"
            ) from None
        if any(previous.get(k) != v for k, v in wanted.items()):
            raise ConfigError(
                f"--out {out} holds a simulation of other speakers ({previous.get('speakers')}); choose a "
                "new --out, or the same speaker options to continue it"
            )
    out.mkdir(parents=True, exist_ok=True)
    runs = {run.name: asdict(run) for run in scenario.runs}
    atomic_write_text(
        out / MARKER,
        json.dumps(
            {**wanted, "scenario": {"name": scenario.name, "description": scenario.description, "runs": runs}}, indent=1
        )
        + "\n",
    )


def generate_or_reuse_speakers(root: Path, config: SpeakersConfig) -> None:
    """Generate the speakers, or keep an earlier identical set."""
    try:
        manifest = read_manifest(root)
        if manifest["config"] == {k: v for k, v in asdict(config).items() if k != "workers"}:
            log.info("reusing the speakers in %s", root)
            return
    except ConfigError:
        pass
    generate_speakers(root, config)


# ---------------------------------------------------------------------- one run
def run_config(spec: RunSpec, folder: Path, n_clients: int) -> RunConfig:
    """The run configuration of ``spec``: fedvox defaults, the simulation's choices, then ``spec.config``.

    ``spec.epsilon`` becomes a target epsilon here; :func:`calibrate` turns it into a noise
    multiplier before the run starts.
    """
    base = RunConfig()
    values: dict[str, Any] = {
        "stage": spec.stage,
        "learning-rate": LEARNING_RATE,
        "server-step": SERVER_STEP,
        "num-server-rounds": spec.rounds,
        "clients-per-round": min(spec.clients_per_round, n_clients),
        "min-clients": min(base.min_clients, n_clients),
        "speaker-dp.enabled": spec.speaker_dp,
        "data-root": str(folder / "clients"),
        "checkpoint-dir": str(folder / "server"),
        "keep-checkpoints": spec.rounds + 1,  # every round is scored afterwards
        "evaluate": False,  # the simulator scores the global model itself, on seen and unseen speakers
        "round-timeout": ROUND_TIMEOUT_S,
    }
    if spec.epsilon > 0:
        values["dp.target-epsilon"] = spec.epsilon
        values["client-budget-epsilon"] = max(base.client_budget_epsilon, spec.epsilon)
    return base.with_overrides({**values, **spec.config})


def smallest_client(config: RunConfig, caches: tuple[Path, ...]) -> int:
    """The fewest training utterances any client has: what a plan's sample rate is sized by."""
    return min(len(datasets(config.stage, cache, HELD_OUT_FRACTION)[0]) for cache in caches)


def sized_sample_rate(config: RunConfig, smallest: int) -> float:
    """The Poisson rate that gives the smallest client an expected logical batch."""
    return min(1.0, config.logical_batch / max(smallest, 1))


def calibrate(
    config: RunConfig, caches: tuple[Path, ...], *, keep_sample_rate: bool = False
) -> tuple[RunConfig, dict[str, Any]]:
    """Fix the plan's sample rate and replace a target epsilon by the one noise multiplier that
    meets it for every client.

    The plan's ``dp.sample-rate`` becomes ``logical-batch`` over the smallest client's training
    utterances (the experimenter knows them; a real operator does not, which is why devices take
    ``q`` from the plan), unless the scenario sets it (``keep_sample_rate``).

    A client in target-epsilon mode recalibrates its noise in every message (twice per round:
    the status before and after training), and one PRV calibration took 4-12 s here, more than
    the round's training. All clients run the same plan, so the noise calibrated once for the
    largest sample rate (the client with the fewest training utterances) keeps every client at
    or below the target (identical to what each computes for itself when their data are equal).
    """
    started = time.perf_counter()
    smallest = smallest_client(config, caches)
    sample_rate = config.dp.sample_rate if keep_sample_rate else sized_sample_rate(config, smallest)
    config = config.with_overrides({"dp.sample-rate": sample_rate})
    if config.dp.target_epsilon <= 0:
        return config, {}
    steps = config.num_server_rounds * config.local_steps
    sigma = calibrate_noise_multiplier(config.dp.target_epsilon, config.dp.delta, sample_rate=sample_rate, steps=steps)
    record = {
        "target-epsilon": config.dp.target_epsilon,
        "noise-multiplier": sigma,
        "sample-rate": sample_rate,
        "steps": steps,
        "smallest-client": smallest,
        "seconds": time.perf_counter() - started,
    }
    log.info(
        "noise multiplier %.4f reaches epsilon %g after %d steps at sample rate %.3f",
        sigma,
        config.dp.target_epsilon,
        steps,
        sample_rate,
    )
    return config.with_overrides({"dp.noise-multiplier": sigma, "dp.target-epsilon": 0.0}), record


def set_owner_budget(config: RunConfig, data: Path) -> None:
    """What each simulated owner sets at prepare: the scenario's budget, at the plan's delta."""
    with Ledger(data) as ledger:
        owner_budget(ledger, client_identity(data), epsilon=config.client_budget_epsilon, delta=config.dp.delta)


def run_one(spec: RunSpec, data: SpeakerData, folder: Path, host: Host) -> None:
    """Simulate, score and sample one run into ``folder`` (resuming what is already there)."""
    n = len(data.clients)
    config, calibration = calibrate(
        run_config(spec, folder, n), data.client_caches, keep_sample_rate="dp.sample-rate" in spec.config
    )
    fleet = load_fleet(spec.fleet)
    clients = plan_clients(fleet, n, spec.seed, config, host.facts, host.workers)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        folder / "fleet.json",
        json.dumps(
            {
                "fleet": {
                    "name": fleet.name,
                    "description": fleet.description,
                    "deadline-factor": fleet.deadline_factor,
                    "shares": {c.name: c.share for c in fleet.classes},
                },
                "host": {
                    "facts": host.facts.to_dict(),
                    "workers": host.workers,
                    "threads": host.threads,
                    "ray-address": host.ray_address,
                },
                "clients": [c.summary() for c in clients],
            },
            indent=1,
        )
        + "\n",
    )
    for p, cache in enumerate(data.client_caches):
        set_owner_budget(config, clone_cache(cache, folder / "clients" / f"client-{p}"))

    timings: dict[str, float] = {}
    spans = Spans()
    memory = PeakMemory()
    run_started = time.time()
    with memory:
        log.info(
            "run %s: %d clients (%s fleet), %d rounds of %s %s",
            spec.name,
            n,
            fleet.name,
            spec.rounds,
            config.stage,
            config.model_config,
        )
        store = RoundCheckpoints(folder / "server" / "checkpoints", config.keep_checkpoints)
        items = quality_items(spec, data)
        side = SideWork(
            config,
            baseline_jobs(spec, config, data, clients, folder, host),
            items,
            local_state=lambda result: local_contender(config, spec, folder, result),
            central_state=folder / "baselines" / "central" / CENTRAL_STATE,
            recordings_cache=folder.parent.parent / "features" / "recordings-quality.json",
            reuse_root=folder.parent.parent / reuse.FOLDER,
            seed=spec.seed,
            workers=host.workers,
            threads=host.threads,
            spans=spans,
        )
        # The baselines and the scoring need nothing from the federation but its round 0 (the
        # base): they run beside it in their own niced processes (simulations.sidework) from the
        # start, filling the cores while the federation waits on Ray and its clients. The base
        # model is scored once a client has trained (its round 0 is written by then).
        federation_done, federation_failed = threading.Event(), threading.Event()

        def base_model() -> Contender | None:
            events = folder / "events"
            while not federation_done.is_set() and not (events.is_dir() and any(events.iterdir())):
                federation_done.wait(1.0)
            return None if federation_failed.is_set() else Contender("base", store.load(0).state)

        with ThreadPoolExecutor(max_workers=1) as alongside:
            pending = alongside.submit(side.run_baselines, federation_failed, base_model)
            started = time.time()
            try:
                completed = federate(config, fleet, clients, spec.seed, folder, host)
            except BaseException:
                federation_failed.set()  # the error goes up at once, not after the baselines
                side.close(cancel=True)
                raise
            finally:
                federation_done.set()
                spans.add("federation", started, time.time())
            if completed > 0:
                side.federated(store.load(completed).state)
            heldout = {
                "seen": heldout_by_speaker(config.stage, data.seen),
                "unseen": heldout_by_speaker(config.stage, data.unseen),
            }
            started = time.time()
            evaluation = {
                "global": score_rounds(config, folder, heldout),
                "references": reference_losses(
                    config,
                    [datasets(config.stage, cache, HELD_OUT_FRACTION)[0] for cache in data.client_caches],
                    heldout,
                ),
            }
            spans.add("evaluation", started, time.time())
            pending.result()
        evaluation |= side.baselines
        atomic_write_text(folder / "evaluation.json", json.dumps(evaluation, indent=1) + "\n")
        quality = side.speech_quality()
        side.close()
        if quality is not None and completed > 0:
            quality = {**quality_context(spec, data), **quality}
            atomic_write_text(folder / "quality.json", json.dumps(quality, indent=1) + "\n")
        if spec.sample and completed > 0:
            started = time.time()
            sample(config, folder, data, completed)
            spans.add("sample", started, time.time())
    wall = time.time() - run_started
    federation_end = spans.spans["federation"][1] - run_started
    timings = {phase: end - start for phase, (start, end) in spans.spans.items()}
    timings |= {"wall": wall, "after-federation": wall - federation_end}
    atomic_write_text(
        folder / "run.json",
        json.dumps(
            {
                "spec": asdict(spec),
                "run-config": config.to_flat(),
                "calibration": calibration,
                "completed-rounds": completed,
                "timings-s": timings,
                "spans-s": {
                    phase: [start - run_started, end - run_started] for phase, (start, end) in spans.spans.items()
                },
                "peak-rss-bytes": memory.peak,
                "host-load": memory.host_load,
            },
            indent=1,
        )
        + "\n",
    )


def federate(config: RunConfig, fleet, clients: list[VirtualClient], seed: int, folder: Path, host: Host) -> int:
    """Run the federation through Flower's simulation engine; returns the last committed round."""

    store = RoundCheckpoints(Path(config.checkpoint_dir) / "checkpoints", config.keep_checkpoints)
    latest = store.latest()
    if latest is not None and latest.round >= config.num_server_rounds:
        log.info("the federation in %s finished earlier (round %d)", config.checkpoint_dir, latest.round)
        return latest.round
    _quiet_flower()  # before importing Flower: its state store logs while being imported
    # Ray starts its workers at niceness 15 (its default, so that busy actors never slow the
    # raylet); beside the baselines' and the scoring's processes (this process's niceness) the
    # ClientApps then got a few percent of a shared core, and lost to any niced job of others:
    # round-1 clients' DP steps took 5x as long once the pool had started. They run at this
    # process's niceness, like the pool (a cluster given by --ray-address keeps its own setting).
    os.environ.setdefault("RAY_worker_niceness", "0")
    from flwr.simulation import run_simulation

    from fedvox.client.app import app as client_app
    from fedvox.server.app import make_server_app
    from fedvox.simulations.fleet_app import FleetMod, fleet_client_app

    mod = FleetMod(fleet, clients, seed, folder / "events")
    try:
        run_simulation(
            server_app=make_server_app(config, seed=seed),
            client_app=fleet_client_app(mod, client_app),
            num_supernodes=len(clients),
            backend_config=backend_config(
                host, gpu=any(c.node_config.get("profile.device", "cpu") != "cpu" for c in clients)
            ),
        )
    except RuntimeError as exc:  # Flower wraps whatever stopped the simulation
        raise FederationError(f"the Flower simulation stopped: {exc}; see the log above") from exc
    latest = store.latest()
    completed = latest.round if latest else 0
    if completed < config.num_server_rounds:
        log.warning(
            "the federation stopped after round %d of %d (see the log above)", completed, config.num_server_rounds
        )
    return completed


def backend_config(host: Host, gpu: bool) -> dict[str, Any]:
    """Ray settings: ``host.workers`` actors of ``host.threads`` CPUs each (and a GPU share)."""
    client = {"num_cpus": host.threads, "num_gpus": 1.0 / host.workers if gpu else 0.0}
    init: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": "ERROR",
        "log_to_driver": logging.getLogger().isEnabledFor(logging.DEBUG),
    }
    if host.ray_address:
        init["address"] = host.ray_address
    else:
        init |= {"num_cpus": host.workers * host.threads, "num_gpus": 1 if gpu else 0}
    return {"client_resources": client, "init_args": init}


def _quiet_flower() -> None:
    """Keep Flower's warnings only: it logs every round's metrics twice (its handler and ours),
    warns that ``run_simulation`` is deprecated in favour of ``flwr run`` (fedvox-sim runs the
    federation in its own process, beside the side-work pool it shares the cores with) and that
    federated evaluation is off (the simulator scores the global model itself), and its state
    store logs its database plugins."""
    flwr = logging.getLogger("flwr")
    flwr.propagate = False
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        flwr.setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
    if not any(isinstance(f, _NoDeprecationNotice) for f in flwr.filters):
        flwr.addFilter(_NoDeprecationNotice())
    # Ray warns that it will stop hiding GPUs from actors with num_gpus=0; fedvox pins every
    # client's device through its profile, so the future behaviour changes nothing here.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


class _NoDeprecationNotice(logging.Filter):
    NOTICES = ("`run_simulation` function is deprecated", "fraction_evaluate is set to 0.0")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(notice in record.getMessage() for notice in self.NOTICES)


def score_rounds(config: RunConfig, folder: Path, heldout) -> dict[int, Any]:
    """Seen and unseen losses of every committed global model (round 0: the initial one)."""

    store = RoundCheckpoints(folder / "server" / "checkpoints", config.keep_checkpoints)
    evaluator = Evaluator(config, heldout)
    rounds = store.rounds()
    scores = {}
    with progress() as bar:
        task = bar.add_task("scoring rounds", total=len(rounds))
        for r in rounds:
            scores[r] = evaluator.losses(store.load(r).state)
            bar.advance(task)
    return scores


def baseline_jobs(
    spec: RunSpec, config: RunConfig, data: SpeakerData, clients: list[VirtualClient], folder: Path, host: Host
) -> list[tuple[Callable, Any]]:
    """Local-only baselines of the first ``spec.local_baselines`` clients, and the centralised one."""
    jobs: list[tuple[Callable, Any]] = []
    for client in clients[: spec.local_baselines]:
        if client.refusal:
            continue
        base = folder / "baselines" / "local" / f"client-{client.partition}"
        job = LocalJob(
            partition=client.partition,
            speaker=data.clients[client.partition],
            data=clone_cache(data.client_caches[client.partition], base / "data"),
            out=base / "train",
            config=config,
            rounds=spec.rounds,
            overrides=dict(client.node_config),
            seen=data.seen,
            unseen=data.unseen,
            seed=spec.seed * 1_000_003 + client.partition,
        )
        jobs.append((local_baseline, job))
    if spec.central_baseline:
        expected = min(config.clients_per_round or len(clients), len(clients))
        jobs.append(
            (
                central_baseline,
                CentralJob(
                    caches=data.client_caches,
                    out=folder / "baselines" / "central",
                    config=config,
                    rounds=spec.rounds,
                    examples_per_step=config.logical_batch * expected,
                    threads=host.threads,
                    seen=data.seen,
                    unseen=data.unseen,
                    seed=spec.seed,
                    overrides={k: v for k, v in clients[0].node_config.items() if k == "profile.device"},
                ),
            )
        )
    return jobs


def quality_items(spec: RunSpec, data: SpeakerData) -> list[TestItem]:
    """The speech-quality test set: the first ``spec.quality_sentences`` held-out sentences of
    every client and every unseen speaker (the item says which)."""
    if spec.quality_sentences <= 0:
        return []
    manifest = read_manifest(data.speakers_root)
    folders = {s["name"]: data.speakers_root / s["folder"] for s in manifest["speakers"]}
    unseen = [s["name"] for s in manifest["speakers"] if s["role"] != "client"]
    return [
        item for name in [*data.clients, *unseen] for item in test_items(name, folders[name], spec.quality_sentences)
    ]


def quality_context(spec: RunSpec, data: SpeakerData) -> dict[str, Any]:
    """What ``quality.json`` says about the speakers besides the scores."""
    manifest = read_manifest(data.speakers_root)
    return {
        "run-seed": spec.seed,
        "clients": list(data.clients),
        "unseen": [s["name"] for s in manifest["speakers"] if s["role"] != "client"],
        "training-utterances": {
            s["name"]: s["train"]["utterances"] for s in manifest["speakers"] if s["role"] == "client"
        },
    }


def local_contender(config: RunConfig, spec: RunSpec, folder: Path, result: dict[str, Any]) -> Contender:
    """A local-only baseline's final model, compared on its own speaker only."""
    step = spec.rounds * config.local_steps
    path = (
        folder
        / "baselines"
        / "local"
        / f"client-{result['partition']}"
        / "train"
        / "checkpoints"
        / f"step-{step:08d}.pt"
    )
    state = torch.load(path, map_location="cpu", weights_only=True)["state"]
    return Contender("local only", state, frozenset([result["speaker"]]))


def sample(config: RunConfig, folder: Path, data: SpeakerData, final_round: int) -> None:
    """Synthesise a held-out sentence of the first client in its own voice with the final model."""
    from fedvox.shared.audio import read_audio
    from fedvox.simulations.quality.activity import check_speech
    from fedvox.simulations.sample import synthesise_sample

    speaker = next(s for s in read_manifest(data.speakers_root)["speakers"] if s["name"] == data.clients[0])
    folder_of = data.speakers_root / speaker["folder"]
    lines = [
        line.split("|", 3)
        for line in (folder_of / "heldout.list").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    if not lines:
        log.warning("no held-out utterance of %s to take a reference from: no sample", speaker["name"])
        return
    reference, _, language, reference_text = lines[0]
    text = lines[1][3] if len(lines) > 1 else reference_text
    store = RoundCheckpoints(folder / "server" / "checkpoints", config.keep_checkpoints)
    result = synthesise_sample(
        config, store.load(final_round).state, folder_of / reference, reference_text, text, language, folder / "sample"
    )
    base = synthesise_sample(
        config, store.load(0).state, folder_of / reference, reference_text, text, language, folder / "sample" / "base"
    )
    wave, rate = read_audio(result.wav)
    base_wave, _ = read_audio(base.wav)
    atomic_write_text(
        folder / "sample" / "sample.json",
        json.dumps(
            {
                "speech-check": check_speech(wave.numpy(), rate).to_dict(),
                "differs-from-base": wave.shape != base_wave.shape or not torch.equal(wave, base_wave),
                "wav": result.wav.name,
                "png": result.png.name,
                "text": result.text,
                "language": result.language,
                "reference": str(result.reference),
                "reference-text": reference_text,
                "seconds": result.seconds,
                "round": final_round,
                "trained-stage": config.stage,
                "fresh-stage": result.fresh_stage,
                "partner": result.partner,
                "speaker": speaker["name"],
            },
            indent=1,
            ensure_ascii=False,
        )
        + "\n",
    )


# ---------------------------------------------------------------------- measuring
def _timed(timings: dict[str, float], name: str, work: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    try:
        return work()
    finally:
        timings[name] = time.perf_counter() - started


class PeakMemory:
    """Peak resident memory of this process and all its descendants (Ray's included), sampled,
    with the host's load average and the cores this process tree kept busy at the same moments
    (so a report can tell a slow host from a loaded one)."""

    INTERVAL_S = 0.5

    def __init__(self) -> None:
        self.peak = 0
        self.loads: list[float] = []
        self.busy: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def host_load(self) -> dict[str, float]:
        """Mean and peak 1-minute load average, the usable cores, and this run's busiest moment (cores)."""
        if not self.loads:
            return {}
        return {
            "mean": sum(self.loads) / len(self.loads),
            "max": max(self.loads),
            "cores": usable_cpus(),
            "own-max": max(self.busy, default=0.0),
        }

    def _watch(self) -> None:
        me = psutil.Process()
        cpu: dict[int, psutil.Process] = {}
        while True:
            total, busy = 0, 0.0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                    busy += cpu.setdefault(process.pid, process).cpu_percent() / 100
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)
            self.loads.append(os.getloadavg()[0])
            self.busy.append(busy)
            if self._stop.wait(self.INTERVAL_S):
                return


__all__ = ["GENERATOR", "Host", "PeakMemory", "backend_config", "run_config", "run_one", "simulate"]
