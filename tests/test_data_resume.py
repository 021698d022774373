"""A prepare killed mid-run leaves only whole files and resumes to exactly the uninterrupted result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedvox.client.data.prepare import prepare
from fedvox.shared.semantic import tokenizer_spec
from tests.data_fixtures import write_good_set

pytestmark = pytest.mark.slow

CLIENT = Path(sys.executable).with_name("fedvox-client")


def _prepare(list_file: Path, out: Path, workers: int = 1):
    return prepare(
        list_file, out, tokenizer=tokenizer_spec(), symbols_version="v2", workers=workers, show_progress=False
    )


def _snapshot(out: Path) -> dict[str, bytes]:
    files = {path.name: path.read_bytes() for path in (out / "items").iterdir()}
    return files | {"index.json": (out / "index.json").read_bytes()}


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> tuple[Path, Path]:
    """60 pseudo-speech utterances and their uninterrupted cache."""
    root = tmp_path_factory.mktemp("many")
    list_file = write_good_set(root / "data", source="pseudo", repeat=10)
    _prepare(list_file, root / "reference")
    return list_file, root / "reference"


def test_killed_prepare_resumes_where_it_stopped(many, tmp_path):
    list_file, reference = many
    total = len(list_file.read_text().splitlines())
    out = tmp_path / "out"
    process = subprocess.Popen(
        [str(CLIENT), "prepare", str(list_file), "--out", str(out), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            if len(list((out / "items").glob("*.safetensors"))) >= 3:
                break
            time.sleep(0.002)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "prepare finished before it could be killed"

    done = sorted((out / "items").glob("*.safetensors"))
    assert 3 <= len(done) < total and not (out / "index.json").exists()
    for path in done:  # whole files only: every item parses, with all its tensors
        assert set(load_file(path)) == {"wave", "semantic_ids", "phoneme_ids"}

    resumed = _prepare(list_file, out)
    assert (resumed.reused, resumed.featurised) == (len(done), total - len(done))
    assert not list((out / "items").glob("*.tmp"))
    assert _snapshot(out) == _snapshot(reference)


def test_worker_processes_give_the_same_cache(many, tmp_path):
    list_file, reference = many
    report = _prepare(list_file, tmp_path / "pool", workers=2)
    assert report.workers == 2 and report.featurised == 60
    assert _snapshot(tmp_path / "pool") == _snapshot(reference)
