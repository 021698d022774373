"""The fedvox federation server as a Flower ServerApp.

``flwr run .`` starts :mod:`fedvox.simulations.app` (``[tool.flwr.app.components] serverapp``),
which reads the run configuration from ``context.run_config`` (the defaults of
``[tool.flwr.app.config]`` plus ``--run-config`` overrides) and calls :func:`serve`. An in-process
simulation does not pass one through the context, so :func:`make_server_app` binds a
:class:`RunConfig` directly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedvox.server.model import base_identity, export_model, initial_subset
from fedvox.server.prompt_grid import prompt
from fedvox.server.run import FederatedRun
from fedvox.shared.cli import set_offline_env
from fedvox.shared.runconfig import RunConfig

log = logging.getLogger(__name__)


def serve(
    grid: Grid,
    config: RunConfig,
    *,
    initial_state: Mapping[str, torch.Tensor] | None = None,
    seed: int | None = None,
    export: bool = True,
) -> FederatedRun:
    """Run the federation described by ``config`` on ``grid`` and export its best model.

    ``initial_state`` replaces the model the config describes (tests use tiny stand-ins, and
    then ``export`` must be off); ``seed`` fixes sampling and noise (reproducible simulations).
    """
    set_offline_env()
    state = initial_subset(config) if initial_state is None else initial_state
    run = FederatedRun(config, state, base=base_identity(config), seed=seed)
    run.execute(prompt(grid))  # a deployment's replies are collected as they arrive
    if export and run.completed > 0:
        chosen, why = run.store.export_choice()
        log.info("exporting round %d: %s", chosen, why)
        export_model(config, run.store.load(chosen).state, run.run_dir / "export")
    return run


def make_server_app(
    config: RunConfig,
    *,
    initial_state: Mapping[str, torch.Tensor] | None = None,
    seed: int | None = None,
    export: bool = True,
) -> ServerApp:
    """A ServerApp bound to ``config`` (for ``flwr.simulation.run_simulation`` in process)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, config, initial_state=initial_state, seed=seed, export=export)

    return server_app


__all__ = ["make_server_app", "serve"]
