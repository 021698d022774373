"""The ServerApp's configuration and model: pyproject defaults, the initial subset, the export."""

from pathlib import Path

import torch
from flwr.common.config import fuse_dicts, get_fused_config_from_dir, parse_config_args

from fedvox.server.model import export_model, initial_subset
from fedvox.shared.models.s1_checkpoint import load_official_s1
from fedvox.shared.models.subsets import load_trainable_state_dict, merged_state_dict
from fedvox.shared.runconfig import RunConfig
from tests.tiny import TINY

ROOT = Path(__file__).resolve().parents[1]


def test_the_pyproject_run_config_is_exactly_runconfigs_defaults():
    flat = get_fused_config_from_dir(ROOT, {})  # what `flwr run .` puts in context.run_config
    assert set(flat) == set(RunConfig().to_flat())
    assert RunConfig.from_flat(flat) == RunConfig()


def test_flwr_run_config_overrides_reach_the_validated_config():
    overrides = parse_config_args(["num-server-rounds=5 speaker-dp.enabled=true aggregation='fedadam'"])
    config = RunConfig.from_flat(fuse_dicts(get_fused_config_from_dir(ROOT, {}), overrides))
    assert (config.num_server_rounds, config.speaker_dp.enabled, config.aggregation) == (5, True, "fedadam")


def test_the_initial_subset_is_what_every_client_rebuilds_from_the_model_seed():
    config = RunConfig().with_overrides(TINY)
    first, again = initial_subset(config), initial_subset(config)
    other_seed = initial_subset(config.with_overrides({"model-seed": 1}))
    assert first.keys() == again.keys() == other_seed.keys() and all("lora" in k for k in first)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other_seed[k]) for k in first)


def test_the_global_subset_exports_as_a_gpt_sovits_s1_checkpoint_with_lora_merged(tmp_path):
    config = RunConfig().with_overrides(TINY)
    subset = {k: v + 0.01 * torch.randn_like(v) for k, v in initial_subset(config).items()}  # B != 0
    paths = export_model(config, subset, tmp_path)
    path = tmp_path / "gpt-sovits" / "s1.ckpt"
    assert set(paths) == {tmp_path / "fedvox" / "s1.safetensors", path}

    reference = config.build_model()
    load_trainable_state_dict(reference, subset)
    loaded = load_official_s1(path).state_dict()
    for key, value in merged_state_dict(reference).items():
        torch.testing.assert_close(loaded[key], value.half().float(), rtol=0, atol=0)


def test_a_round_checkpoint_speaks_with_the_base_its_run_fine_tuned(tmp_path):
    """`fedvox-client synthesize --model round-NNNNN.json` rebuilds the run's pretrained base, not a
    seeded model of the same config: the checkpoint holds only the trainable subset."""
    from fedvox.client.synthesize import load_models
    from fedvox.server.checkpoints import RoundCheckpoints
    from fedvox.shared.models.factory import build_model, export_fedvox
    from fedvox.shared.models.subsets import SubsetSpec

    base = build_model("s1", "tiny", SubsetSpec(kind="full"), seed=7)
    (pretrained,) = export_fedvox("s1", base, tmp_path / "base")
    config = RunConfig().with_overrides({**TINY, "pretrained": str(pretrained)})
    subset = {k: v + 0.01 * torch.randn_like(v) for k, v in initial_subset(config).items()}
    store = RoundCheckpoints(tmp_path / "checkpoints", keep=2)
    store.save(1, subset, {"run-config": config.to_flat()})

    s2 = export_fedvox("s2", build_model("s2", "tiny", SubsetSpec(kind="full"), seed=0), tmp_path / "s2")[0]

    voice = load_models([store.meta_path(1), s2])

    expected = config.build_model()
    load_trainable_state_dict(expected, subset)
    spoken = merged_state_dict(voice.s1)
    for key, value in merged_state_dict(expected).items():
        torch.testing.assert_close(spoken[key], value, rtol=0, atol=0)
