"""A server killed with SIGKILL mid-round resumes from its last commit, charging nothing twice."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from fedvox.server.checkpoints import RoundCheckpoints
from fedvox.server.run import FederatedRun
from fedvox.shared.privacy.ledger import Ledger
from tests.federation_kit import LocalGrid, initial_state, kill_test_config, make_client_app

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 4
HOLD_ROUND = 3


def _server(run_dir: Path, clients: Path, *hold: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = [sys.executable, "-m", "tests.federation_kit", str(run_dir), str(clients), str(ROUNDS), *map(str, hold)]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"server exited early ({process.returncode}): {process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{path.name} did not appear within {timeout} s")
        time.sleep(0.05)


def _ledger(folder: Path, unit: str) -> list[tuple[int, str, float]]:
    with Ledger(folder) as ledger:
        return [(r.round, r.client_id, r.epsilon) for r in ledger.rows(unit=unit)]


@pytest.mark.slow
def test_a_killed_server_resumes_without_aggregating_or_charging_anything_twice(tmp_path):
    # The reference: the same federation, same seed, never interrupted (in process).
    reference = FederatedRun(kill_test_config(tmp_path / "ref", ROUNDS), initial_state(), seed=7)
    reference.execute(LocalGrid(make_client_app(tmp_path / "ref-clients"), num_nodes=4))

    run_dir, clients = tmp_path / "run", tmp_path / "clients"
    first = _server(run_dir, clients, HOLD_ROUND)
    _wait_for(run_dir / "holding", first)  # round 3 trained by its clients, not yet aggregated
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    committed = sorted(p.name for p in (run_dir / "checkpoints").glob("round-*.json"))
    assert committed == ["round-00001.json", "round-00002.json"]  # keep-checkpoints = 2

    second = _server(run_dir, clients)
    assert second.wait(timeout=300) == 0, second.stderr.read()[-2000:]

    # Every round aggregated and logged exactly once, and the model is the uninterrupted one.
    rounds = [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4]
    uninterrupted, resumed = reference.store.latest(), RoundCheckpoints(run_dir / "checkpoints", 2).latest()
    assert uninterrupted.round == resumed.round == ROUNDS
    for name, value in uninterrupted.state.items():
        assert torch.equal(resumed.state[name], value), name
    assert resumed.strategy_state.keys() == uninterrupted.strategy_state.keys() != set()  # FedAdam moments
    for name, value in uninterrupted.strategy_state.items():
        assert torch.equal(resumed.strategy_state[name], value), name

    # Speaker level: one row per (round, eligible speaker), epsilons as if never interrupted.
    speaker = _ledger(run_dir, "speaker")
    assert speaker == _ledger(tmp_path / "ref", "speaker")
    assert Counter((r, c) for r, c, _ in speaker) == Counter((r, f"speaker-{p}") for r in range(1, 5) for p in range(4))

    # Utterance level: clients released round 3 twice (the lost attempt's updates did leave the
    # device), so they were charged twice for it, and once for every other round.
    for partition in range(4):
        killed = Counter(r for r, _, _ in _ledger(clients / f"client-{partition}", "utterance"))
        uninterrupted = Counter(r for r, _, _ in _ledger(tmp_path / "ref-clients" / f"client-{partition}", "utterance"))
        assert killed - uninterrupted == (Counter({HOLD_ROUND: 1}) if uninterrupted[HOLD_ROUND] else Counter())
        assert uninterrupted - killed == Counter()
