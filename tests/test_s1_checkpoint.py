"""s1 interop: manifest-built official .ckpt files import strictly and export bit-exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedvox.shared.errors import CheckpointError
from fedvox.shared.models.config import CONFIG_NAMES, s1_config
from fedvox.shared.models.interop import (
    manifest,
    random_official_state_dict,
    read_torch_file,
    write_torch_file,
)
from fedvox.shared.models.s1 import Text2SemanticDecoder
from fedvox.shared.models.s1_checkpoint import (
    config_from_official,
    fedvox_to_official,
    load_official_s1,
    load_official_s1_into,
    load_s1_safetensors,
    official_config,
    official_shapes,
    official_to_fedvox,
    read_official_s1,
    save_official_s1,
    save_s1_safetensors,
)
from fedvox.shared.models.subsets import SubsetSpec, apply_subset

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


OFFICIAL = {"v2": torch.float16, "v1": torch.float32}
"""Full-size files built from both manifests, covering both export dtypes."""


def _official_file(path: Path, version: str, dtype: torch.dtype) -> dict:
    weight = {k: t.to(dtype) for k, t in random_official_state_dict(f"s1_{version}", seed=1).items()}
    content = {"weight": weight, "config": official_config(s1_config(version)), "info": "GPT-e15"}
    write_torch_file(content, path)
    return content


def _tiny_file(path: Path, drop: str | None = None, with_config: bool = True) -> None:
    """An official-format file of the tiny config (cheap), optionally without key ``drop``."""
    weight = fedvox_to_official(Text2SemanticDecoder(s1_config("tiny")).state_dict())
    weight.pop(drop, None)
    content = {"weight": weight, "info": "GPT-e1"}
    if with_config:
        content["config"] = official_config(s1_config("tiny"))
    write_torch_file(content, path)


@pytest.fixture(scope="module")
def official_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    folder = tmp_path_factory.mktemp("official")
    return {
        version: (
            folder / f"{version}.ckpt",
            _official_file(folder / f"{version}.ckpt", version, dtype),
        )
        for version, dtype in OFFICIAL.items()
    }


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_official_keys_and_shapes_match_manifest(version: str) -> None:
    expected = {key: tuple(spec["shape"]) for key, spec in manifest(f"s1_{version}")["tensors"].items()}
    shapes = official_shapes(s1_config(version))
    assert list(shapes) == list(expected)  # same keys in the same order
    assert shapes == expected


@pytest.mark.parametrize("version", list(OFFICIAL))
def test_import_then_export_is_bit_exact(
    official_files: dict[str, tuple[Path, dict]], tmp_path: Path, version: str
) -> None:
    path, original = official_files[version]
    dtype = OFFICIAL[version]
    model = load_official_s1(path)
    assert model.config.name == version
    save_official_s1(model, tmp_path / "out.ckpt", dtype=dtype, info="GPT-e15")
    exported, tag = read_torch_file(tmp_path / "out.ckpt")
    assert tag is None  # s1 files keep the plain zip magic
    assert list(exported["weight"]) == list(original["weight"])
    for key, tensor in original["weight"].items():
        assert exported["weight"][key].dtype == dtype
        assert torch.equal(exported["weight"][key], tensor), key
    assert exported["config"] == original["config"]
    assert exported["info"] == "GPT-e15"


def test_split_order_is_q_k_v_like_torch_multihead_attention() -> None:
    """The packed in_proj follows torch's own (q, k, v) layout, which GPT-SoVITS uses."""
    config = s1_config("tiny", dropout=0.0)
    torch.manual_seed(0)
    reference = torch.nn.MultiheadAttention(config.dim, config.heads, batch_first=True)
    official = {
        "model.h.layers.0.self_attn.in_proj_weight": reference.in_proj_weight.detach(),
        "model.h.layers.0.self_attn.in_proj_bias": reference.in_proj_bias.detach(),
        "model.h.layers.0.self_attn.out_proj.weight": reference.out_proj.weight.detach(),
        "model.h.layers.0.self_attn.out_proj.bias": reference.out_proj.bias.detach(),
    }
    model = Text2SemanticDecoder(config).eval()
    attention = model.h.layers[0].self_attn
    state = {k.removeprefix("h.layers.0.self_attn."): v for k, v in official_to_fedvox(official).items()}
    attention.load_state_dict(state, strict=True)
    x = torch.randn(2, 5, config.dim)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    expected, _ = reference(x, x, x, attn_mask=~causal, need_weights=False)
    torch.testing.assert_close(attention(x, causal), expected)


