"""The ServerApp that ``flwr run .`` starts (``[tool.flwr.app.components] serverapp``).

It is fedvox's federation server (:func:`fedvox.server.app.serve`) plus what a bare ``flwr run .``
needs on Flower's local simulation runtime, where every simulated SuperNode is partition ``p``
of the run's ``data-root``: a run without one gets the default synthetic speakers (``fedvox-sim
speakers`` defaults, one speaker per SuperNode; generated once under ``$FEDVOX_HOME/simulation``
and reused), each client's features cloned into the run's folder with a fresh identity and
ledger, as ``fedvox-sim run`` does. In a deployment (a gRPC grid: SuperNodes bring their own
``data-path``) nothing is added. A run that trains no round fails with the reason, so Flower
records it as failed instead of finished.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedvox.server.app import serve
from fedvox.server.run import FederatedRun, fedvox_home, run_directory
from fedvox.shared.cli import set_offline_env
from fedvox.shared.errors import FederationError
from fedvox.shared.models.config import s1_config
from fedvox.shared.runconfig import RunConfig

log = logging.getLogger(__name__)

NODES_WAIT_S = 60.0
"""How long to wait for the simulated SuperNodes to register (they do so right after start-up)."""

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_app(grid, RunConfig.from_flat(context.run_config))


def run_app(grid: Grid, config: RunConfig) -> FederatedRun:
    """Serve ``config`` on ``grid`` (with default speakers in a local simulation without data-root);
    raises :class:`FederationError` with the reason when no round was trained."""
    set_offline_env()
    if not config.data_root and _is_local_simulation(grid):
        config = with_default_speakers(config, len(_simulated_nodes(grid)))
    run = serve(grid, config)
    if run.completed < 1 and config.num_server_rounds > 0:
        raise FederationError(f"the run trained no round: {run.stopped or 'see the log above'}")
    return run


def _is_local_simulation(grid: Grid) -> bool:
    """Flower's simulation runtime hands the ServerApp an in-memory grid; a deployment a gRPC one."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


def _simulated_nodes(grid: Grid) -> list[int]:
    """The simulated SuperNodes, once registered (the runtime starts them beside the ServerApp)."""
    deadline = time.monotonic() + NODES_WAIT_S
    nodes = list(grid.get_node_ids())
    while not nodes and time.monotonic() < deadline:
        time.sleep(0.2)
        nodes = list(grid.get_node_ids())
    if not nodes:
        raise FederationError(f"no simulated SuperNode registered within {NODES_WAIT_S:.0f} s")
    return nodes


def with_default_speakers(config: RunConfig, n_clients: int) -> RunConfig:
    """``config`` with a data-root of ``n_clients`` default synthetic speakers, in the run's folder."""
    from fedvox.simulations.features import clone_cache, prepare_speakers
    from fedvox.simulations.runner import generate_or_reuse_speakers, set_owner_budget, smallest_client
    from fedvox.simulations.speakers import SpeakersConfig

    root = fedvox_home() / "simulation" / f"default-{n_clients}"
    log.info("no data-root: %d default synthetic speakers (reused from %s when made before)", n_clients, root)
    generate_or_reuse_speakers(root / "speakers", SpeakersConfig(n_speakers=n_clients))
    symbols = s1_config(config.model_config).symbols_version
    data = prepare_speakers(root / "speakers", n_clients, root / "features", symbols)
    run_dir = run_directory(config)
    config = config.with_overrides({"checkpoint-dir": str(run_dir), "data-root": str(run_dir / "clients")})
    for p, cache in enumerate(data.client_caches):
        set_owner_budget(config, clone_cache(cache, Path(config.data_root) / f"client-{p}"))
    warn_small_batches(config, smallest_client(config, data.client_caches))
    return config


def warn_small_batches(config: RunConfig, smallest: int) -> None:
    """Say so when the plan's sample rate gives the smallest client less than half its logical batch.

    The run configuration's ``dp.sample-rate`` is made for devices with thousands of utterances;
    on the default speakers (18 training utterances) its 0.05 is an expected batch of 0.9, where the
    noise swamps every step. ``fedvox-sim run`` sizes the rate to the data instead (``calibrate``).
    """
    expected = config.dp.sample_rate * smallest
    if expected >= config.logical_batch / 2:
        return
    from fedvox.simulations.runner import sized_sample_rate
    from fedvox.simulations.scenario import RunSpec

    log.warning(
        "dp.sample-rate %g gives the smallest client (%d training utterances) an expected batch of %.1f, "
        "not the plan's logical batch of %d: the DP noise will swamp each step. To plan as fedvox-sim does, "
        'pass --run-config "dp.sample-rate=%.3f dp.target-epsilon=%g"',
        config.dp.sample_rate,
        smallest,
        expected,
        config.logical_batch,
        sized_sample_rate(config, smallest),
        RunSpec().epsilon,
    )


__all__ = ["app", "run_app", "warn_small_batches", "with_default_speakers"]
