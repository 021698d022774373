"""`fedvox-client train`: local DP fine-tuning, kill and resume, budget refusal, synthesis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from fedvox.client.cli import app
from fedvox.client.identity import identity
from fedvox.client.synthesize import load_models
from fedvox.shared.errors import ConfigError
from fedvox.shared.models.factory import build_model, export_fedvox
from fedvox.shared.models.interop import load_safetensors
from fedvox.shared.models.subsets import SubsetSpec
from fedvox.shared.privacy.ledger import Ledger
from tests.prepared import prepared_cache

TRAIN = [
    "train",
    "--stage",
    "s1",
    "--steps",
    "6",
    "--checkpoint-every",
    "2",
    "--noise-multiplier",
    "1.0",
    "--logical-batch",
    "4",
    "--seed",
    "3",
    "--budget-epsilon",
    "50",
    "--device",
    "cpu",
    "--physical-batch",
    "4",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_cache(tmp_path_factory.mktemp("local"))


def _cli(*args: str, home: Path | None = None) -> subprocess.Popen:
    code = "from fedvox.client.cli import main; main()"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"FEDVOX_HOME": str(home)} if home else {})}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("privacy_ledger.sqlite*", "identity.json"))
    return dst


def test_killed_run_resumes_without_double_charging(data, tmp_path):
    whole_data, killed_data = _copy(data, tmp_path / "whole"), _copy(data, tmp_path / "killed")
    # The same recordings: the uninterrupted run is another owner's (another home), or it is refused.
    assert (
        _cli(*TRAIN, "--data", str(whole_data), "--out", str(tmp_path / "w"), home=tmp_path / "other").wait(timeout=600)
        == 0
    )

    proc = _cli(*TRAIN, "--data", str(killed_data), "--out", str(tmp_path / "k"))
    deadline = time.time() + 600
    while not (tmp_path / "k" / "checkpoints" / "step-00000002.pt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "k" / "summary.json").exists()
    resumed = _cli(*TRAIN, "--data", str(killed_data), "--out", str(tmp_path / "k"))
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read().decode()[-2000:]

    whole_rows, killed_rows = Ledger(whole_data).rows(), Ledger(killed_data).rows()
    assert [r.round for r in killed_rows] == [1, 2, 3]
    assert [r.epsilon for r in killed_rows] == pytest.approx([r.epsilon for r in whole_rows])
    whole, _ = load_safetensors(tmp_path / "w" / "subset.safetensors")
    killed, _ = load_safetensors(tmp_path / "k" / "subset.safetensors")
    for key in whole:
        assert torch.allclose(whole[key], killed[key], atol=1e-6), key


def test_budget_refusal_is_one_clear_error_and_trains_nothing(data, tmp_path):
    folder = _copy(data, tmp_path / "d")
    result = CliRunner().invoke(
        app,
        [
            *TRAIN[:-8],
            "--budget-epsilon",
            "0.5",
            "--seed",
            "1",
            "--device",
            "cpu",
            "--data",
            str(folder),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code != 0
    assert "budget" in str(result.exception) + result.output
    assert Ledger(folder).rows() == []
    # nothing was trained under the refused settings, so the same --out takes new ones
    retry = CliRunner().invoke(
        app,
        [
            *TRAIN[:-8],
            "--budget-epsilon",
            "50",
            "--seed",
            "1",
            "--device",
            "cpu",
            "--data",
            str(folder),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert retry.exit_code == 0, retry.output
    assert [r.round for r in Ledger(folder).rows()] == [1, 2, 3]
    changed = CliRunner().invoke(
        app,
        [
            *TRAIN[:-8],
            "--budget-epsilon",
            "50",
            "--seed",
            "1",
            "--device",
            "cpu",
            "--learning-rate",
            "0.01",
            "--data",
            str(folder),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert changed.exit_code != 0 and "other settings" in str(changed.exception) + changed.output


def test_train_holds_to_the_owner_budget_and_delta_that_prepare_recorded(data, tmp_path):
    folder, runner = _copy(data, tmp_path / "d"), CliRunner()
    listed = data.parent / "recordings" / "good.list"
    prepare = ["prepare", str(listed), "--out", str(folder)]  # reuses the copied features
    prepared = runner.invoke(app, [*prepare, "--budget-epsilon", "20", "--delta", "1e-6"])
    assert prepared.exit_code == 0, prepared.output
    client_id = identity(folder).client_id
    assert (Ledger(folder).owner_budget(client_id).epsilon, Ledger(folder).owner_budget(client_id).delta) == (20, 1e-6)

    run = [*TRAIN[:-8], "--seed", "1", "--device", "cpu", "--data", str(folder)]
    trained = runner.invoke(app, [*run, "--out", str(tmp_path / "o")])
    assert trained.exit_code == 0, trained.output
    assert "at delta 1e-06" in trained.output
    assert [r.delta for r in Ledger(folder).rows()] == [1e-6] * 3  # the owner's delta, not train's default

    for flags, why in (
        (["--budget-epsilon", "30"], "--budget-epsilon 30 is above the owner's budget 20"),
        (["--delta", "1e-5"], "--delta 1e-05 differs from the owner's delta 1e-06"),
    ):
        refused = runner.invoke(app, [*run, *flags, "--out", str(tmp_path / "refused")])
        assert refused.exit_code != 0 and why in str(refused.exception) + refused.output
        assert not (tmp_path / "refused").exists() and len(Ledger(folder).rows()) == 3

    # raising is the owner's act: prepare again (append-only budget rows); unset values keep the recorded ones
    assert runner.invoke(app, [*prepare, "--budget-epsilon", "30"]).exit_code == 0
    assert runner.invoke(app, prepare).exit_code == 0
    raised = Ledger(folder).owner_budget(client_id)
    assert (raised.epsilon, raised.delta) == (30, 1e-6)


def test_synthesize_speaks_with_trained_models(data, tmp_path):
    folder = _copy(data, tmp_path / "d")
    runner = CliRunner()
    trained = runner.invoke(app, [*TRAIN, "--data", str(folder), "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    export_fedvox("s2", build_model("s2", "tiny", SubsetSpec(kind="full")), tmp_path / "s2")
    reference = next((data.parent / "recordings").glob("*.wav"))
    out = tmp_path / "spoken.wav"
    # a training run's folder is enough: its export/fedvox/ model is found (not also export/gpt-sovits/)
    result = runner.invoke(
        app,
        [
            "synthesize",
            "--model",
            str(tmp_path / "run"),
            "--model",
            str(tmp_path / "s2"),
            "--text",
            "Hello there.",
            "--ref",
            str(reference),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    wave, rate = sf.read(out)
    assert rate == 32000 and len(wave) >= 640 and abs(wave).max() > 0


def test_the_shipped_base_speaks_the_stage_a_run_did_not_train(tmp_path):
    tiny = build_model("s1", "tiny", SubsetSpec(kind="full"))
    export_fedvox("s1", tiny, tmp_path / "s1")
    with pytest.raises(ConfigError, match="--model fedvox-base for the shipped base's"):
        load_models([tmp_path / "s1"])
    voice = load_models([tmp_path / "s1", "fedvox-base"])  # the run's s1, the base's s2
    assert voice.s1.config == tiny.config
    assert voice.s2.config == build_model("s2", "base", SubsetSpec(kind="full")).generator.config
    assert load_models(["fedvox-base"]).s1.config == build_model("s1", "base", SubsetSpec(kind="full")).config
