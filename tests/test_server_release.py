"""Speaker-level DP: the server charges a round before any message carries the model it released.

Flower sends the new global model with the round's evaluate messages (and the next round's train
messages). If the server crashed after that broadcast but before its ledger rows were written, a
restart redid the round with new noise under the same ledger key: two releases, one charge.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import pytest
from flwr.app import Message

from fedvox.server.run import FederatedRun
from fedvox.shared.privacy.ledger import Ledger
from fedvox.shared.protocol import ARRAYS, CONFIG, SERVER_ROUND
from fedvox.shared.runconfig import RunConfig
from tests.federation_kit import LocalGrid, initial_state, make_client_app
from tests.tiny import TINY

CRASH_ROUND = 2


class Crash(BaseException):
    """The server process dies (nothing in the run may catch it)."""


class CrashingGrid(LocalGrid):
    """Dies right after it has sent round ``crash_round``'s evaluate messages (the model has left)."""

    def __init__(self, *args: object, crash_round: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.crash_round = crash_round

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        first = next(iter(self.sent[-1:]), None)
        if first is not None and first.metadata.message_type == "evaluate" and _round(first) == self.crash_round:
            raise Crash
        return replies


def _round(message: Message) -> int:
    return int(message.content.config_records[CONFIG][SERVER_ROUND])


def _releases(sent: list[Message]) -> dict[int, set[str]]:
    """Per round, the distinct global models that left the server after its aggregation: in that
    round's evaluate messages and the next round's train messages."""
    out: dict[int, set[str]] = defaultdict(set)
    for message in sent:
        if ARRAYS not in message.content.array_records:
            continue
        released = _round(message) - (message.metadata.message_type == "train")
        digest = hashlib.sha256()
        for name, array in sorted(message.content.array_records[ARRAYS].items()):
            digest.update(name.encode() + array.data)
        out[released].add(digest.hexdigest())
    return out


@pytest.fixture
def config(tmp_path):
    return RunConfig.from_flat(
        {
            **TINY,
            "checkpoint-dir": str(tmp_path / "run"),
            "num-server-rounds": 3,
            "local-steps": 1,
            "min-clients": 2,
            "clients-per-round": 2,
            "wire-precision": "fp32",
            "client-budget-epsilon": 50.0,
            "evaluate": True,
            "speaker-dp.enabled": True,
            "speaker-dp.noise-multiplier": 0.5,
            "speaker-dp.clip-norm": 1.0,
        }
    )


def test_a_crash_after_the_broadcast_cannot_release_a_round_twice_under_one_charge(tmp_path, config):
    first = CrashingGrid(make_client_app(tmp_path / "clients"), num_nodes=3, crash_round=CRASH_ROUND)
    with pytest.raises(Crash):
        FederatedRun(config, initial_state(), seed=1).execute(first)
    second = LocalGrid(make_client_app(tmp_path / "clients"), num_nodes=3)
    assert FederatedRun(config, initial_state(), seed=2).execute(second) == 3

    with Ledger(tmp_path / "run") as ledger:
        rows = ledger.rows(unit="speaker")
    charges: dict[int, set[str]] = defaultdict(set)  # per round, the distinct releases charged
    for row in rows:
        charges[row.round].add(row.run_id)
    releases = _releases(first.sent + second.sent)
    assert set(releases) >= {1, 2, 3}
    for server_round, models in releases.items():
        if server_round > 0:
            assert len(models) <= len(charges[server_round]), f"round {server_round}: {len(models)} releases"
    assert len(releases[CRASH_ROUND]) == 1  # committed before the broadcast: the restart goes on, not redoes
    speakers = {row.client_id for row in rows}
    for server_round in (1, 2, 3):  # every eligible speaker charged once per release
        assert sum(row.round == server_round for row in rows) == len(speakers) * len(charges[server_round])
