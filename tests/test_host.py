"""A training process's set-up: torch's threads and glibc's allocator thresholds."""

from __future__ import annotations

import platform

import pytest
import torch

from fedvox.client import host


def test_the_users_allocator_settings_win(monkeypatch) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(host, "mallopt", lambda parameter, value: calls.append((parameter, value)) or True)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert host.keep_freed_memory() is False
    assert calls == []


def test_thresholds_are_set_from_the_start(monkeypatch) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(host, "mallopt", lambda parameter, value: calls.append((parameter, value)) or True)
    for name in host.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert host.keep_freed_memory() is True
    assert calls == [(host.M_MMAP_THRESHOLD, host.MMAP_THRESHOLD), (host.M_TRIM_THRESHOLD, host.TRIM_THRESHOLD)]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_accepts_the_thresholds() -> None:
    assert host.mallopt(host.M_TRIM_THRESHOLD, host.TRIM_THRESHOLD)
    assert host.mallopt(host.M_MMAP_THRESHOLD, host.MMAP_THRESHOLD)


def test_threads_are_set_and_none_keeps_torchs(monkeypatch) -> None:
    before = torch.get_num_threads()
    try:
        host.prepare_training_process(1)
        assert torch.get_num_threads() == 1
        host.prepare_training_process(None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
