"""s2 interop: official s2G/s2D files import strictly and export bit-exactly (version tags too).

Released weights cannot be downloaded, so the official files are built from the manifests
(GPT-SoVITS @ 48b1a01 key names and shapes) with random values.
"""

from __future__ import annotations

import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedvox.shared.errors import CheckpointError
from fedvox.shared.models.config import s2_config
from fedvox.shared.models.interop import manifest, random_official_state_dict, write_torch_file
from fedvox.shared.models.s2 import MultiPeriodDiscriminator, SynthesizerTrn
from fedvox.shared.models.s2.checkpoint import (
    config_from_hparams,
    detect_version,
    export_discriminator,
    export_generator,
    load_discriminator,
    load_generator,
    load_model,
    load_official_state,
    official_hparams,
    read_official,
    save_model,
    to_official,
)
from fedvox.shared.models.subsets import SubsetSpec, apply_subset
from tests.s2_batches import (
    fixed_randomness,
    random_s2_batch,
    single_thread,  # noqa: F401  (autouse: one CPU thread)
)

TAGS = {"v2Pro": b"05", "v2ProPlus": b"06"}


def _shapes_only(name: str) -> dict[str, torch.Tensor]:
    """Official keys and shapes with uninitialised values, for tests that never read values."""
    return {key: torch.empty(spec["shape"]) for key, spec in manifest(name)["tensors"].items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys(), set(a) ^ set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("version", ["v1", "v2", "v2Pro", "v2ProPlus"])
def test_generator_imports_strictly_and_round_trips_bit_exactly(version: str, tmp_path) -> None:
    official = random_official_state_dict(f"s2G_{version}", seed=1)
    # A fine-tuned export as process_ckpt.savee writes it: fp16, no enc_q, Pro versions tagged.
    finetuned = {k: v.half() for k, v in official.items() if "enc_q" not in k}
    hps = official_hparams(s2_config(version))
    write_torch_file(
        {"weight": finetuned, "config": hps, "info": "8epoch_96iteration"},
        tmp_path / "in.pth",
        version if version in TAGS else None,
    )
    raw = (tmp_path / "in.pth").read_bytes()
    assert raw[:2] == TAGS.get(version, b"PK")
    model = load_generator(tmp_path / "in.pth")  # version from the tag or the embedding rows
    assert model.config == s2_config(version)
    export_generator(model, tmp_path / "out.pth", info="8epoch_96iteration")
    assert (tmp_path / "out.pth").read_bytes() == raw
    back = read_official(tmp_path / "out.pth")
    assert back.version == version and back.config["model"]["version"] == version
    assert back.config["train"]["segment_size"] == 20480 and back.config["data"]["hop_length"] == 640

    # A pretrained state (fp32, with enc_q): every key imports and exports unchanged, in order.
    assert load_official_state(model, official, version) == []
    exported = to_official(model)
    _assert_same(exported, official)
    assert list(exported) == list(manifest(f"s2G_{version}")["tensors"])


def test_full_precision_export_keeps_the_posterior_encoder(tmp_path) -> None:
    official = random_official_state_dict("s2G_v2", seed=3)
    model = SynthesizerTrn(s2_config("v2"))
    load_official_state(model, official, "v2")
    export_generator(model, tmp_path / "full.pth", half=False, include_posterior=True)
    _assert_same(read_official(tmp_path / "full.pth").weight, official)


@pytest.mark.parametrize("version", ["v2", "v2Pro"])
def test_discriminator_imports_strictly_and_round_trips(version: str, tmp_path) -> None:
    official = random_official_state_dict(f"s2D_{version}", seed=2)
    model = MultiPeriodDiscriminator(s2_config(version))
    load_official_state(model, official, version)
    assert len(model.discriminators) == (8 if version == "v2Pro" else 6)
    _assert_same(to_official(model), official)
    if version == "v2":
        write_torch_file({"weight": official}, tmp_path / "d.pth")
        export_discriminator(load_discriminator(tmp_path / "d.pth"), tmp_path / "d_out.pth")
        assert (tmp_path / "d_out.pth").read_bytes() == (tmp_path / "d.pth").read_bytes()


def test_pickled_hparams_config_loads_with_weights_only(tmp_path, monkeypatch) -> None:
    """Upstream exports pickle ``utils.HParams``; we read them without unpickling code."""
    utils = types.ModuleType("utils")

    class HParams:
        def __init__(self, **kwargs):
            for key, value in kwargs.items():
                setattr(self, key, HParams(**value) if isinstance(value, dict) else value)

    HParams.__module__, HParams.__qualname__ = "utils", "HParams"
    utils.HParams = HParams
    monkeypatch.setitem(sys.modules, "utils", utils)
    state = {k: v.half() for k, v in to_official(SynthesizerTrn(s2_config("v1"))).items() if "enc_q" not in k}
    hps = HParams(**official_hparams(s2_config("v1")), name="exp")
    write_torch_file({"weight": state, "config": hps, "info": "1epoch_1iteration"}, tmp_path / "v1.pth")
    monkeypatch.delitem(sys.modules, "utils")
    ckpt = read_official(tmp_path / "v1.pth")
    assert ckpt.version == "v1" and ckpt.config["model"]["gin_channels"] == 512
    assert ckpt.config["name"] == "exp"


def test_version_detection_follows_gpt_sovits() -> None:
    states = {v: _shapes_only(f"s2G_{v}") for v in ("v1", "v2", "v2Pro", "v2ProPlus")}
    for version, state in states.items():  # untagged, no hps: shapes decide (pretrained files)
        assert detect_version(state, None) == version
    assert detect_version(states["v2"], "v2Pro") == "v2Pro"  # the header tag wins
    hps = {"model": {"gin_channels": 1024, "upsample_initial_channel": 768}}
    assert detect_version(states["v2Pro"], None, hps) == "v2ProPlus"  # as inspect_version
    with pytest.raises(CheckpointError, match="v4-lora"):
        detect_version(states["v2"], "v4-lora")
    without_decoder = {k: v for k, v in states["v2"].items() if not k.startswith("dec.")}
    with pytest.raises(CheckpointError, match="v3/v4"):
        detect_version(without_decoder, None)


def test_wrong_files_and_configs_fail_with_clear_messages(tmp_path) -> None:
    v1 = _shapes_only("s2G_v1")
    write_torch_file({"weight": {k: v.half() for k, v in v1.items()}}, tmp_path / "v1.pth")
    with pytest.raises(
        CheckpointError, match=r"enc_p.text_embedding.weight.*\[322, 192\].*\[732, 192\].*s2_config\('v1'\)"
    ):
        load_generator(tmp_path / "v1.pth", s2_config("v2"))

    model = SynthesizerTrn(s2_config("v1"))
    incomplete = {k: v for k, v in v1.items() if not k.startswith("dec.ups.0.")}
    with pytest.raises(CheckpointError, match=r"lacks 'dec.ups.0.bias' \(and 2 more\)"):
        load_official_state(model, incomplete, "v1")
    with pytest.raises(CheckpointError, match=r"'dec.extra.weight'.*does not exist"):
        load_official_state(model, {**v1, "dec.extra.weight": torch.zeros(1)}, "v1")

    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        read_official(tmp_path / "text.pth")
    write_torch_file({"state": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="'weight' state dict"):
        read_official(tmp_path / "other.pth")

    with pytest.raises(CheckpointError, match="export it in fedvox's safetensors format"):
        export_generator(SynthesizerTrn(s2_config("tiny")), tmp_path / "tiny.pth")


def test_safetensors_round_trip_keeps_any_config_and_lora_merges_on_export(tmp_path) -> None:
    config = s2_config("tiny")
    torch.manual_seed(0)
    g, d = SynthesizerTrn(config).eval(), MultiPeriodDiscriminator(config)
    save_model(g, tmp_path / "g.safetensors")
    save_model(d, tmp_path / "d.safetensors")
    g2, d2 = load_model(tmp_path / "g.safetensors"), load_model(tmp_path / "d.safetensors")
    assert g2.config == config and d2.config == config
    _assert_same(to_official(g2), to_official(g))
    _assert_same(to_official(d2), to_official(d))

    apply_subset(g2, SubsetSpec(kind="lora", lora_rank=2))
    for name, param in g2.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    step = fixed_randomness(random_s2_batch(config, [5, 4], [3, 2]), config)
    kwargs = dict(slice_starts=step.slice_starts, posterior_noise=step.posterior_noise)
    save_model(g2, tmp_path / "merged.safetensors")
    merged = load_model(tmp_path / "merged.safetensors").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(step.batch, **kwargs).wave_hat, g2.eval()(step.batch, **kwargs).wave_hat)


def _custom_file(tmp_path: Path) -> tuple[SynthesizerTrn, Path]:
    """A v2 export whose hps is not a preset, written as GPT-SoVITS would."""
    config = replace(s2_config("v2"), n_layers=2, filter_channels=256, upsample_initial_channel=128)
    model = SynthesizerTrn(config)
    export_generator(model, tmp_path / "custom.pth", half=False)
    return model, tmp_path / "custom.pth"


def test_generator_is_built_from_the_files_own_config(tmp_path) -> None:
    model, path = _custom_file(tmp_path)
    hps = read_official(path).config
    assert hps["model"]["upsample_initial_channel"] == 128 and hps["model"]["n_layers"] == 2
    loaded = load_generator(path)
    assert loaded.config == replace(model.config, name="v2-file")
    without_posterior = [{k: v for k, v in to_official(m).items() if "enc_q" not in k} for m in (loaded, model)]
    _assert_same(*without_posterior)
    assert config_from_hparams(official_hparams(s2_config("v2Pro")), "v2Pro") == s2_config("v2Pro")


def test_a_config_the_file_does_not_match_is_named(tmp_path) -> None:
    _, path = _custom_file(tmp_path)
    with pytest.raises(CheckpointError, match=r"config sets filter_channels=256 but the v2 model has 768"):
        load_generator(path, s2_config("v2"))
    hps = official_hparams(s2_config("v2"))
    with pytest.raises(CheckpointError, match=r"model.resblock='2'"):
        config_from_hparams({**hps, "model": {**hps["model"], "resblock": "2"}}, "v2")
    with pytest.raises(CheckpointError, match=r"data.sampling_rate=48000"):
        config_from_hparams({**hps, "data": {**hps["data"], "sampling_rate": 48000}}, "v2")
