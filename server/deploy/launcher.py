"""``fedvox-server start``: the SuperLink, the public gateway, the device keys and the run, supervised.

What runs (one ``start`` per server home; a lock file refuses a second):

- ``flower-superlink`` on 127.0.0.1 (a free port) with TLS (the home's loopback certificate),
  Control API authentication (the home's token, :mod:`server.deploy.control_auth`), SuperNode
  authentication, Flower's SuperExec (which starts the ServerApp) authenticated by the home's
  secret, its SQLite state in ``DIR/state/superlink.db`` and no runtime
  dependency installation; its ServerApp process (fedvox's ``server.app``) is Flower's own;
- the gateway (:mod:`server.deploy.gateway`) on ``--host:--port`` with the server certificate;
- the Control API calls that authorise the registered devices and submit the fedvox run, built
  from this source tree with ``checkpoint-dir`` = ``DIR/run``.

Then it watches: devices connecting and disconnecting, every committed round (from
``metrics.jsonl``), the ServerApp's log (streamed from the SuperLink into ``DIR/logs/run.log``)
and the run's state, until the run finishes or the operator stops it (Ctrl-C, SIGTERM). The
SuperLink dies with this process (``PR_SET_PDEATHSIG`` on Linux, and its own children follow it).
A run stopped in any way resumes with ``--resume`` from its last committed round.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import psutil
from flwr.proto.control_pb2 import StreamLogsRequest  # pylint: disable=E0611

from fedvox.server.checkpoints import RoundCheckpoints
from fedvox.server.deploy.control import FINISHED, Control, SuperNode
from fedvox.server.deploy.control_auth import TOKEN_FILE_ENV, ensure_token
from fedvox.server.deploy.devices import Registry, WaitingRoom, authorise, register_key
from fedvox.server.deploy.gateway import FleetGateway, GatewayServer
from fedvox.server.deploy.home import ServerHome, ensure_link_certificate
from fedvox.server.deploy.pki import check_server_pair
from fedvox.shared.atomic import atomic_write_text
from fedvox.shared.errors import DeploymentError
from fedvox.shared.processes import die_with_parent, flower_command, flower_env, free_port, stop_tree

log = logging.getLogger(__name__)
serverapp_log = logging.getLogger("fedvox.serverapp")

POLL_S = 5.0
"""How often the run, its devices and its rounds are looked at (the end of the run's log stream,
which is the end of the run, is noticed at once)."""
SUPERLINK_START_S = 120.0
SUPERLINK_MODULE = "fedvox.server.deploy.control_auth"
ANY_ADDRESS = ("0.0.0.0", "::", "")


def app_directory() -> Path:
    """The fedvox source tree: Flower builds the run's app bundle (FAB) from it."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise DeploymentError(
            f"the Flower App is built from the fedvox source tree, but {root} has no pyproject.toml; "
            "install fedvox from its source folder (pip install -e .)"
        )
    return root


ANSI = re.compile(r"\x1b\[[0-9;]*m")
FLOWER_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) *:(.*)$")
ROOT_LINE = re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:([A-Z]+):(.*)$")
NODE = re.compile(r"\bnode (\d+)\b")


