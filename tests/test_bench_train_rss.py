"""bench.train_rss: the steady-state verdict on a run's resident set per step."""

import pytest
import typer

from bench.train_rss import verdict


def series(values: list[float]) -> dict[int, float]:
    return {step: value for step, value in enumerate(values, start=1)}


def test_warm_up_is_left_out_and_bounded_swings_are_flat():
    # warm-up climbs, then the heap swings +-2 % between releases with no trend (as after the fix)
    rss = series([500.0 + 10 * i for i in range(10)] + [800.0, 816.0, 800.0, 784.0] * 10)
    result = verdict(rss, warmup=10, window=8)
    assert result["flat"] and result["start_mib"] == 800.0 and result["max_over_start"] == pytest.approx(0.02)


def test_steady_growth_past_five_percent_is_not_flat():
    rss = series([800.0 + 0.7 * i for i in range(500)])  # 0.7 MiB per step: the growth before the fix
    result = verdict(rss, warmup=50, window=50)
    assert not result["flat"] and result["growth"] > 0.3


def test_a_single_step_past_five_percent_is_not_flat():
    rss = series([800.0] * 200)
    rss[150] = 845.0
    assert not verdict(rss, warmup=50, window=50)["flat"]


def test_a_run_too_short_for_two_windows_is_refused():
    with pytest.raises(typer.BadParameter):
        verdict(series([800.0] * 100), warmup=50, window=50)
