"""bench/deploy_round splits a round by the run's own records: the server's ``server-s`` and the
critical device's message times (the device whose train reply ended last), transport the rest."""

from __future__ import annotations

import json
from pathlib import Path

from bench.deploy_round import split_rounds
from fedvox.client.message_times import TIMES_FILE, MessageClock, read_times


def _write(folder: Path, *rows: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / TIMES_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn')
    return folder


def _message(kind: str, round: int, launched: float, started: float, ended: float, training: float) -> dict:
    return {"kind": kind, "round": round, "launched": launched, "forked": launched + 0.1, "started": started,
            "ended": ended, "training_s": training, "run_id": "r"}  # fmt: skip


def test_a_round_is_split_along_the_device_that_answered_last(tmp_path) -> None:
    alice = _write(
        tmp_path / "alice",
        _message("query", 1, 100.0, 101.0, 102.0, 0.0),
        _message("train", 1, 105.0, 106.0, 110.0, 2.0),
        _message("train", 2, 120.0, 120.5, 124.0, 1.5),
    )
    bob = _write(
        tmp_path / "bob",
        _message("query", 1, 100.0, 103.0, 104.0, 0.0),
        _message("train", 1, 105.0, 109.0, 115.0, 3.0),  # ends last in round 1
        _message("train", 2, 120.0, 121.0, 123.0, 1.0),
    )
    run = {
        "rounds": [
            {"round": 1, "round-time-s": 20.0, "server-s": 0.5},
            {"round": 2, "round-time-s": 8.0, "server-s": 0.2},
        ],
        "devices": {"alice": alice, "bob": bob},
    }
    first, second = split_rounds(run)
    assert first["messages_per_device"] == 2
    assert (first["process_s"], first["setup_s"], first["training_s"]) == (3.0 + 4.0, 1.0 + 3.0, 3.0)  # bob's
    assert first["transport_s"] == 20.0 - 0.5 - 7.0 - 4.0 - 3.0 and first["outside_training_s"] == 17.0
    assert (second["process_s"], second["setup_s"], second["training_s"]) == (0.5, 2.0, 1.5)  # alice's
    assert abs(second["devices"]["alice"]["handoff_s"] - 0.1) < 1e-9


def test_a_message_clock_keeps_its_line_on_the_device_only_where_there_is_a_log_folder(tmp_path) -> None:
    clock = MessageClock("train", run_id="r", round=3, training_s=1.25)
    clock.record(None)  # no folder (a simulation): nothing written anywhere
    clock.record(tmp_path / "logs")
    (row,) = read_times(tmp_path / "logs")
    assert row["kind"] == "train" and row["round"] == 3 and row["training_s"] == 1.25
    assert row["launched"] <= row["started"] <= row["ended"] and row["forked"] == 0.0