class ServerAppConsole:
    """Which ServerApp log lines reach the console: warnings and errors, once each, at their level.

    Flower streams the ServerApp's log as ``LEVEL :      message`` lines, with multi-line metric
    dictionaries under every round (about 70 lines a round). Opacus calls ``logging.basicConfig``
    when imported, so the root logger writes every line a second time
    (``MM/DD/YYYY HH:MM:SS:LEVEL:message``), and fedvox's own lines only in that form. The
    console shows warnings and errors (why a run stopped, a device's error) once, naming devices
    by their registered names; the rounds are reported from ``metrics.jsonl``, and
    ``DIR/logs/run.log`` keeps everything.
    """

    def __init__(self, names: dict[int, str] | None = None) -> None:
        self.names = names if names is not None else {}  # node id -> registered device name
        self.flower: deque[str] = deque(maxlen=1000)  # recent Flower messages, to recognise their echo
        self.level = logging.INFO  # of the message the next continuation line belongs to

    def lines(self, text: str) -> list[tuple[int, str]]:
        """``(level, message)`` for each line of ``text`` the operator should see."""
        out = []
        for raw in text.splitlines():
            line = ANSI.sub("", raw).rstrip()
            root, flower = ROOT_LINE.match(line), FLOWER_LINE.match(line)
            if root is None and flower is None:  # a message's continuation (a dict, a traceback)
                message = line.strip()
            else:
                match = flower or root
                self.level, message = logging.getLevelName(match.group(1)), match.group(2).strip()
                if flower is not None:
                    self.flower.append(message)
                elif message in self.flower:  # the root logger's echo of a Flower line
                    self.flower.remove(message)
                    continue
            if message and isinstance(self.level, int) and self.level >= logging.WARNING:
                out.append((self.level, NODE.sub(self._device, message)))
        return out

    def _device(self, match: re.Match) -> str:
        name = self.names.get(int(match.group(1)))
        return f"device {name} (node {match.group(1)})" if name else match.group(0)