def test_key_mapping_round_trips() -> None:
    state = Text2SemanticDecoder(s1_config("tiny")).state_dict()
    back = official_to_fedvox(fedvox_to_official(state))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_wrong_config_names_key_shapes_and_the_right_config(
    official_files: dict[str, tuple[Path, dict]],
) -> None:
    with pytest.raises(CheckpointError) as error:
        load_official_s1(official_files["v1"][0], config=s1_config("v2"))
    message = str(error.value)
    assert "model.ar_text_embedding.word_embeddings.weight" in message
    assert "(512, 512)" in message and "(732, 512)" in message
    assert "use config 'v1'" in message


def test_missing_key_is_named(tmp_path: Path) -> None:
    _tiny_file(tmp_path / "broken.ckpt", drop="model.h.layers.1.linear1.bias")
    with pytest.raises(CheckpointError, match=r"1 missing keys.*h\.layers\.1\.linear1\.bias"):
        load_official_s1(tmp_path / "broken.ckpt")


def test_config_inferred_from_shapes_without_config_entry(tmp_path: Path) -> None:
    _tiny_file(tmp_path / "bare.ckpt", with_config=False)
    assert load_official_s1(tmp_path / "bare.ckpt").config == s1_config("tiny")


def test_rejects_sovits_and_non_checkpoint_files(tmp_path: Path) -> None:
    sovits = {key: torch.zeros(1) for key in list(manifest("s2G_v2")["tensors"])[:5]}
    write_torch_file({"weight": sovits}, tmp_path / "d.pth")
    with pytest.raises(CheckpointError, match="SoVITS"):
        read_official_s1(tmp_path / "d.pth")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_official_s1(tmp_path / "notes.txt")
    write_torch_file({"something": 1}, tmp_path / "odd.ckpt")
    with pytest.raises(CheckpointError, match="no 'weight' tensor dict"):
        load_official_s1(tmp_path / "odd.ckpt")


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_official_config_round_trips(name: str) -> None:
    config = s1_config(name)
    yaml_config = official_config(config)
    assert set(yaml_config) == {"train", "optimizer", "data", "model", "inference"}
    recovered = config_from_official(yaml_config)
    expected_name = "v2" if name in ("v2Pro", "v2ProPlus") else name  # s1 is shared by v2+
    assert recovered == s1_config(expected_name)


def test_lora_model_exports_merged_weights(tmp_path: Path) -> None:
    config = s1_config("tiny")
    torch.manual_seed(0)
    model = apply_subset(Text2SemanticDecoder(config), SubsetSpec("lora", lora_rank=4))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.1)
    save_official_s1(model, tmp_path / "merged.ckpt", dtype=torch.float32)
    save_s1_safetensors(model, tmp_path / "merged.safetensors")
    batch_inputs = (
        torch.randint(1, 700, (1, 6)),
        torch.tensor([6]),
        torch.randn(1, 6, 1024),
        torch.randint(0, 1024, (1, 5)),
        torch.tensor([5]),
    )
    expected = model.eval()(*batch_inputs)
    for loaded in (
        load_official_s1(tmp_path / "merged.ckpt"),
        load_s1_safetensors(tmp_path / "merged.safetensors"),
    ):
        torch.testing.assert_close(loaded.eval()(*batch_inputs), expected, rtol=1e-5, atol=1e-5)


def test_safetensors_round_trip_and_stage_check(tmp_path: Path) -> None:
    model = Text2SemanticDecoder(s1_config("tiny", top_k=7))
    save_s1_safetensors(model, tmp_path / "s1.safetensors")
    loaded = load_s1_safetensors(tmp_path / "s1.safetensors")
    assert loaded.config == model.config
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    from fedvox.shared.models.interop import save_safetensors

    save_safetensors({"x": torch.zeros(1)}, tmp_path / "other.safetensors", metadata={"stage": "s2"})
    with pytest.raises(CheckpointError, match="not a fedvox s1 model file"):
        load_s1_safetensors(tmp_path / "other.safetensors")


def test_load_into_an_existing_model_before_the_subset(tmp_path: Path) -> None:
    _tiny_file(tmp_path / "tiny.ckpt")
    expected = load_official_s1(tmp_path / "tiny.ckpt").state_dict()
    model = Text2SemanticDecoder(s1_config("tiny"))
    load_official_s1_into(model, tmp_path / "tiny.ckpt")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    with pytest.raises(CheckpointError, match="use config 'tiny'"):
        load_official_s1_into(Text2SemanticDecoder(s1_config("tiny", layers=1)), tmp_path / "tiny.ckpt")
    apply_subset(model, SubsetSpec("lora"))
    with pytest.raises(CheckpointError, match="first, then apply"):
        load_official_s1_into(model, tmp_path / "tiny.ckpt")
