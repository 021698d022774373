"""Reuse keys of baselines and scores (simulations.reuse): what invalidates them and what does not."""

from dataclasses import replace

import torch

from fedvox.shared.runconfig import RunConfig
from fedvox.simulations import reuse
from fedvox.simulations.baselines import CentralJob, LocalJob


def _features(folder, payload=b"features"):
    (folder / "items").mkdir(parents=True)
    (folder / "index.json").write_text('{"items": []}')
    (folder / "items" / "a.pt").write_bytes(payload)
    return folder


def _jobs(tmp_path, config):
    data = _features(tmp_path / "data")
    seen = _features(tmp_path / "seen")
    local = LocalJob(
        partition=0,
        speaker="spk000",
        data=data,
        out=tmp_path / "local" / "train",
        config=config,
        rounds=3,
        overrides={"profile.device": "cpu"},
        unseen=None,
        seen=seen,
        seed=7,
    )
    central = CentralJob(
        caches=(data,),
        out=tmp_path / "central",
        config=config,
        rounds=3,
        examples_per_step=64,
        threads=1,
        seen=seen,
        unseen=None,
        seed=0,
    )
    return local, central


def test_keys_change_with_settings_seed_features_and_base_but_not_with_federation_only_settings(tmp_path):
    base = tmp_path / "base.pt"
    base.write_bytes(b"weights")
    config = RunConfig().with_overrides({"pretrained": str(base), "dp.noise-multiplier": 1.0})
    local, central = _jobs(tmp_path, config)

    def keys(local_job, central_job, cfg=config):
        return [reuse.key({**job.reuse_parts(), "base": reuse.base_digest(cfg)}) for job in (local_job, central_job)]

    first = keys(local, central)
    assert first == keys(local, central) and first[0] != first[1]
    federation = config.with_overrides({"aggregation": "median", "checkpoint-dir": "/elsewhere"})
    assert keys(replace(local, config=federation), replace(central, config=federation)) == first
    noisier = config.with_overrides({"dp.noise-multiplier": 2.0})
    assert keys(replace(local, config=noisier), replace(central, config=noisier)) == [
        keys(replace(local, config=noisier), central)[0],
        first[1],  # the centralised baseline trains without DP: its key ignores the noise
    ]
    assert keys(replace(local, config=noisier), central)[0] != first[0]
    faster = config.with_overrides({"learning-rate": 0.1})
    changed = keys(replace(local, config=faster), replace(central, config=faster))
    assert all(a != b for a, b in zip(changed, first, strict=True))
    assert keys(replace(local, seed=8), replace(central, seed=1)) != first
    (local.data / "items" / "a.pt").write_bytes(b"other features")
    reuse.features_digest.cache_clear()
    assert all(a != b for a, b in zip(keys(local, central), first, strict=True))
    (local.data / "items" / "a.pt").write_bytes(b"features")
    (local.data / "privacy_ledger.sqlite").write_bytes(b"a clone's ledger is not a feature")
    reuse.features_digest.cache_clear()
    assert keys(local, central) == first
    base.write_bytes(b"other weights")
    reuse._file_digest.cache_clear()
    assert all(a != b for a, b in zip(keys(local, central), first, strict=True))


def test_a_kept_folder_is_restored_whole_and_a_key_is_kept_once(tmp_path):
    store = reuse.Store(tmp_path / "reuse")
    trained = tmp_path / "run" / "baseline"
    (trained / "train").mkdir(parents=True)
    (trained / "train" / "state.pt").write_bytes(b"state")
    assert store.result("k") is None
    store.keep("k", {"losses": {"1": 4.2}}, trained)
    store.keep("k", {"losses": {"1": 9.9}}, trained)  # a second keeper of the same key changes nothing
    assert store.result("k") == {"losses": {"1": 4.2}}
    target = tmp_path / "run2" / "baseline"
    (target / "data").mkdir(parents=True)
    store.restore("k", target)
    assert (target / "train" / "state.pt").read_bytes() == b"state" and not (target / "data").exists()
    assert [p.name for p in (tmp_path / "reuse").iterdir()] == ["k"]  # no staging folder left


def test_state_digest_tells_states_apart():
    state = {"a": torch.zeros(3), "b": torch.ones(2, dtype=torch.bfloat16)}
    assert reuse.state_digest(state) == reuse.state_digest({k: v.clone() for k, v in state.items()})
    assert reuse.state_digest(state) != reuse.state_digest({**state, "a": torch.tensor([0.0, 0.0, 1e-8])})
    assert reuse.state_digest(state) != reuse.state_digest({"a": state["a"]})


def test_a_local_only_baseline_trains_the_federations_subset(tmp_path):
    for overrides in ({}, {"stage": "s2"}, {"stage": "s2", "s2.lora": "all", "s2.adversarial": "true"}):
        config = RunConfig().with_overrides(overrides)
        local, _ = _jobs(tmp_path / str(len(overrides)), config)
        assert local.training.subset_spec == config.subset_spec
        assert local.training.steps == 3 * config.local_steps
    groups = RunConfig().with_overrides({"stage": "s2", "subset": "groups", "groups": "decoder"})
    local, _ = _jobs(tmp_path / "groups", groups)
    assert local.training.subset_spec.groups == ("decoder",)
