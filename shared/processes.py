"""Starting and stopping Flower's own processes (SuperLink, SuperNode) from fedvox commands.

Flower's processes start further processes by name (``flower-superexec``, then one
``flwr-serverapp`` per run or one ``flwr-clientapp`` per message), so they get this
interpreter's scripts first on ``PATH``, fedvox's offline environment (no telemetry, update
check or dependency installation) and their own ``FLWR_HOME``. They die with the fedvox command
that started them, stopping one stops everything below it, and the SuperExec reaps the app
processes it starts (Flower's own leaves them ``<defunct>``).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil

from fedvox.shared.atomic import atomic_write_text
from fedvox.shared.cli import OFFLINE_ENV


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment for a Flower process with its state in ``flwr_home``."""
    env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(flwr_home), "PYTHONUNBUFFERED": "1"}
    scripts = [str(_flower_launchers(flwr_home / "bin")), str(Path(sys.executable).parent)]
    env["PATH"] = os.pathsep.join([*scripts, env.get("PATH", "")])
    return env


def _flower_launchers(folder: Path) -> Path:
    """Flower's console scripts as launchers of *this* interpreter, in ``folder`` (0700).

    An environment that sees Flower without having its scripts (a virtual environment over the
    system's site packages) would find the system's scripts on ``PATH``; their interpreter has no
    fedvox, so the ServerApp and ClientApp could not import it. ``flower-superexec`` reaps its
    abandoned children first (:func:`reap_abandoned_children`).
    """
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for entry in importlib.metadata.distribution("flwr").entry_points:
        if entry.group != "console_scripts":
            continue
        reaper = "    import fedvox.shared.processes as p; p.reap_abandoned_children()\n"
        text = (  # guarded like pip's own scripts: a spawned worker re-imports the script as __mp_main__
            f"#!{sys.executable}\nimport importlib, sys\nif __name__ == '__main__':\n"
            + (reaper if entry.name == "flower-superexec" else "")
            + f"    sys.exit(importlib.import_module({entry.module!r}).{entry.attr}())\n"
        )
        script = folder / entry.name
        if not script.is_file() or script.read_text() != text:
            atomic_write_text(script, text)
            os.chmod(script, 0o700)
    return folder


def reap_abandoned_children() -> None:
    """Reap, as each child exits, the children this process started and then let go of.

    Flower's SuperExec starts every ``flwr-clientapp`` / ``flwr-serverapp`` with a bare
    ``subprocess.Popen(args)`` and drops the object, so nothing waits for it. CPython then keeps
    the dropped ``Popen`` in ``subprocess._active`` and reaps it only at the *next* ``Popen()``
    call: every app that finished since the last launch (all of them once a run ends) stays
    ``<defunct>`` until the SuperNode stops. On SIGCHLD this runs that same routine
    (``subprocess._cleanup``) at once. It polls only the dropped ``Popen`` objects, each through
    its own ``waitpid`` lock, so a child Flower still holds and waits for (``poll``/``wait``, e.g.
    a dependency install) keeps its exit status for Flower; a blanket ``waitpid(-1)`` or
    ``SIGCHLD = SIG_IGN`` would hand Flower status 0 for it instead (and ``SIG_IGN`` is inherited
    by the apps).
    """
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: subprocess._cleanup())  # type: ignore[attr-defined]


def flower_command(name: str) -> str:
    """A Flower console script of this interpreter's environment (else found on ``PATH``)."""
    script = Path(sys.executable).parent / name
    return str(script) if script.is_file() else name


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when the process that started it dies (Linux;
    elsewhere it outlives a killed parent until its own connection retries give up)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_tree(*pids: int, timeout: float = 10.0) -> None:
    """Stop processes and everything they started (a SuperLink's SuperExec and ServerApp retry
    their dead SuperLink for minutes otherwise): SIGTERM to all at once, then SIGKILL to whatever
    is left after ``timeout``, so stopping several trees costs one timeout, not one each."""
    processes: list[psutil.Process] = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            processes += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=5)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for a loopback-only service)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


__all__ = ["die_with_parent", "flower_command", "flower_env", "free_port", "reap_abandoned_children", "stop_tree"]
