"""``fedvox-server``: what an operator runs to set up a federation, run it, authorise devices and
inspect or export the model.

``DIR`` is a server home (``fedvox-server init DIR``; layout in :mod:`server.deploy.home`).
``status`` and ``export`` also take a plain run directory: the ``checkpoint-dir`` of a run
started with ``flwr run .`` (docs/federation.md).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import typer

from fedvox.shared.cli import VERSION_OPTION, command_group, console, run_cli, setup_logging

app = command_group(
    "fedvox-server",
    "Set up and run a fedvox federation's server, authorise devices, inspect and export the run.",
)

HOME = typer.Argument(..., help="The server home (made by `fedvox-server init`).")
RUN = typer.Argument(
    ..., help="A server home, or a run directory (a run's checkpoint-dir).", exists=True, file_okay=False
)
FORMATS = ("safetensors", "gpt-sovits")


@app.callback()
def _group(version: bool = VERSION_OPTION) -> None:
    """Set up and run a fedvox federation's server, authorise devices, inspect and export the run."""


@app.command()
def init(
    home: Path = typer.Argument(..., help="Folder for the new server home (created, mode 0700)."),
    name: list[str] = typer.Option(
        [],
        "--name",
        help="A host name or address devices use to reach this server (repeat; default: loopback and this machine's "
        "names).",
    ),
    host: str = typer.Option("0.0.0.0", help="Address the public port listens on (0.0.0.0: every interface)."),
    port: int = typer.Option(9443, min=1, max=65535, help="The public port (TLS; devices connect here)."),
    run_config: Path | None = typer.Option(
        None, "--run-config", help="TOML run configuration to start from (default: fedvox's defaults)."
    ),
    ca_cert: Path | None = typer.Option(
        None, "--ca-cert", help="Bring your own: the CA certificate devices will trust."
    ),
    cert: Path | None = typer.Option(
        None, "--cert", help="Bring your own: the server certificate (signed by --ca-cert)."
    ),
    key: Path | None = typer.Option(
        None, "--key", help="Bring your own: the server certificate's private key (PEM, unencrypted)."
    ),
    renew_certificate: bool = typer.Option(
        False,
        "--renew-certificate",
        help="In an existing home: issue a new server certificate (for --name, or before expiry).",
    ),
) -> None:
    """Create a server home: certificates, run configuration and folders, readable by you only.

    Makes a private CA and server certificate (or takes yours), the run configuration, and
    folders for state, logs and the run."""
    from fedvox.server.deploy.home import ServerHome, init_home, renew
    from fedvox.server.deploy.pki import load_certificate, subject_names

    if renew_certificate:
        names = renew(ServerHome(home), name or None)
        say(f"new server certificate for {', '.join(names)}; restart the server to use it")
        return
    made = init_home(
        home,
        name or None,
        run_config=run_config,
        bring_ca=ca_cert,
        bring_cert=cert,
        bring_key=key,
        host=host,
        port=port,
    )
    ca = load_certificate(made.ca_cert)
    say(f"server home {made.root}")
    say(f"  certificate for: {', '.join(subject_names(load_certificate(made.server_cert)))}")
    say(f"  devices trust:   {made.ca_cert} (SHA-256 {_sha256(ca)})")
    say(f"  run config:      {made.run_config_file}")
    say(
        f"next: edit the run config, `fedvox-server start {made.root}`, give each device owner "
        f"{made.ca_cert.name} and the address, register their keys with `fedvox-server register`"
    )


@app.command()
def start(
    home: Path = HOME,
    host: str | None = typer.Option(None, help="Listen on this address (default: server.toml's host)."),
    port: int | None = typer.Option(None, min=1, max=65535, help="Listen on this port (default: server.toml's port)."),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the run from its last committed round (with none yet: start it; services always pass it).",
    ),
    dashboard_host: str = typer.Option(
        "127.0.0.1", "--dashboard-host", help="Address the dashboard listens on (only this machine by default)."
    ),
    dashboard_port: int = typer.Option(
        0, "--dashboard-port", min=0, max=65535, help="The dashboard's port (0: a free one, printed)."
    ),
    no_dashboard: bool = typer.Option(False, "--no-dashboard", help="Serve no dashboard."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logging."),
) -> None:
    """Run the federation and report devices and rounds until the run ends.

    Starts Flower's SuperLink (TLS, device authentication, SQLite state), the public gateway, the
    fedvox run and the dashboard."""
    from fedvox.server.deploy.home import ServerHome
    from fedvox.server.deploy.launcher import ServerProcess

    server_home = ServerHome(home).require()
    setup_logging(verbose)
    _log_to_file(server_home.logs / "server.log")
    dashboard_at = None if no_dashboard else (dashboard_host, dashboard_port)
    code = ServerProcess(server_home, host, port, resume, dashboard=dashboard_at).run()
    # Every process it started has stopped and its files are written: once the logs are out, leave
    # without tearing down torch's and Flower's modules (3-5 s on 2 busy cores).
    logging.shutdown()
    console.file.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@app.command()
