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
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil

from fedvox.shared.atomic import atomic_write_text
from fedvox.shared.cli import OFFLINE_ENV

PROMPT_ENV = {
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.5",
    "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS": "8",
    "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES": "8",
}
"""Flower's waits and parallelism where it reads them from the environment: a SuperExec asks for a
new task to launch every 0.5 s (Flower: 1 s; each ask is a request, so a tenth of a second costs a
small machine more than it saves), and a message's objects (one HTTP request each: an update of 24
tensors is about 30) travel 8 at a time instead of 2."""


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment for a Flower process with its state in ``flwr_home``."""
    env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(flwr_home), "PYTHONUNBUFFERED": "1", **PROMPT_ENV}
    scripts = [str(_flower_launchers(flwr_home / "bin")), str(Path(sys.executable).parent)]
    env["PATH"] = os.pathsep.join([*scripts, env.get("PATH", "")])
    return env


PROMPT_PULLS = "    import fedvox.shared.processes as p; p.prompt_object_pulls()\n"
LAUNCHER_PREAMBLES = {
    "flower-superexec": "    import fedvox.shared.processes as p; p.reap_abandoned_children()\n",
    "flower-supernode": PROMPT_PULLS,
    "flwr-serverapp": PROMPT_PULLS,
    "flwr-clientapp": (  # forked from the device's warm ClientApp host when it runs
        "    from fedvox.shared.app_host import launch\n"
        "    status = launch(sys.argv[1:])\n"
        "    if status is not None:\n"
        "        sys.exit(status)\n" + PROMPT_PULLS
    ),
}
"""What a launcher does before Flower's own command (which then runs as it would have)."""


def _flower_launchers(folder: Path) -> Path:
    """Flower's console scripts as launchers of *this* interpreter, in ``folder`` (0700).

    An environment that sees Flower without having its scripts (a virtual environment over the
    system's site packages) would find the system's scripts on ``PATH``; their interpreter has no
    fedvox, so the ServerApp and ClientApp could not import it. ``flower-superexec`` reaps its
    abandoned children first (:func:`reap_abandoned_children`); ``flwr-clientapp`` is forked from
    the device's ClientApp host where one runs (:mod:`shared.app_host`).
    """
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for entry in importlib.metadata.distribution("flwr").entry_points:
        if entry.group != "console_scripts":
            continue
        text = (  # guarded like pip's own scripts: a spawned worker re-imports the script as __mp_main__
            f"#!{sys.executable}\nimport importlib, sys\nif __name__ == '__main__':\n"
            + LAUNCHER_PREAMBLES.get(entry.name, "")
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


PULL_BACKOFF_S = 0.1
"""The first wait before asking again for a message object that is not there yet (Flower's: 1 s)."""


def prompt_object_pulls() -> None:
    """Ask again for a missing message object after 0.1 s, not 1 s (then 2 s, 4 s... in Flower).

    A Flower message travels as a header and then its objects, and every receiver can see the
    header first: the SuperNode pulls a message's objects from the SuperLink after it took the
    message (and after its SuperExec already launched the ClientApp, which pulls them from the
    SuperNode), and the ServerApp pulls a reply's objects while the SuperNode may still be pushing
    them. A miss costs Flower's initial backoff of 1 s, a second 2 s more: on a small machine most
    of a round's transport time went to these waits for objects that arrive in a fraction of a
    second. Flower exposes no setting, so the first wait of its pull (still doubling up to its
    cap, with its limits on tries and time) is shortened in the processes fedvox starts.
    """
    from flwr.supercore.inflatable import inflatable_utils

    for pull in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = pull.__kwdefaults__ or {}
        if "initial_backoff" in defaults:  # Flower 1.41's signature; otherwise Flower's own waits stand
            defaults["initial_backoff"] = PULL_BACKOFF_S


def flower_command(name: str, env: dict[str, str]) -> str:
    """A Flower console script as ``env`` (:func:`flower_env`) finds it: fedvox's launcher first."""
    return shutil.which(name, path=env.get("PATH")) or name


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


__all__ = [
    "die_with_parent",
    "flower_command",
    "flower_env",
    "free_port",
    "prompt_object_pulls",
    "reap_abandoned_children",
    "stop_tree",
]
