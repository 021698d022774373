"""``fedvox-client probe``: the facts and the chosen profile, as tables and as JSON."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from fedvox.client.cli import app
from fedvox.client.device import probe
from fedvox.shared.errors import ConfigError

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["probe", *args], terminal_width=200)


def test_probe_prints_facts_and_the_profile_with_reasons():
    result = invoke()
    assert result.exit_code == 0, result.output
    facts = probe()
    for text in (
        "Device facts",
        "Resource profile",
        "backend",
        facts.backend,
        facts.cpu_isa,
        "RAM",
        "physical batch",
        "precision",
        "checkpointing",
        "threads",
        "physical core",
    ):
        assert text in result.output


def test_probe_json_for_scripts():
    result = invoke("--json", "--stage", "s2", "--subset", "full")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["facts"] == probe().to_dict()
    chosen = report["profile"]
    assert chosen["device"] == "cpu" or report["facts"]["backend"] in ("cuda", "rocm")
    assert chosen["precision"] in ("bf16", "fp16", "fp32") and chosen["physical_batch"] >= 1
    assert chosen["checkpointing"] is False  # s2 has nothing checkpointable
    assert set(chosen["reasons"]) == {"device", "precision", "physical_batch", "checkpointing", "threads"}
    assert chosen["memory"]["max_batch"] >= 1 and chosen["memory"]["trainable"] > 0


def test_probe_plans_for_a_reference_device():
    report = json.loads(invoke("--as", "rtx3060", "--json").output)
    assert report["facts"]["device_name"] == "NVIDIA GeForce RTX 3060"
    assert report["profile"]["name"] == "nvidia-12gb-bf16" and report["profile"]["device"] == "cuda:0"
    result = invoke("--as", "rtx3060")
    assert "compute capability" in result.output and "8.6" in result.output
    assert "estimate" in result.output  # GPU activation memory is not measured on a GPU yet
    mac = json.loads(invoke("--as", "m2", "--allow-mps", "--json").output)
    assert mac["profile"]["device"] == "mps"


def test_probe_overrides_by_flag_and_file(tmp_path):
    settings = tmp_path / "client.toml"
    settings.write_text('[profile]\nphysical-batch = 3\nthreads = 1\nprecision = "fp32"\n')
    report = json.loads(invoke("--profile-file", str(settings), "--physical-batch", "2", "--json").output)
    chosen = report["profile"]
    assert (chosen["physical_batch"], chosen["threads"], chosen["precision"]) == (2, 1, "fp32")
    assert "pinned by override" in chosen["reasons"]["physical_batch"]


def test_probe_rejects_what_the_device_cannot_do():
    result = invoke("--as", "x86-avx2", "--device", "cuda")
    assert isinstance(result.exception, ConfigError) and "needs an NVIDIA or AMD GPU" in str(result.exception)
    result = invoke("--as", "nope")
    assert isinstance(result.exception, ConfigError) and "unknown reference device" in str(result.exception)
