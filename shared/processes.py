"""Starting and stopping Flower's own processes (SuperLink, SuperNode) from fedvox commands.

Flower's processes start further processes by name (``flower-superexec``, then one
``flwr-serverapp`` per run or one ``flwr-clientapp`` per message), so they get this
interpreter's scripts first on ``PATH``, fedvox's offline environment (no telemetry, update
check or dependency installation) and their own ``FLWR_HOME``. They die with the fedvox command
that started them, and stopping one stops everything below it.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import os
import signal
import socket
import sys
from pathlib import Path

import psutil

from fedvox.shared.atomic import atomic_write_text
from fedvox.shared.cli import OFFLINE_ENV


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment for a Flower process with its state in ``flwr_home``."""
    env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(flwr_home), "PYTHONUNBUFFERED": "1"}
    scripts = [str(Path(sys.executable).parent)]
    if not (Path(sys.executable).parent / "flower-superexec").is_file():
        scripts.insert(0, str(_flower_launchers(flwr_home / "bin")))
    env["PATH"] = os.pathsep.join([*scripts, env.get("PATH", "")])
    return env


def _flower_launchers(folder: Path) -> Path:
    """Flower's console scripts as launchers of *this* interpreter, in ``folder`` (0700).

    An environment that sees Flower without having its scripts (a virtual environment over the
    system's site packages) would find the system's scripts on ``PATH``; their interpreter has no
    fedvox, so the ServerApp and ClientApp could not import it.
    """
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for entry in importlib.metadata.distribution("flwr").entry_points:
        if entry.group != "console_scripts":
            continue
        text = (
            f"#!{sys.executable}\nimport importlib, sys\n"
            f"sys.exit(importlib.import_module({entry.module!r}).{entry.attr}())\n"
        )
        script = folder / entry.name
        if not script.is_file() or script.read_text() != text:
            atomic_write_text(script, text)
            os.chmod(script, 0o700)
    return folder


def flower_command(name: str) -> str:
    """A Flower console script of this interpreter's environment (else found on ``PATH``)."""
    script = Path(sys.executable).parent / name
    return str(script) if script.is_file() else name


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when the process that started it dies (Linux;
    elsewhere it outlives a killed parent until its own connection retries give up)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_tree(pid: int, timeout: float = 15.0) -> None:
    """Stop a process and everything it started (a SuperLink's SuperExec and ServerApp retry
    their dead SuperLink for minutes otherwise): SIGTERM, then SIGKILL after ``timeout``."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
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


__all__ = ["die_with_parent", "flower_command", "flower_env", "free_port", "stop_tree"]
