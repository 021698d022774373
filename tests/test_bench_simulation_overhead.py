"""bench.simulation_overhead: the cold start and the workers' idle time read off the train events."""

import pytest

from bench.simulation_overhead import timeline


def _event(round_: int, worker: int, started: float, host_s: float) -> dict:
    return {"round": round_, "worker": worker, "started": started, "host-s": host_s}


def test_idle_is_the_workers_time_without_a_message_between_a_rounds_first_message_and_last_reply():
    trained = [
        _event(1, 1, 110.0, 4.0),  # worker 1: 110-114, 114-118
        _event(1, 1, 114.0, 4.0),
        _event(1, 2, 110.5, 3.0),  # worker 2: 110.5-113.5, then waits until 118 (the barrier)
        _event(2, 1, 130.0, 2.0),
        _event(2, 2, 130.0, 2.0),
    ]
    figures = timeline(trained, began=100.0, workers=2, held=80.0)
    assert figures["cold_start_s"] == pytest.approx(10.0)
    assert figures["idle_s"] == pytest.approx([2 * 8.0 - 11.0, 0.0])
    assert figures["idle_share"] == pytest.approx(5.0 / 80.0)


def test_a_run_that_trained_nothing_has_no_timeline():
    assert timeline([], began=0.0, workers=2, held=10.0) == {"cold_start_s": None, "idle_share": None, "idle_s": []}
