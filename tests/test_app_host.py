"""The warm ClientApp host: ``flwr-clientapp`` launched through fedvox's launcher runs as a forked
child of the host (its arguments, streams, folder and exit status those of the launcher; its
environment, which /proc does not show for a fork, is checked by the deployment test), falls
back to Flower's own command when no host is ready, and dies with its launcher."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedvox.shared.app_host import HOST_ENV
from fedvox.shared.processes import flower_env, free_port, stop_tree

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork and /proc")


@pytest.fixture
def host(tmp_path: Path):
    env = flower_env(tmp_path / "flwr")
    sock = tmp_path / "host.sock"
    log = open(tmp_path / "host.log", "wb")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        [sys.executable, "-m", "fedvox.shared.app_host", str(sock)], stdout=log, stderr=log, env=env
    )
    deadline = time.monotonic() + 120
    while not sock.exists():
        assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "host.log").read_text()
        time.sleep(0.1)
    yield process, {**env, HOST_ENV: str(sock)}, tmp_path / "host.log"
    stop_tree(process.pid)
    log.close()


def _launcher(env: dict[str, str]) -> str:
    path = shutil.which("flwr-clientapp", path=env["PATH"])
    assert path is not None
    return path


def test_a_launch_runs_in_a_child_of_the_host_with_the_launchers_streams_and_status(host, tmp_path) -> None:
    _, env, log = host
    done = subprocess.run(
        [_launcher(env), "--token", "t", "--bogus"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "unrecognized arguments: --bogus" in done.stderr
    assert "flwr-clientapp" in done.stderr  # argparse's usage line: the child's argv[0]
    assert log.read_text().count("forked") == 1

    # Without a host (gone, or not ready yet) the launcher runs Flower's command itself, alike.
    alone = {**env, HOST_ENV: str(tmp_path / "missing.sock")}
    fallback = subprocess.run(
        [_launcher(alone), "--token", "t", "--bogus"], env=alone, capture_output=True, text=True, timeout=60
    )
    assert fallback.returncode == 2 and "unrecognized arguments: --bogus" in fallback.stderr
    assert log.read_text().count("forked") == 1


def test_the_child_has_the_launchers_folder_and_dies_with_it(host, tmp_path) -> None:
    process, env, _ = host
    folder = tmp_path / "cwd"
    folder.mkdir()
    args = ["--runtime-api-address", f"127.0.0.1:{free_port()}", "--insecure", "--token", "t"]  # nobody answers
    launcher = subprocess.Popen([_launcher(env), *args], env=env, cwd=folder)
    deadline = time.monotonic() + 60
    while not (children := psutil.Process(process.pid).children()):
        assert time.monotonic() < deadline and launcher.poll() is None
        time.sleep(0.1)
    child = children[0]
    while child.cwd() != str(folder):  # visible from the fork on; it changes folder a moment later
        assert time.monotonic() < deadline and child.is_running(), child.cwd()
        time.sleep(0.05)
    assert child.is_running() and launcher.poll() is None
    os.kill(launcher.pid, signal.SIGKILL)  # the SuperExec's process is gone: so is the ClientApp
    launcher.wait()
    psutil.wait_procs([child], timeout=15)
    assert not child.is_running()
    assert process.poll() is None  # the host stays for the next message
