"""Flower's SuperExec, started through fedvox's launcher, leaves no ``<defunct>`` app processes,
and stopping several process trees that ignore SIGTERM costs one timeout, not one per tree.

The fake SuperExec below starts its apps exactly as Flower's ``SubprocessExecutor.launch`` does
(a bare ``subprocess.Popen(args)``, dropped at once) and also holds one child it waits for, as
Flower's dependency installer does: that child's exit status must still reach it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from fedvox.shared.processes import flower_command, flower_env, stop_tree

APPS = 4

FAKE_SUPEREXEC = textwrap.dedent(
    f"""
    import subprocess, sys, time
    if sys.argv[1] == "reap":
        from fedvox.shared.processes import reap_abandoned_children
        reap_abandoned_children()
    held = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5); raise SystemExit(3)"])
    for _ in range({APPS}):
        subprocess.Popen([sys.executable, "-c", "pass"])  # Flower's launch: nobody keeps the Popen
    print("launched", flush=True)
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:  # Flower's main loop: poll the SuperLink, sleep
        time.sleep(0.2)
    print("held child exit status", held.wait(), flush=True)
    time.sleep(30)
    """
)


def _status(process: psutil.Process) -> str:
    """A process's state; a child reaped while we looked is as good as gone."""
    try:
        return process.status()
    except psutil.NoSuchProcess:
        return psutil.STATUS_DEAD


def _zombies_after_exit(mode: str) -> tuple[int, str]:
    """Zombie children of the fake SuperExec once all its apps have exited, and what it printed."""
    process = subprocess.Popen(
        [sys.executable, "-c", FAKE_SUPEREXEC, mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline()]
        lines.append(process.stdout.readline())  # after the held child is waited for
        deadline = time.monotonic() + 60  # a loaded machine may still be starting an app
        while True:
            states = [_status(child) for child in psutil.Process(process.pid).children()]
            settled = all(state in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD) for state in states)
            if settled or time.monotonic() > deadline:
                return states.count(psutil.STATUS_ZOMBIE), "".join(lines)
            time.sleep(0.2)
    finally:
        process.kill()
        process.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process states read from /proc")
def test_superexec_reaps_its_apps_and_keeps_the_held_childs_status() -> None:
    zombies, printed = _zombies_after_exit("reap")
    assert zombies == 0
    assert "held child exit status 3" in printed
    unreaped, _ = _zombies_after_exit("flower")  # the defect, without the reaper
    assert unreaped == APPS


def test_flower_env_starts_the_superexec_through_the_reaping_launcher(tmp_path: Path) -> None:
    env = flower_env(tmp_path / "flwr")
    superexec = shutil.which("flower-superexec", path=env["PATH"])
    assert superexec is not None and Path(superexec).parent == tmp_path / "flwr" / "bin"
    text = Path(superexec).read_text()
    assert text.startswith(f"#!{sys.executable}\n") and "reap_abandoned_children()" in text
    assert os.access(superexec, os.X_OK)
    subprocess.run([superexec, "--help"], env=env, check=True, capture_output=True, timeout=60)


STUBBORN = (
    "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
    "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)']); time.sleep(120)"
)


def test_stop_tree_stops_several_stubborn_trees_within_one_timeout() -> None:
    roots = [subprocess.Popen([sys.executable, "-c", STUBBORN]) for _ in range(3)]
    deadline = time.monotonic() + 30
    while any(len(psutil.Process(r.pid).children()) < 1 for r in roots) and time.monotonic() < deadline:
        time.sleep(0.1)
    everyone = [p for r in roots for p in (psutil.Process(r.pid), *psutil.Process(r.pid).children(recursive=True))]
    assert len(everyone) == 6
    started = time.monotonic()
    stop_tree(*(r.pid for r in roots), timeout=2.0)
    took = time.monotonic() - started
    for root in roots:
        root.wait(timeout=5)
    assert not [p for p in everyone if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert took < 5.0, f"stopping three trees took {took:.1f} s; one 2 s timeout each would be over 6 s"


def test_flower_processes_ask_again_for_a_missing_message_object_after_a_tenth_of_a_second(tmp_path: Path) -> None:
    env = flower_env(tmp_path / "flwr")
    for name in ("flower-supernode", "flwr-serverapp", "flwr-clientapp"):
        launcher = flower_command(name, env)
        assert Path(launcher).parent == tmp_path / "flwr" / "bin"
        assert "prompt_object_pulls()" in Path(launcher).read_text()
    code = (
        "import fedvox.shared.processes as p; from flwr.supercore.inflatable import inflatable_utils as u; "
        "f = (u.pull_objects, u.pull_and_inflate_object_from_tree); "
        "show = lambda: print([g.__kwdefaults__['initial_backoff'] for g in f]); show(); "
        "p.prompt_object_pulls(); show()"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.split("\n")[:2] == ["[1, 1]", "[0.1, 0.1]"], done.stdout + done.stderr