class ServerProcess:
    """One ``fedvox-server start``: launch, watch, stop (see the module docstring)."""

    def __init__(
        self,
        home: ServerHome,
        host: str | None = None,
        port: int | None = None,
        resume: bool = False,
        dashboard: tuple[str, int] | None = ("127.0.0.1", 0),
    ) -> None:
        self.home = home.require()
        self.dashboard_at = dashboard  # (host, port; 0: a free one), or None for no dashboard
        self.dashboard: GatewayServer | None = None
        self.dashboard_control: Control | None = None
        settings = home.settings()
        self.host = settings.host if host is None else host
        self.port = settings.port if port is None else port
        self.resume = resume
        self.config = home.run_config()
        self.superlink: subprocess.Popen | None = None
        self.superexec: subprocess.Popen | None = None
        self.gateway: GatewayServer | None = None
        self.control: Control | None = None
        self.address = ""  # the SuperLink's loopback host:port, once started
        self.run_id: int | None = None
        self.lock_fd: int | None = None
        self.stopping = threading.Event()
        self.statuses: dict[int, str] = {}
        self.names: dict[int, str] = {}
        self.rounds_logged = 0
        self.started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.log_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        """Everything that can be wrong before anything starts, each with its fix."""
        store = RoundCheckpoints(self.home.run_dir / "checkpoints", keep=1)
        rounds = store.rounds()
        target = self.config.num_server_rounds
        if rounds and not self.resume:
            raise DeploymentError(
                f"{self.home.run_dir} already holds a run (round {rounds[-1]} of {target} committed); "
                "continue it with `fedvox-server start --resume`, or make a new home with `fedvox-server init`"
            )
        if self.resume and not rounds:  # so a service can always pass --resume
            log.info("--resume: %s holds no committed round yet; starting the run", self.home.run_dir)
            self.resume = False
        if rounds and rounds[-1] >= target:
            raise DeploymentError(
                f"the run in {self.home.run_dir} is complete (round {rounds[-1]} of {target}); export it with "
                f"`fedvox-server export`, or raise num-server-rounds in {self.home.run_config_file} and --resume"
            )
        names = [] if self.host in ANY_ADDRESS else [self.host]
        check_server_pair(self.home.server_cert, self.home.server_key, self.home.ca_cert, names)

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> int:
        """Start everything and watch the run; returns 0 when every round was committed."""
        self.check()
        self._lock()
        self._stop_leftovers()
        signal.signal(signal.SIGTERM, self._on_signal)
        try:
            ensure_link_certificate(self.home)
            self._start_superlink()
            self._stop_leftover_runs()
            for device, node_id in authorise(Registry(self.home), self.control):
                self.names[node_id] = device.name
            waiting = WaitingRoom(self.home)
            self.gateway = GatewayServer(
                FleetGateway(self.address, self.home.internal_ca, on_refused_key=waiting.note),
                self.host,
                self.port,
                self.home.server_cert,
                self.home.server_key,
            )
            self.gateway.start()
            self._start_dashboard()
            self._write_state()
            self.rounds_logged = len(self._metric_lines())  # rounds a previous start already reported
            flat = self.config.to_flat()
            self.run_id = self.control.start_run(app_directory(), flat)
            self._write_state()
            log.info(
                "run %d: %s %s (%s), %d rounds, min %d clients; %s %s",
                self.run_id,
                self.config.stage,
                self.config.model_config,
                self.config.subset,
                self.config.num_server_rounds,
                self.config.min_clients,
                "resuming" if self.resume else "starting",
                self.home.run_dir,
            )
            self.log_thread = threading.Thread(target=self._stream_serverapp_log, name="serverapp-log", daemon=True)
            self.log_thread.start()
            return self._watch()
        except KeyboardInterrupt:
            log.info("interrupted: stopping (continue later with --resume)")
            return 130
        finally:
            self._shutdown()

    def _on_signal(self, signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def _lock(self) -> None:
        self.home.state.mkdir(parents=True, exist_ok=True)
        self.lock_fd = os.open(self.home.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = self.home.running() or {}
            raise DeploymentError(
                f"a fedvox server already runs from {self.home.root} (pid {info.get('pid', '?')}); stop it first"
            ) from None

    def _stop_leftovers(self) -> None:
        """Processes of a previous ``start`` of this home that was killed: its SuperLink (if it
        outlived it) and ServerApps still retrying that SuperLink's address."""
        try:
            previous = json.loads(self.home.server_state.read_text())
        except (OSError, ValueError):
            return
        marks = [str(self.home.database), previous.get("superlink") or "-"]
        commands = ("flower-superlink", SUPERLINK_MODULE, "flower-superexec", "flwr-serverapp")
        for process in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if any(c in cmdline for c in commands) and any(m in cmdline for m in marks):
                log.warning(
                    "stopping %s (pid %d) left by a previous server", cmdline.split()[1].rsplit("/", 1)[-1], process.pid
                )
                stop_tree(process.pid)

    def _start_superlink(self) -> None:
        internal = free_port()
        self.address = f"127.0.0.1:{internal}"
        self.home.logs.mkdir(parents=True, exist_ok=True)
        command = [  # Flower's flower-superlink with the home's Control API token (control_auth)
            sys.executable,
            "-m",
            SUPERLINK_MODULE,
            "--ssl-ca-certfile",
            str(self.home.internal_ca),
            "--ssl-certfile",
            str(self.home.link_cert),
            "--ssl-keyfile",
            str(self.home.link_key),
            "--enable-supernode-auth",
            "--host",
            "127.0.0.1",
            "--port",
            str(internal),
            "--database",
            str(self.home.database),
            "--disable-runtime-dependency-installation",
            # ServerApps are launched by our own SuperExec, which proves itself with the home's
            # secret: the Runtime API then hands a run's task to no one else (_start_superexec)
            "--isolation",
            "process",
            "--superexec-auth-secret-file",
            str(self.home.superexec_secret),
        ]
        ensure_token(self.home.control_token)
        ensure_token(self.home.superexec_secret)
        env = {**flower_env(self.home.flwr_home), TOKEN_FILE_ENV: str(self.home.control_token)}
        self.superlink = self._spawn(command, env)
        log.info("SuperLink (pid %d) on %s, state in %s", self.superlink.pid, self.address, self.home.database)
        self.control = Control(self.address, self.home.internal_ca, self.home.control_token)
        deadline = time.monotonic() + SUPERLINK_START_S
        while True:
            if self.superlink.poll() is not None:
                raise DeploymentError(
                    f"the SuperLink exited with status {self.superlink.returncode}; see "
                    f"{self.home.logs / 'superlink.log'}"
                )
            try:
                self.control.runs()
                break
            except DeploymentError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        self._start_superexec()

    def _start_superexec(self) -> None:
        """Flower's SuperExec, which starts each run's ServerApp, authenticated to the SuperLink by
        the home's secret (the SuperLink would start an unauthenticated one itself)."""
        env = flower_env(self.home.flwr_home)
        command = [
            flower_command("flower-superexec", env),
            "--root-certificates",
            str(self.home.internal_ca),
            "--runtime-api-address",
            self.address,
            "--superexec-auth-secret-file",
            str(self.home.superexec_secret),
            "--parent-pid",
            str(self.superlink.pid),
        ]
        self.superexec = self._spawn(command, env)
        log.info("SuperExec (pid %d) authenticated by %s", self.superexec.pid, self.home.superexec_secret.name)

    def _spawn(self, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        """A Flower process of this server: its own session (a terminal's Ctrl-C reaches only us),
        killed with us, its output appended to the home's ``superlink.log``."""
        with open(self.home.logs / "superlink.log", "ab") as out:
            return subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.home.root,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )

    def _start_dashboard(self) -> None:
        """The live dashboard (:mod:`server.dashboard`): it reads the home and asks this SuperLink for
        its nodes; its register action authorises a waiting device at once."""
        if self.dashboard_at is None:
            return
        from fedvox.server.dashboard import serve_dashboard
        from fedvox.server.dashboard.view import open_source

        self.dashboard_control = Control(self.address, self.home.internal_ca, self.home.control_token)

        def nodes() -> tuple[list[SuperNode] | None, str]:
            try:
                return self.dashboard_control.nodes(), ""
            except DeploymentError:
                return None, "server not answering"

        def register(fingerprint: str, name: str) -> list[str]:
            lines = register_key(self.home, fingerprint, name, self.dashboard_control)
            for device, node_id in authorise(Registry(self.home), self.dashboard_control):
                self.names[node_id] = device.name
            return lines

        self.dashboard, url = serve_dashboard(open_source(self.home.root, nodes), *self.dashboard_at, register=register)
        log.info("dashboard: %s", url)

    def _stop_leftover_runs(self) -> None:
        """A server killed mid-run leaves its Flower run open in the database: close it."""
        for run in self.control.runs():
            if run.status != FINISHED:
                log.info("stopping run %d left %s by a previous server", run.run_id, run.status)
                self.control.stop_run(run.run_id)

    def _write_state(self, stopping: bool = False) -> None:
        """``state/server.json``; ``stopping``: the SuperLink is winding down (it waits for devices'
        connections to close, up to a minute), so commands read the home's files instead of asking it."""
        info = {
            "pid": os.getpid(),
            "host": self.host,
            "port": self.port,
            "superlink": self.address,
            "superlink-pid": self.superlink.pid if self.superlink else None,
            "run-id": self.run_id,
            "started": self.started,
            "stopping": stopping,
        }
        atomic_write_text(self.home.server_state, json.dumps(info, indent=1) + "\n")

    def _shutdown(self) -> None:
        began = time.monotonic()
        self.stopping.set()
        if self.lock_fd is not None and self.superlink is not None:
            self._write_state(stopping=True)
        if self.gateway is not None:
            self.gateway.stop()
        if self.dashboard is not None:
            self.dashboard.stop()
        if self.dashboard_control is not None:
            self.dashboard_control.close()
        if self.control is not None:  # an open connection would hold the SuperLink's shutdown
            self.control.close()
        stop_tree(*(p.pid for p in (self.superexec, self.superlink) if p is not None))
        self.home.server_state.unlink(missing_ok=True)
        if self.lock_fd is not None:
            os.close(self.lock_fd)
        if self.superlink is not None:
            log.info("server stopped in %.1f s", time.monotonic() - began)

    # ------------------------------------------------------------------ watching
    def _watch(self) -> int:
        while True:
            self.log_thread.join(timeout=POLL_S)  # ends with the run: then look at once
            if self.superlink.poll() is not None:
                raise DeploymentError(
                    f"the SuperLink exited ({self.superlink.returncode}); see {self.home.logs / 'superlink.log'}. "
                    "Restart with --resume"
                )
            if not self.gateway.alive():
                raise DeploymentError("the gateway stopped; restart with --resume")
            if self.superexec.poll() is not None:
                raise DeploymentError(
                    f"the SuperExec exited ({self.superexec.returncode}); see {self.home.logs / 'superlink.log'}. "
                    "Restart with --resume"
                )
            try:
                self._report_nodes(self.control.nodes())
                state = self.control.run(self.run_id)
            except DeploymentError as exc:  # a busy SuperLink can miss one poll
                log.warning("%s", exc)
                continue
            self._report_rounds()
            if state.status == FINISHED:
                self.log_thread.join(timeout=15)  # the ServerApp's last words (why it stopped)
                return self._finished(state)
            if not self.log_thread.is_alive():  # the stream ended a moment before the run's status
                time.sleep(0.5)

    def _report_nodes(self, nodes: list[SuperNode]) -> None:
        for node in nodes:
            before = self.statuses.get(node.node_id)
            if before == node.status:
                continue
            self.statuses[node.node_id] = node.status
            name = self.names.get(node.node_id) or node.name or f"node {node.node_id}"
            if node.status == "online":
                log.info("device %s (node %d) connected", name, node.node_id)
            elif before == "online":
                log.warning("device %s (node %d) disconnected (%s)", name, node.node_id, node.status)

    def _metric_lines(self) -> list[str]:
        """The complete lines of the run's ``metrics.jsonl`` (a line being appended is left for later)."""
        path = self.home.run_dir / "metrics.jsonl"
        text = path.read_text() if path.is_file() else ""
        return text[: text.rfind("\n") + 1].splitlines()

    def _report_rounds(self) -> None:
        lines = self._metric_lines()
        for line in lines[self.rounds_logged :]:
            if not line.strip():
                continue
            row = json.loads(line)
            parts = [f"round {row['round']} committed: {row.get('participants', 0)} participant(s)"]
            for key in ("val-loss", "epsilon-utterance-max", "epsilon-speaker-max"):
                if isinstance(row.get(key), (int, float)):
                    parts.append(f"{key} {row[key]:.4g}")
            if row.get("rejects"):
                parts.append(f"rejects {row['rejects']}")
            log.info(", ".join(parts))
        self.rounds_logged = len(lines)

    def _finished(self, state: Any) -> int:
        rounds = RoundCheckpoints(self.home.run_dir / "checkpoints", keep=1).rounds()
        done = rounds[-1] if rounds else 0
        target = self.config.num_server_rounds
        if state.sub_status == "completed" and done >= target:
            log.info(
                "run %d completed: %d rounds; export with `fedvox-server export %s`", self.run_id, done, self.home.root
            )
            return 0
        log.error(
            "run %d ended (%s) after round %d of %d%s; see %s, then --resume",
            self.run_id,
            state.sub_status or "?",
            done,
            target,
            f": {state.details}" if state.details else "",
            self.home.logs / "run.log",
        )
        return 1

    def _stream_serverapp_log(self) -> None:
        """The ServerApp's log (Flower keeps it in the SuperLink) into ``DIR/logs/run.log`` and the console."""
        control = Control(self.address, self.home.internal_ca, self.home.control_token)
        console = ServerAppConsole(self.names)
        after = 0.0
        try:
            with open(self.home.logs / "run.log", "a") as out:
                while not self.stopping.is_set():
                    try:
                        for response in control.client.StreamLogs(
                            StreamLogsRequest(run_id=self.run_id, after_timestamp=after)
                        ):
                            out.write(response.log_output)
                            out.flush()
                            for level, line in console.lines(response.log_output):
                                serverapp_log.log(level, "%s", line)
                            after = max(after, response.latest_timestamp)
                        return  # the run finished: Flower ends the stream
                    except Exception as exc:
                        log.debug("log stream interrupted: %s", exc)
                        self.stopping.wait(POLL_S)
        finally:
            control.close()


__all__ = ["ServerProcess", "app_directory"]