def dashboard(
    directory: Path = typer.Argument(
        ..., help="A server home, a run directory, or a `fedvox-sim run` output folder.", exists=True, file_okay=False
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (only this machine by default)."),
    port: int = typer.Option(0, "--port", min=0, max=65535, help="Port (0: a free one, printed)."),
) -> None:
    """Serve the dashboard of a finished run or simulation, read-only, until Ctrl-C (a running
    server's own dashboard is live: `fedvox-server start` prints its address)."""
    from fedvox.server.dashboard import serve_dashboard
    from fedvox.server.dashboard.view import open_source

    setup_logging(False)
    source = open_source(directory)
    if source.home is not None and source.home.running():
        source.nodes = lambda: _nodes(source.home)
    server, url = serve_dashboard(source, host, port)
    say(f"dashboard of {source.root}: {url}")
    try:
        while server.alive():
            server.thread.join(timeout=1.0)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


@app.command()
def register(
    home: Path = HOME,
    public_key: str = typer.Argument(
        ...,
        help="The device's public key: the line `fedvox-client enroll` printed, its .pub file, or the SHA256: "
        "fingerprint of a device waiting for registration.",
    ),
    name: str | None = typer.Option(
        None, "--name", help="A name for the device (default: from its key's fingerprint)."
    ),
) -> None:
    """Authorise a device's key: now if the server runs, else when it starts."""
    from fedvox.server.deploy.devices import register_key
    from fedvox.server.deploy.home import ServerHome

    server_home = ServerHome(home).require()
    control = _control(server_home)
    try:
        for line in register_key(server_home, public_key, name, control):
            say(line)
    finally:
        if control is not None:
            control.close()


@app.command()
def devices(
    home: Path = HOME,
    json_output: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Registered devices (connection, last profile, rounds, epsilon spent) and refused keys.

    Lists each registered device's connection, last profile, rounds joined and utterance-level
    epsilon spent, and the devices whose keys were refused, waiting for registration."""
    from rich.console import Console
    from rich.table import Table

    from fedvox.server.deploy.devices import WaitingRoom, device_report
    from fedvox.server.deploy.home import ServerHome

    server_home = ServerHome(home).require()
    report = device_report(server_home, *_nodes(server_home))
    waiting = WaitingRoom(server_home).waiting()
    if json_output:
        typer.echo(json.dumps({"devices": report, "waiting": waiting}, indent=1))
        return
    if not report:
        say(f"no devices registered in {server_home.root} (fedvox-server register)")
    else:
        # Seven narrow columns fit 80 characters; the keys follow, one line each and whole.
        table = Table(title=f"Devices of {server_home.root}", title_justify="left")
        for column in ("name", "node", "status", "rounds", "profile", "epsilon", "budget"):
            table.add_column(column, overflow="fold")
        for d in report:
            table.add_row(
                d["name"],
                str(d["node-id"] or "-"),
                d["status"],
                str(d["rounds-joined"]),
                d["profile"] or "-",
                "-" if d["epsilon-spent"] is None else f"{d['epsilon-spent']:.3f}",
                "-" if d["epsilon-budget"] is None else f"{d['epsilon-budget']:g}",
            )
        Console().print(table)
        for d in report:
            say(f"  {d['name']}: {d['fingerprint']}")
    for w in waiting:
        say(f"waiting for registration: {w['fingerprint']} ({w['attempts']} attempt(s), last {w['last-seen']})")
        say(
            f"  after checking the fingerprint with its owner: fedvox-server register {server_home.root} "
            f"{w['fingerprint']} --name NAME"
        )


@app.command()
def status(
    directory: Path = RUN,
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Rounds done and in progress, participants, latest metrics and speaker-level epsilons.

    For a server home, also whether the server runs and which devices are connected."""
    summary = full_status(directory)
    if json_output:
        typer.echo(json.dumps(summary, indent=1, sort_keys=True))
        return
    server = summary.get("server")
    if server is not None:
        if server.get("stopping"):
            say(
                f"server stopping (pid {server['pid']}): the run ended; {server['devices-registered']} devices "
                "registered"
            )
        elif server["running"]:
            say(
                f"server running (pid {server['pid']}) on {server['address']}, Flower run {server['flower-run-id']}; "
                f"{server['devices-online']} of {server['devices-registered']} devices connected"
            )
        else:
            say(f"server stopped; {server['devices-registered']} devices registered")
    latest = summary.get("latest")
    if latest is None:
        say(f"no round committed yet in {summary['run-dir']}")
        return
    say(f"run {summary['run-id']} in {summary['run-dir']}")
    progress = f"round {latest['round']} of {summary['num-server-rounds']} committed"
    if summary.get("current-round"):
        progress += f"; round {summary['current-round']} in progress"
    if summary["best-round"] is not None:
        progress += f"; best round {summary['best-round']} (lowest released validation loss)"
    say(progress)
    for key in ("participants", "val-loss", "rejects", "epsilon-utterance-max", "epsilon-speaker-max", "round-time-s"):
        if key in latest["metrics"]:
            say(f"  {key}: {latest['metrics'][key]}")
    if summary["speakers"]:
        worst = max(summary["speakers"].values())
        say(f"speaker-level epsilon: {len(summary['speakers'])} speakers, max {worst:.3f}")


@app.command()
def export(
    directory: Path = RUN,
    format_: str | None = typer.Option(
        None,
        "--format",
        help="gpt-sovits (s1.ckpt; s2G.pth + s2D.pth; official architectures) or safetensors (fedvox, any config); "
        "default: both.",
    ),
    round_: int | None = typer.Option(
        None, "--round", help="Round to export (default: the best comparable round, else the newest that aggregated)."
    ),
    out: Path | None = typer.Option(
        None, help="Output folder, which receives gpt-sovits/ and fedvox/ (default: the run's export/)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logging."),
) -> None:
    """Write a committed round's global model, LoRA merged, in GPT-SoVITS's and/or fedvox's format."""
    from fedvox.server.checkpoints import RoundCheckpoints
    from fedvox.server.model import export_model
    from fedvox.shared.atomic import claim_folder
    from fedvox.shared.errors import CheckpointError, ConfigError
    from fedvox.shared.models.factory import export_fedvox, export_gpt_sovits
    from fedvox.shared.models.subsets import load_trainable_state_dict
    from fedvox.shared.runconfig import RunConfig

    setup_logging(verbose)
    if format_ not in (None, *FORMATS):
        raise ConfigError(f"--format {format_!r}: choose {' or '.join(FORMATS)}")
    target = claim_folder(out, ("fedvox", "gpt-sovits")) if out else None  # an earlier export's, or new
    run_dir = run_directory(directory)
    store = RoundCheckpoints(run_dir / "checkpoints", keep=1)
    if round_ is None:
        chosen, why = store.export_choice()
    else:
        chosen, why = round_, "chosen with --round"
    if chosen not in store.rounds():
        raise CheckpointError(f"{run_dir} has no committed round {chosen}; committed: {store.rounds()}")
    say(f"exporting round {chosen}: {why}")
    checkpoint = store.load(chosen)
    config = RunConfig.from_flat(checkpoint.meta["run-config"])
    folder = target or run_dir / "export"
    if format_ is None:
        paths = export_model(config, checkpoint.state, folder)
    else:
        model = config.build_model()
        load_trainable_state_dict(model, checkpoint.state)
        if format_ == "safetensors":
            paths = export_fedvox(config.stage, model, folder / "fedvox")
        else:
            try:
                paths = export_gpt_sovits(config.stage, model, folder / "gpt-sovits", half=True)
            except CheckpointError as exc:
                raise CheckpointError(f"{exc}: --format safetensors") from None
    for path in paths:
        say(f"wrote {path} (round {chosen})")


# ---------------------------------------------------------------------- helpers
def say(text: str) -> None:
    """One plain line for the operator: paths, keys and fingerprints verbatim (no markup, no
    emoji codes such as ``:CD:`` in a fingerprint, no line breaks inside a long path)."""
    console.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True)


def run_directory(directory: Path) -> Path:
    """The run directory of a server home (``DIR/run``), or ``directory`` itself."""
    from fedvox.server.deploy.home import ServerHome

    home = ServerHome(directory)
    return home.run_dir if home.settings_file.is_file() else Path(directory)


def run_summary(run_dir: Path) -> dict[str, Any]:
    """Committed rounds, the newest round's metrics, the best round and speaker epsilons."""
    from fedvox.server.checkpoints import RoundCheckpoints
    from fedvox.shared.errors import CheckpointError
    from fedvox.shared.privacy.ledger import LEDGER_FILENAME, read_rows

    store = RoundCheckpoints(run_dir / "checkpoints", keep=1)
    rounds = store.rounds()
    if not rounds:
        raise CheckpointError(f"{run_dir} holds no committed round (no checkpoints/round-*.json)")
    latest = store.load(rounds[-1]).meta
    speakers: dict[str, float] = {}
    if (run_dir / LEDGER_FILENAME).is_file():
        for row in read_rows(run_dir):
            if row.unit == "speaker":
                speakers[row.client_id] = row.epsilon
    return {
        "run-id": latest["run-id"],
        "kept": rounds,
        "num-server-rounds": latest["run-config"]["num-server-rounds"],
        "best-round": store.best_round(),
        "latest": {"round": rounds[-1], "metrics": latest["metrics"]},
        "speakers": speakers,
    }


def full_status(directory: Path) -> dict[str, Any]:
    """What ``status`` shows: the run's summary, plus the server's state for a server home."""
    from fedvox.server.checkpoints import RoundCheckpoints
    from fedvox.server.deploy.devices import Registry
    from fedvox.server.deploy.home import ServerHome

    run_dir = run_directory(directory)
    if RoundCheckpoints(run_dir / "checkpoints", keep=1).rounds():
        summary = run_summary(run_dir)
    else:
        summary = {"latest": None, "speakers": {}}
    summary["run-dir"] = str(run_dir)
    home = ServerHome(directory)
    if not home.settings_file.is_file():
        return summary
    target = home.run_config().num_server_rounds  # the run's target now (raised for --resume), not a checkpoint's
    if summary["latest"] is not None:
        summary["num-server-rounds"] = target
    running = home.running()
    registered = len(Registry(home).devices())
    server: dict[str, Any] = {"running": running is not None, "devices-registered": registered}
    if running is not None:
        nodes, _ = _nodes(home)
        online = sum(n.status == "online" for n in nodes or [])
        server.update(
            {
                "pid": running["pid"],
                "address": f"{running['host']}:{running['port']}",
                "flower-run-id": running.get("run-id"),
                "devices-online": online,
                "stopping": bool(running.get("stopping")),
            }
        )
        latest = summary["latest"]["round"] if summary["latest"] else 0
        summary["current-round"] = latest + 1 if latest < target and not running.get("stopping") else None
    summary["server"] = server
    return summary


def _control(home: Any) -> Any:
    """A Control API session with the home's running SuperLink, or ``None`` if it is stopped or
    stopping (it then waits for connections to close and answers nothing)."""
    from fedvox.server.deploy.control import Control

    running = home.running()
    return (
        Control(running["superlink"], home.internal_ca, home.control_token)
        if running and not running.get("stopping")
        else None
    )


def _nodes(home: Any) -> tuple[list[Any] | None, str]:
    """The SuperLink's nodes, or ``None`` and why the devices' connections are unknown."""
    from fedvox.shared.errors import DeploymentError

    control = _control(home)
    if control is None:
        return None, "server stopping" if home.running() else "server stopped"
    try:
        return control.nodes(), ""
    except DeploymentError as exc:  # busy or going down: the home's files still answer
        logging.getLogger(__name__).warning("%s", exc)
        return None, "server not answering"
    finally:
        control.close()


def _log_to_file(path: Path) -> None:
    """Everything the console shows also goes, time-stamped, to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Control API poll otherwise


def _sha256(cert: Any) -> str:
    from cryptography.hazmat.primitives import hashes

    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def main() -> None:
    run_cli(app)


__all__ = ["app", "full_status", "main", "run_directory", "run_summary"]
