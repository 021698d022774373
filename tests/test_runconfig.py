"""The run configuration: Flower's flat keys in and out, and one clear line for each bad value."""

import dataclasses

import pytest

from fedvox.shared.errors import ConfigError
from fedvox.shared.runconfig import RunConfig


def test_flat_form_round_trips_and_values_are_converted():
    config = RunConfig()
    assert RunConfig.from_flat(config.to_flat()) == config
    parsed = RunConfig.from_flat({"dp.clip_norm": "2", "evaluate": "true", "num-server-rounds": 4.0})
    assert parsed.dp.clip_norm == 2.0 and parsed.evaluate is True and parsed.num_server_rounds == 4
    assert config.with_overrides({"speaker-dp.enabled": True}).speaker_dp.enabled


@pytest.mark.parametrize(
    ("flat", "message"),
    [
        ({"dp.delta": 2.0}, r"^run-config dp.delta must be in \(0, 1\), got 2.0$"),
        ({"dp.sample-rate": 0}, r"dp.sample-rate must be in \(0, 1\], got 0"),
        ({"trim-fraction": 0.5}, r"trim-fraction must be in \[0, 0.5\), got 0.5"),
        ({"learning-rate": 0}, r"learning-rate must be > 0, got 0"),
        ({"clients-per-round": -1}, r"clients-per-round must be >= 0 \(0 selects every available client\)"),
        ({"stage": "s3"}, r"stage must be one of s1, s2, got 's3'"),
        ({"lora-rank": 1.5}, r"lora-rank must be an integer, got 1.5"),
        ({"evaluate": "maybe"}, r"evaluate must be true or false"),
        ({"dp": 3}, r"run-config dp must be a table"),
        ({"colour": 1}, r"unknown run-config key 'colour'; known keys: stage, model-config, .*speaker-dp, s2$"),
        ({"dp.colour": 1}, r"unknown run-config key 'dp.colour'; known keys: noise-multiplier, "),
        ({"clients-per-round": 1}, r"clients-per-round \(1\) is below min-clients \(2\)"),
        ({"dp.noise-multiplier": 0}, r"needs dp.noise-multiplier > 0 or dp.target-epsilon > 0"),
        ({"evaluate": True, "dp.loss-clip": 0}, r"dp.loss-clip must be > 0 with evaluate = true"),
        ({"speaker-dp.enabled": True, "aggregation": "median"}, r"speaker-level DP needs a mean aggregation"),
        ({"speaker-dp.enabled": True, "speaker-dp.delta": 1}, r"speaker-dp.delta must be in \(0, 1\)"),
        ({"learning-rate": 0, "dp.delta": 5}, r"learning-rate .*\(and 1 more problem\)$"),
        ({"server-step": 0}, r"server-step must be > 0, got 0"),
        ({"aggregation": "fedadam", "server-step": 2}, r"fedadam steps with server-learning-rate instead"),
    ],
)
def test_bad_values_name_the_key_and_what_it_accepts(flat, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_flat(flat)


def test_a_file_is_named_and_code_gets_the_same_checks(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("num-server-rounds = 4\n[dp]\ndelta = 1.5\n")
    with pytest.raises(ConfigError, match=rf"^{path}: run-config dp.delta must be in \(0, 1\), got 1.5$"):
        RunConfig.from_toml(path)
    path.write_text("[tool.flwr.app.config]\nnum-server-rounds = 4\n[tool.flwr.app.config.dp]\ndelta = 1e-6\n")
    assert RunConfig.from_toml(path, {"local-steps": 2}).dp.delta == 1e-6
    path.write_text("[dp\n")
    with pytest.raises(ConfigError, match="cannot read run configuration"):
        RunConfig.from_toml(path)
    with pytest.raises(ConfigError, match="run-config lora-rank must be > 0"):
        RunConfig(lora_rank=0)
    with pytest.raises(ConfigError, match="run-config stage must be one of"):
        dataclasses.replace(RunConfig(), stage="s9")


def test_the_s2_table_shapes_only_an_s2_runs_subset():
    s1, s2 = RunConfig(), RunConfig().with_overrides({"stage": "s2"})
    assert (s1.subset_spec.lora_groups, s1.subset_spec.adversary) == ((), True)
    assert (s2.subset_spec.lora_groups, s2.subset_spec.adversary) == (("decoder",), False)
    gan = s2.with_overrides({"s2.lora": "all", "s2.adversarial": "true"}).subset_spec
    assert (gan.lora_groups, gan.adversary) == ((), True)
    assert s2.with_overrides({"subset": "full"}).subset_spec.lora_groups == ()
    with pytest.raises(ConfigError, match=r"s2\.lora must be one of decoder, all"):
        s2.with_overrides({"s2.lora": "flow"})


def test_a_groups_subset_trains_exactly_its_module_groups():
    config = RunConfig.from_flat(
        {"stage": "s2", "model-config": "tiny", "pretrained": "", "subset": "groups"} | {"groups": " decoder, ref_enc "}
    )
    assert config.subset_spec.groups == ("decoder", "ref_enc")
    trained = [name for name, p in config.build_model().named_parameters() if p.requires_grad]
    assert trained and all(name.startswith(("generator.dec.", "generator.ref_enc.")) for name in trained)
    assert any(".ref_enc." in name for name in trained) and any(".dec." in name for name in trained)
    with pytest.raises(ConfigError, match=r"unknown module group\(s\) \['voice'\]"):
        config.with_overrides({"groups": "voice"}).build_model()
    with pytest.raises(ConfigError, match=r"needs at least one group name \(groups = \"decoder\", --groups decoder\)"):
        _ = config.with_overrides({"groups": ""}).subset_spec
    beside = config.with_overrides({"subset": "lora", "s2.lora": "decoder", "groups": "ref_enc"}).build_model()
    trained = [name for name, p in beside.named_parameters() if p.requires_grad]
    assert {n.split(".")[1] for n in trained} == {"dec", "ref_enc"}  # decoder adapters, the style encoder in full
    assert all("lora" in n for n in trained if ".dec." in n) and not any("lora" in n for n in trained if "ref_enc" in n)
