"""A warm host for Flower's per-message app processes: each ``flwr-clientapp`` is forked from it.

Flower 1.41's SuperNode answers every message with a new ``flwr-clientapp`` process (its
SuperExec starts one per task; ``--isolation process`` only moves that SuperExec out of the
SuperNode: ``run_clientapp`` still handles one message and exits). Each one imports Python,
torch and the app again, several seconds a message on a small CPU. The host imports them once;
the ``flwr-clientapp`` launcher (:func:`shared.processes.flower_env`'s scripts) hands its
command line, environment, working folder and standard streams over a Unix socket, and the host
forks a child that runs Flower's own ``flwr-clientapp`` with them. Everything Flower does per
message is unchanged: one process per message, its token, heartbeat, parent monitor and exit
status, which the launcher returns as its own. Only the import is shared, copy-on-write.

- The socket is made by the device's user in its 0700 device folder, mode 0600: only that user
  (who can run anything as itself anyway) can ask for a ClientApp.
- The imports' objects are frozen (``gc.freeze``) before the first fork: a child's garbage
  collector never walks them, so their pages stay shared instead of being copied into it.
- A child gets fresh random state: Python's ``random`` reseeds itself at fork, numpy is reseeded
  from the OS, and torch's generator is reset to its initial seed, as in a new process (fedvox
  draws its noise from the OS, never from these: :mod:`shared.privacy.noise`).
- The host runs no torch operation and initialises no GPU (a forked CUDA context is unusable):
  each child starts as clean as a new process.
- A child dies with its launcher (the SuperExec's process: the socket closes), with the host
  (``PR_SET_PDEATHSIG``) and, by Flower's own monitor, with the SuperExec.
- If the host is not running or not ready, the launcher runs Flower's ``flwr-clientapp`` itself.
- A child retries missing message objects after 0.1 s, not 1 s, as every Flower process fedvox
  starts does (:func:`shared.processes.prompt_object_pulls`): Flower launches the ClientApp
  before its SuperNode holds them, which only a slow start hid.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path

from fedvox.shared.processes import prompt_object_pulls

log = logging.getLogger(__name__)

HOST_ENV = "FEDVOX_APP_HOST"
"""The host's socket path, in the environment of the SuperNode (and so of its launchers)."""
LAUNCHED_ENV = "FEDVOX_APP_LAUNCHED"
"""When the launcher started (seconds since the epoch), in the child's environment."""
FORKED_ENV = "FEDVOX_APP_FORKED"
"""When the host forked the child (seconds since the epoch), in the child's environment."""
MAX_REQUEST = 1 << 20
ENTRY = ("flwr.supernode.cli.flwr_clientapp", "flwr_clientapp")
"""The Flower command a child runs (``flwr-clientapp``'s console script)."""


# ---------------------------------------------------------------------- the launcher side
def launch(argv: list[str]) -> int | None:
    """Run ``flwr-clientapp argv`` in a child of the host; its exit status, or ``None`` when no
    host is ready (the caller then runs Flower's own command)."""
    launched = time.time()
    path = os.environ.get(HOST_ENV)
    if not path:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    request = json.dumps(
        {"argv": argv, "cwd": os.getcwd(), "env": {**os.environ, LAUNCHED_ENV: repr(launched)}}
    ).encode()
    with sock:
        socket.send_fds(sock, [struct.pack("!I", len(request)) + request], [0, 1, 2])
        child = _read_int(sock)
        if child is None:
            return None  # the host refused (shutting down): nothing ran
        for signum in (signal.SIGTERM, signal.SIGINT):  # Flower stops its app by signalling its process
            signal.signal(signum, lambda s, _f: _forward(child, s))
        status = _read_int(sock)
    return 1 if status is None else status


def _forward(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _read_int(sock: socket.socket) -> int | None:
    data = b""
    while len(data) < 4:
        chunk = sock.recv(4 - len(data))
        if not chunk:
            return None
        data += chunk
    return struct.unpack("!i", data)[0]


# ---------------------------------------------------------------------- the host side
def serve(path: Path, preload: list[str]) -> None:
    """Import ``preload`` (and Flower's command), then fork a child per launcher until SIGTERM."""
    for module in [ENTRY[0], *preload]:
        importlib.import_module(module)
    gc.freeze()  # the imports' objects: never scanned by a child's collector, so never copied into it
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(str(path))  # 0600 from the start
    finally:
        os.umask(old)
    listener.listen(16)
    stopping = threading.Event()

    def stop(_signum: int, _frame: object) -> None:
        stopping.set()
        listener.close()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("ClientApp host ready (pid %d): %s preloaded", os.getpid(), ", ".join(preload) or "Flower")
    try:
        while not stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                break
            try:
                request, fds = _receive(conn)
            except (OSError, ValueError) as exc:
                log.warning("ignoring a malformed ClientApp launch: %s", exc)
                conn.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the child: never returns
                listener.close()
                conn.close()
                _child(request, fds)
            for fd in fds:
                os.close(fd)
            log.info("flwr-clientapp %d forked", pid)
            threading.Thread(target=_watch, args=(conn, pid), daemon=True).start()
    finally:
        path.unlink(missing_ok=True)


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    header, fds, _, _ = socket.recv_fds(conn, 4 + MAX_REQUEST, 3)
    if len(header) < 4 or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError("expected a request and three streams")
    (size,) = struct.unpack("!I", header[:4])
    body = header[4:]
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            break
        body += chunk
    try:
        return json.loads(body), fds
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise


def _watch(conn: socket.socket, pid: int) -> None:
    """Tell the launcher its child's pid, then its exit status; stop the child if the launcher goes."""
    gone = threading.Event()

    def launcher_gone() -> None:
        with contextlib.suppress(OSError):
            while conn.recv(1):
                pass
        if not gone.is_set():
            _forward(pid, signal.SIGTERM)

    with conn:
        with contextlib.suppress(OSError):
            conn.sendall(struct.pack("!i", pid))
        threading.Thread(target=launcher_gone, daemon=True).start()
        _, status = os.waitpid(pid, 0)
        gone.set()
        with contextlib.suppress(OSError):
            conn.sendall(struct.pack("!i", os.waitstatus_to_exitcode(status)))


def _child(request: dict, fds: list[int]) -> None:
    """Become the launcher's ``flwr-clientapp``: its streams, folder, environment and arguments."""
    code, forked = 1, time.time()
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        _die_with_host()
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update({**request["env"], FORKED_ENV: repr(forked)})
        _fresh_random_state()
        prompt_object_pulls()
        sys.argv = ["flwr-clientapp", *request["argv"]]
        module, attr = ENTRY
        getattr(importlib.import_module(module), attr)()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        logging.getLogger(__name__).exception("the ClientApp failed")
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _die_with_host() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _fresh_random_state() -> None:
    """What a new process would start with (Python's ``random`` reseeds itself at fork)."""
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        torch.manual_seed(torch.initial_seed())


def main() -> None:
    """``python -m fedvox.shared.app_host SOCKET MODULE...``"""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    serve(Path(sys.argv[1]), sys.argv[2:])


if __name__ == "__main__":
    main()


__all__ = ["FORKED_ENV", "HOST_ENV", "LAUNCHED_ENV", "launch", "serve"]
