"""Suite-wide settings.

One torch thread per test process: the suite runs on 2 cores, most tensors here are tiny, and
OpenMP threads spinning against each other (or against subprocesses a test starts) made some
tests 20x slower than with one thread.
"""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fedvox_home(tmp_path_factory, monkeypatch):
    """Each test its own fedvox home: it records which ledger each set of recordings is charged in."""
    monkeypatch.setenv("FEDVOX_HOME", str(tmp_path_factory.mktemp("fedvox-home")))
