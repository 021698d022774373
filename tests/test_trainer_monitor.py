"""The training monitor's memory readings: a leak grows the anonymous resident set."""

from pathlib import Path

import pytest
import torch

from fedvox.client.dp.monitor import peak_memory


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="the current resident set is read on Linux")
def test_a_held_allocation_shows_in_the_anonymous_resident_set():
    before = peak_memory(torch.device("cpu"))
    held = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page written
    after = peak_memory(torch.device("cpu"))
    assert 0 < after["rss_anon_mib"] <= after["rss_mib"] <= after["peak_rss_mib"] + 1
    assert after["rss_anon_mib"] - before["rss_anon_mib"] == pytest.approx(64, abs=8)
    del held
