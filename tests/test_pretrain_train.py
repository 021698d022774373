"""Pretraining a stage: a run killed after a checkpoint continues to exactly where an
uninterrupted run goes; the provenance and the shipped export describe what was trained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fedvox.shared.errors import ConfigError
from fedvox.shared.models.factory import build_model
from fedvox.shared.models.subsets import SubsetSpec
from fedvox.shared.semantic import file_digest
from fedvox.simulations.pretrain import corpus, train
from fedvox.simulations.pretrain.corpus import CorpusConfig
from fedvox.simulations.pretrain.export import export_base
from fedvox.simulations.pretrain.pipeline import portable_command, pretrain
from fedvox.simulations.pretrain.train import StagePlan, train_stage
from tests.prepared import prepared_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return prepared_cache(tmp_path_factory.mktemp("pretrain"), repeat=1)


class Killed(Exception):
    pass


@pytest.mark.parametrize("stage", ["s1", "s2"])
def test_a_killed_run_resumes_to_the_uninterrupted_result(stage, cache, tmp_path, monkeypatch):
    plan = StagePlan(
        stage, model_config="tiny", steps=4, batch_size=2, warmup=2, eval_every=2, eval_utterances=2, disc_start=1
    )
    straight = train_stage(plan, cache, cache, tmp_path / "straight", torch.device("cpu"))

    real_step, calls = train._step, []

    def dies_after_two(*args, **kwargs):
        if len(calls) == 3:  # the step-2 checkpoint is on disk; step 3 is lost
            raise Killed
        calls.append(1)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "_step", dies_after_two)
    with pytest.raises(Killed):
        train_stage(plan, cache, cache, tmp_path / "killed", torch.device("cpu"))
    monkeypatch.setattr(train, "_step", real_step)
    resumed = train_stage(plan, cache, cache, tmp_path / "killed", torch.device("cpu"))

    assert resumed.step == straight.step == 4
    assert [h["step"] for h in resumed.history] == [2, 4]
    same_but_time = [{**h, "seconds": r["seconds"]} for h, r in zip(straight.history, resumed.history, strict=True)]
    assert resumed.history == same_but_time
    saved = torch.load(tmp_path / "killed" / "state.pt", weights_only=False)["model"]
    reference = torch.load(tmp_path / "straight" / "state.pt", weights_only=False)["model"]
    assert saved.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(saved[key], reference[key], rtol=0, atol=0)


def test_resuming_with_other_settings_is_refused(cache, tmp_path):
    plan = StagePlan("s1", model_config="tiny", steps=1, batch_size=2, eval_every=1, eval_utterances=2)
    train_stage(plan, cache, cache, tmp_path, torch.device("cpu"))
    with pytest.raises(ConfigError, match="batch_size"):
        train_stage(
            StagePlan("s1", model_config="tiny", steps=2, batch_size=3, eval_every=1),
            cache,
            cache,
            tmp_path,
            torch.device("cpu"),
        )
    longer = train_stage(
        StagePlan("s1", model_config="tiny", steps=2, batch_size=2, eval_every=1, eval_utterances=2),
        cache,
        cache,
        tmp_path,
        torch.device("cpu"),
    )
    assert longer.step == 2  # training longer is allowed


@pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("flite") is None, reason="espeak-ng and flite are not installed"
)
def test_pretrain_writes_provenance_and_an_export_that_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "ESPEAK_VARIANTS", ("m2",))
    monkeypatch.setattr(corpus, "FLITE_VOICES", ("awb",))
    plans = [
        StagePlan(s, model_config="tiny", steps=2, batch_size=2, eval_every=2, eval_utterances=2) for s in ("s1", "s2")
    ]
    provenance = pretrain(tmp_path / "out", CorpusConfig(utterances=3, valid=1, workers=1), plans, device="cpu")
    assert provenance["code"]["git_commit"] and provenance["corpus"]["voices"] == 3
    assert provenance["corpus"]["totals"]["train"]["utterances"] == 6 and provenance["features"]["tokenizer"]
    for stage in ("s1", "s2"):
        record = provenance["stages"][stage]
        assert record["steps_done"] == 2 and record["best"]["step"] == 2 and record["commands"]
        assert record["config"]["name"] == "tiny" and "loss" in record["last"]["valid"]
    assert json.loads((tmp_path / "out" / "provenance.json").read_text()) == json.loads(json.dumps(provenance))

    shipped = export_base(tmp_path / "out", tmp_path / "base")
    assert set(shipped["weights"]) == {"s1.safetensors", "s2G.safetensors", "s2D.safetensors"}
    for name, entry in shipped["weights"].items():
        assert entry["sha256"] == file_digest(tmp_path / "base" / name, 64)
    trained, _ = train.load_weights(tmp_path / "out" / "s1")
    s1 = build_model("s1", "tiny", SubsetSpec(kind="full"), pretrained=tmp_path / "base" / "s1.safetensors")
    for key, value in s1.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, trained[key].half().float())
    pair = build_model("s2", "tiny", SubsetSpec(kind="lora"), pretrained=tmp_path / "base" / "s2G.safetensors")
    assert any(p.requires_grad for p in pair.generator.parameters())
    with pytest.raises(ConfigError, match="model-config"):
        build_model("s1", "base", SubsetSpec(kind="full"), pretrained=tmp_path / "base" / "s1.safetensors")

    # one stage re-exported: the other's record stays, and the evaluation speaks with the pair as shipped
    again = export_base(tmp_path / "out", tmp_path / "base", ("s1",), evaluate=1)
    assert again["weights"]["s2G.safetensors"] == shipped["weights"]["s2G.safetensors"]
    assert again["evaluation"]["utterances"] == 1 and again["evaluation"]["mean"]["tts_length_ratio"] > 0


def test_the_recorded_command_names_no_folder_of_this_machine(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = (tmp_path / "state").absolute()
    argv = ["/opt/venv/bin/fedvox-sim", "pretrain", "--out", str(out), "--s1-steps", "3"]
    assert portable_command(argv, out) == "fedvox-sim pretrain --out OUT --s1-steps 3"
    assert portable_command(["fedvox-sim", "pretrain", "--out=state"], out) == "fedvox-sim pretrain --out=OUT"
    assert portable_command(["fedvox-sim", "pretrain", "--out", "elsewhere"], out).endswith("--out elsewhere")
