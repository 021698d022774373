"""The pretrained base fedvox ships: the default of every run, packaged, loadable for LoRA and full
fine-tuning, described by its provenance, and refused with a way out where it does not fit."""

from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import torch

from fedvox.server.model import base_identity
from fedvox.shared.errors import CheckpointError, ConfigError
from fedvox.shared.models import factory
from fedvox.shared.models.config import SHIPPED_BASE
from fedvox.shared.models.factory import BASE_DIR, build_model, shipped_base
from fedvox.shared.models.s1_checkpoint import load_s1_safetensors
from fedvox.shared.models.s2.checkpoint import load_model
from fedvox.shared.models.subsets import SubsetSpec, trainable_state_dict
from fedvox.shared.runconfig import RunConfig
from fedvox.shared.semantic import file_digest

ROOT = Path(__file__).resolve().parents[1]
FILES = ("s1.safetensors", "s2G.safetensors", "s2D.safetensors")
shipped = pytest.mark.skipif(
    not all((BASE_DIR / name).is_file() for name in FILES),
    reason="this checkout has no shipped base (fedvox-sim pretrain-export --to shared/models/base makes it)",
)


def test_every_run_defaults_to_the_shipped_base():
    config = RunConfig()
    assert (config.model_config, config.pretrained) == ("base", SHIPPED_BASE)


def test_the_base_is_package_data_and_the_one_exception_to_gitignore():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert {"base/*.safetensors", "base/provenance.json"} <= set(data["fedvox.shared.models"])
    assert BASE_DIR == ROOT / "shared" / "models" / "base"
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = [f"shared/models/base/{name}" for name in (*FILES, "provenance.json")]
    ignored = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout == ""  # none of them is ignored
    elsewhere = subprocess.run(["git", "check-ignore", "shared/models/s1.safetensors"], cwd=ROOT, capture_output=True)
    assert elsewhere.returncode == 0  # weights anywhere else still are


def test_the_base_belongs_to_the_base_config():
    with pytest.raises(ConfigError, match="set model-config = 'base'"):
        build_model("s1", "tiny", SubsetSpec(kind="lora"), pretrained=SHIPPED_BASE)
    with pytest.raises(ConfigError, match="set model-config = 'base'"):
        RunConfig().with_overrides({"model-config": "tiny"})
    assert RunConfig().with_overrides({"model-config": "tiny", "pretrained": ""}).model_config == "tiny"


def test_a_checkout_without_the_base_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.setattr(factory, "BASE_DIR", tmp_path / "base")
    with pytest.raises(CheckpointError) as caught:
        build_model("s2", "base", SubsetSpec(kind="lora"), pretrained=SHIPPED_BASE)
    message = str(caught.value)
    assert "\n" not in message and "s2G.safetensors" in message
    assert (
        "fedvox-sim pretrain" in message and f"pretrain-export --from out/pretrain --to {tmp_path / 'base'}" in message
    )


@shipped
def test_the_shipped_files_are_the_ones_the_provenance_describes():
    provenance = json.loads((BASE_DIR / "provenance.json").read_text(encoding="utf-8"))
    assert set(provenance["weights"]) == set(FILES)
    for name, entry in provenance["weights"].items():
        assert file_digest(BASE_DIR / name, 64) == entry["sha256"], name
        assert (BASE_DIR / name).stat().st_size == entry["bytes"]
    for stage, names in (("s1", FILES[:1]), ("s2", FILES[1:])):
        assert sum((BASE_DIR / n).stat().st_size for n in names) <= 25 * 1024 * 1024, stage
        record = provenance["stages"][stage]
        assert record["config"]["name"] == "base" and record["steps_done"] >= record["best"]["step"] > 0
    assert provenance["corpus"]["voices"] > 0


@shipped
@pytest.mark.parametrize("stage", ["s1", "s2"])
def test_the_base_loads_for_lora_and_full_fine_tuning(stage):
    assert shipped_base(stage, "base").parent == BASE_DIR
    lora = build_model(stage, "base", SubsetSpec(kind="lora", lora_rank=4), pretrained=SHIPPED_BASE)
    full = build_model(stage, "base", SubsetSpec(kind="full"), pretrained=SHIPPED_BASE)
    adapters = trainable_state_dict(lora)
    assert adapters and all("lora" in k or stage == "s2" for k in adapters)
    assert all(p.dtype == torch.float32 for p in full.parameters())
    # the weights are the shipped file's (fp16 upcast), not a seeded model's
    path = shipped_base(stage, "base")
    expected = (load_s1_safetensors(path) if stage == "s1" else load_model(path)).state_dict()
    loaded = (full if stage == "s1" else full.generator).state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(v, expected[k]) for k, v in loaded.items())
    assert len(trainable_state_dict(full)) > len(adapters) / 2


@shipped
def test_every_checkpoint_names_the_export_of_the_base_it_fine_tunes():
    provenance = json.loads((BASE_DIR / "provenance.json").read_text(encoding="utf-8"))
    for stage, name in (("s1", "s1.safetensors"), ("s2", "s2G.safetensors")):
        identity = base_identity(RunConfig().with_overrides({"stage": stage}))
        assert identity["pretrained"] == SHIPPED_BASE
        assert identity["pretrained-sha256"] == provenance["weights"][name]["sha256"]
    assert (
        base_identity(RunConfig().with_overrides({"model-config": "tiny", "pretrained": ""}))["pretrained-sha256"]
        is None
    )
