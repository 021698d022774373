"""GPT-SoVITS's semantic path: Hugging Face chinese-hubert-base -> torchaudio HuBERT -> s2 VQ codes.

No real weights can be downloaded, so the tests write Hugging Face-format checkpoints with random
values under the key names and shapes of ``transformers``' ``HubertModel`` and check the loaded
model against (a) torchaudio's own HuBERT given the same tensors and (b) an independent
functional re-statement of Hugging Face's forward pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchaudio.models import hubert_base

from fedvox.client.data.cache import FeatureCache
from fedvox.client.data.features import loudness_mix
from fedvox.client.data.prepare import prepare
from fedvox.shared.audio import resample
from fedvox.shared.errors import CheckpointError, ConfigError
from fedvox.shared.models.interop import random_official_state_dict, write_torch_file
from fedvox.shared.semantic import HUBERT_INPUT_SCALE, HubertTokenizer, load_hubert, tokenizer_spec

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "conv_dim": [16] * 7,
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "conv_bias": False,
    "feat_extract_norm": "group",
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 4,
    "do_stable_layer_norm": False,
    "layer_norm_eps": 1e-5,
    "hidden_act": "gelu",
    "feat_extract_activation": "gelu",
    "feat_proj_layer_norm": True,
    "architectures": ["HubertModel"],
    "model_type": "hubert",
}
BASE = {
    **TINY,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "conv_dim": [512] * 7,
    "num_conv_pos_embeddings": 128,
    "num_conv_pos_embedding_groups": 16,
}


def hf_state(cfg: dict, seed: int = 0, parametrized: bool = False) -> dict[str, torch.Tensor]:
    """A HubertModel state dict as transformers saves it, with random values."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.05, offset: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale + offset

    hidden, inner, dims = cfg["hidden_size"], cfg["intermediate_size"], cfg["conv_dim"]
    state = {"masked_spec_embed": rand(hidden)}
    in_dim = 1
    for i, (dim, kernel) in enumerate(zip(dims, cfg["conv_kernel"], strict=True)):
        state[f"feature_extractor.conv_layers.{i}.conv.weight"] = rand(dim, in_dim, kernel, scale=0.3)
        in_dim = dim
    state["feature_extractor.conv_layers.0.layer_norm.weight"] = rand(dims[0], offset=1.0)
    state["feature_extractor.conv_layers.0.layer_norm.bias"] = rand(dims[0])
    state["feature_projection.layer_norm.weight"] = rand(dims[-1], offset=1.0)
    state["feature_projection.layer_norm.bias"] = rand(dims[-1])
    state["feature_projection.projection.weight"] = rand(hidden, dims[-1])
    state["feature_projection.projection.bias"] = rand(hidden)
    kernel, groups = cfg["num_conv_pos_embeddings"], cfg["num_conv_pos_embedding_groups"]
    pos = "encoder.pos_conv_embed.conv."
    g_name, v_name = (
        ("parametrizations.weight.original0", "parametrizations.weight.original1")
        if parametrized
        else ("weight_g", "weight_v")
    )
    state[pos + g_name] = rand(1, 1, kernel, scale=0.2, offset=1.0)
    state[pos + v_name] = rand(hidden, hidden // groups, kernel)
    state[pos + "bias"] = rand(hidden)
    state["encoder.layer_norm.weight"] = rand(hidden, offset=1.0)
    state["encoder.layer_norm.bias"] = rand(hidden)
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            state[p + f"attention.{proj}.weight"] = rand(hidden, hidden)
            state[p + f"attention.{proj}.bias"] = rand(hidden)
        for norm in ("layer_norm", "final_layer_norm"):
            state[p + f"{norm}.weight"] = rand(hidden, offset=1.0)
            state[p + f"{norm}.bias"] = rand(hidden)
        state[p + "feed_forward.intermediate_dense.weight"] = rand(inner, hidden)
        state[p + "feed_forward.intermediate_dense.bias"] = rand(inner)
        state[p + "feed_forward.output_dense.weight"] = rand(hidden, inner)
        state[p + "feed_forward.output_dense.bias"] = rand(hidden)
    return state


def write_hf(folder: Path, cfg: dict, state: dict[str, torch.Tensor], fmt: str = "bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    if fmt == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, str(folder / "model.safetensors"))
    return folder


def hf_reference(state: dict[str, torch.Tensor], cfg: dict, wave: torch.Tensor) -> torch.Tensor:
    """Hugging Face HubertModel's ``last_hidden_state`` (eval, post-norm), written out functionally."""
    x = wave[:, None]
    for i, stride in enumerate(cfg["conv_stride"]):
        x = F.conv1d(x, state[f"feature_extractor.conv_layers.{i}.conv.weight"], stride=stride)
        if i == 0:
            x = F.group_norm(
                x,
                x.shape[1],
                state["feature_extractor.conv_layers.0.layer_norm.weight"],
                state["feature_extractor.conv_layers.0.layer_norm.bias"],
            )
        x = F.gelu(x)
    x = F.layer_norm(
        x.transpose(1, 2),
        (x.shape[1],),
        state["feature_projection.layer_norm.weight"],
        state["feature_projection.layer_norm.bias"],
    )
    x = F.linear(x, state["feature_projection.projection.weight"], state["feature_projection.projection.bias"])
    g, v = state["encoder.pos_conv_embed.conv.weight_g"], state["encoder.pos_conv_embed.conv.weight_v"]
    weight = g * v / v.norm(dim=(0, 1), keepdim=True)  # weight_norm(dim=2)
    kernel = cfg["num_conv_pos_embeddings"]
    pos = F.conv1d(
        x.transpose(1, 2),
        weight,
        state["encoder.pos_conv_embed.conv.bias"],
        padding=kernel // 2,
        groups=cfg["num_conv_pos_embedding_groups"],
    )
    pos = pos[:, :, :-1] if kernel % 2 == 0 else pos
    hidden = cfg["hidden_size"]
    x = F.layer_norm(
        x + F.gelu(pos).transpose(1, 2), (hidden,), state["encoder.layer_norm.weight"], state["encoder.layer_norm.bias"]
    )
    heads = cfg["num_attention_heads"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layers.{i}."

        def lin(t: torch.Tensor, name: str, p: str = p) -> torch.Tensor:
            return F.linear(t, state[p + name + ".weight"], state[p + name + ".bias"])

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

        q = split(lin(x, "attention.q_proj")) * (hidden // heads) ** -0.5
        k, v_ = split(lin(x, "attention.k_proj")), split(lin(x, "attention.v_proj"))
        attn = (q @ k.transpose(-1, -2)).softmax(-1) @ v_
        x = x + lin(attn.transpose(1, 2).reshape(x.shape), "attention.out_proj")
        x = F.layer_norm(x, (hidden,), state[p + "layer_norm.weight"], state[p + "layer_norm.bias"])
        x = x + lin(F.gelu(lin(x, "feed_forward.intermediate_dense")), "feed_forward.output_dense")
        x = F.layer_norm(x, (hidden,), state[p + "final_layer_norm.weight"], state[p + "final_layer_norm.bias"])
    return x


def test_tiny_checkpoint_matches_the_hugging_face_forward(tmp_path):
    state = hf_state(TINY)
    model = load_hubert(write_hf(tmp_path / "hub", TINY, state))
    wave = torch.randn(1, 16000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(wave)
        expected = hf_reference(state, TINY, wave)
    assert ours.shape == (1, 49, 32)  # 50 Hz at 16 kHz input
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt, parametrized", [("bin", True), ("safetensors", False), ("safetensors", True)])
def test_every_saved_form_loads_the_same_model(tmp_path, fmt, parametrized):
    state = hf_state(TINY, seed=3)
    reference = load_hubert(write_hf(tmp_path / "old", TINY, state))
    if parametrized:
        pos = "encoder.pos_conv_embed.conv."
        state[pos + "parametrizations.weight.original0"] = state.pop(pos + "weight_g")
        state[pos + "parametrizations.weight.original1"] = state.pop(pos + "weight_v")
    state = {f"hubert.{k}": v for k, v in state.items()} | {"lm_head.weight": torch.zeros(3, 32)}
    loaded = load_hubert(write_hf(tmp_path / "new", TINY, state, fmt))
    for key, tensor in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


@pytest.fixture(scope="module")
def gpt_sovits_weights(tmp_path_factory):
    """A chinese-hubert-base folder and an official-format v2 s2G file, both random."""
    root = tmp_path_factory.mktemp("weights")
    hubert_state = hf_state(BASE, seed=9)
    write_hf(root / "chinese-hubert-base", BASE, hubert_state)
    s2_state = random_official_state_dict("s2G_v2", seed=4)
    write_torch_file({"weight": s2_state, "info": "random stand-in"}, root / "s2G_v2.pth")
    return root / "chinese-hubert-base", root / "s2G_v2.pth", hubert_state, s2_state


def test_real_hubert_base_layout_equals_torchaudio_hubert_base(gpt_sovits_weights):
    """Full chinese-hubert-base shapes, checked against torchaudio's own hubert_base()."""
    hubert_dir, _, state, _ = gpt_sovits_weights
    ours = load_hubert(hubert_dir)
    direct = hubert_base().eval()
    renamed = {}
    for key, tensor in state.items():  # the mapping written out key by key, independently
        if key == "masked_spec_embed":
            continue
        if key.startswith("feature_projection"):
            key = "encoder." + key
        elif key == "encoder.pos_conv_embed.conv.weight_g":
            key = "encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original0"
        elif key == "encoder.pos_conv_embed.conv.weight_v":
            key = "encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original1"
        elif key.startswith("encoder."):
            key = "encoder.transformer." + key[len("encoder.") :]
        renamed[key] = tensor
    direct.load_state_dict(renamed, strict=True)
    wave = torch.randn(1, 16000, generator=torch.Generator().manual_seed(2)) * 0.1
    with torch.no_grad():
        expected, _ = direct(wave)
        got, _ = ours(wave)
    assert got.shape == (1, 49, 768)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_broken_checkpoints_are_refused_with_the_reason(tmp_path):
    state = hf_state(TINY)
    del state["encoder.layers.1.final_layer_norm.bias"]
    with pytest.raises(CheckpointError, match="missing"):
        load_hubert(write_hf(tmp_path / "missing", TINY, state))
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_hubert(write_hf(tmp_path / "shape", {**TINY, "intermediate_size": 48}, hf_state(TINY)))
    with pytest.raises(CheckpointError, match="hidden_act"):
        load_hubert(write_hf(tmp_path / "act", {**TINY, "hidden_act": "relu"}, hf_state(TINY)))
    with pytest.raises(CheckpointError, match="no HuBERT weights"):
        load_hubert(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="both --hubert"):
        tokenizer_spec(hubert=tmp_path / "missing")


@pytest.fixture(scope="module")
def hubert_tokenizer(gpt_sovits_weights) -> HubertTokenizer:
    hubert_dir, s2_path, _, _ = gpt_sovits_weights
    spec = tokenizer_spec(hubert_dir, s2_path)
    tokenizer = spec.build()
    assert isinstance(tokenizer, HubertTokenizer) and tokenizer.name == spec.name
    assert spec.name.startswith("hubert-")
    return tokenizer


def test_semantic_codes_follow_gpt_sovits_3_get_semantic(gpt_sovits_weights, hubert_tokenizer):
    _, _, hubert_state, s2_state = gpt_sovits_weights
    tokenizer = hubert_tokenizer
    wave = torch.sin(torch.linspace(0, 1000, 32000)) * 0.3  # 1 s at 32 kHz
    codes = tokenizer.encode(wave)

    # 2-get-hubert-wav32k: x * 1145.14 at 16 kHz through HuBERT's last layer ...
    wave16 = resample(wave * HUBERT_INPUT_SCALE, 32000, 16000)
    ssl = hf_reference(hubert_state, BASE, wave16[None]).transpose(1, 2)  # [1, 768, T50]
    # ... 3-get-semantic: ssl_proj (stride 2) then the nearest codebook vector.
    projected = F.conv1d(ssl, s2_state["ssl_proj.weight"], s2_state["ssl_proj.bias"], stride=2)
    codebook = s2_state["quantizer.vq.layers.0._codebook.embed"]
    expected = torch.cdist(projected[0].T, codebook).argmin(dim=1)
    assert codes.shape == (ssl.shape[-1] // 2,) == (24,)
    assert torch.equal(codes, expected)


def test_reference_codes_follow_gpt_sovits_inference(gpt_sovits_weights, hubert_tokenizer):
    _, _, hubert_state, s2_state = gpt_sovits_weights
    wave = torch.sin(torch.linspace(0, 1000, 32000)) * 0.3
    codes = hubert_tokenizer.encode_reference(wave)

    # get_tts_wav: the 16 kHz reference, unscaled, then int(32000 * 0.3) zeros, through HuBERT ...
    wave16 = torch.cat([resample(wave, 32000, 16000), torch.zeros(9600)])
    ssl = hf_reference(hubert_state, BASE, wave16[None]).transpose(1, 2)
    # ... and extract_latent
    projected = F.conv1d(ssl, s2_state["ssl_proj.weight"], s2_state["ssl_proj.bias"], stride=2)
    expected = torch.cdist(projected[0].T, s2_state["quantizer.vq.layers.0._codebook.embed"]).argmin(dim=1)
    assert codes.shape == (39,) and torch.equal(codes, expected)


@pytest.mark.slow
def test_prepare_with_hubert_records_its_tokenizer_and_its_codes(gpt_sovits_weights, hubert_tokenizer, tmp_path):
    hubert_dir, s2_path, _, _ = gpt_sovits_weights
    wave = (torch.sin(torch.linspace(0, 3000, 24000)) * 0.4).numpy()
    sf.write(tmp_path / "a.wav", wave, 24000, subtype="FLOAT")
    (tmp_path / "a.list").write_text("a.wav|spk|en|Hello there, world.\n", encoding="utf-8")
    spec = tokenizer_spec(hubert_dir, s2_path)
    report = prepare(tmp_path / "a.list", tmp_path / "out", tokenizer=spec, symbols_version="v2", show_progress=False)
    assert report.accepted == 1 and report.tokenizer == spec.name
    cache = FeatureCache(tmp_path / "out")
    item = cache.read_index().items[0]
    stored = cache.load_item(item.id)["semantic_ids"].long()
    mixed = loudness_mix(resample(torch.from_numpy(wave), 24000, 32000))
    assert torch.equal(stored, hubert_tokenizer.encode(mixed)[: len(stored)])
    hubert_frames = (mixed.numel() // 2 - 400) // 320 + 1  # conv stack: 400-sample field, stride 320
    assert len(stored) == item.semantic_tokens == hubert_frames // 2 == 24
