"""SoVITS generator and discriminator: sizes, the per-sample contract, training, inference."""

from __future__ import annotations

import copy

import pytest
import torch

from fedvox.shared.audio import HOP_LENGTH
from fedvox.shared.errors import ConfigError, DataError
from fedvox.shared.models.config import CONFIG_NAMES, s2_config
from fedvox.shared.models.interop import manifest
from fedvox.shared.models.s2 import (
    MultiPeriodDiscriminator,
    SynthesizerTrn,
    draw_randomness,
    draw_slice_starts,
    frozen,
    generator_losses,
)
from fedvox.shared.models.s2.gan import discriminator_losses
from fedvox.shared.models.subsets import SubsetSpec, apply_subset
from tests.s2_batches import (
    fixed_randomness,
    random_s2_batch,
    single_thread,  # noqa: F401  (autouse: one CPU thread)
    unpadded,
)

TINY = s2_config("tiny")


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("version", ["v1", "v2", "v2Pro", "v2ProPlus"])
def test_parameter_counts_equal_official(version: str) -> None:
    config = s2_config(version)
    assert _trainable(SynthesizerTrn(config)) == manifest(f"s2G_{version}")["num_parameters"]
    d_manifest = "s2D_v2Pro" if config.is_pro else "s2D_v2"
    assert _trainable(MultiPeriodDiscriminator(config)) == manifest(d_manifest)["num_parameters"]


def test_every_config_builds_and_tiny_is_small() -> None:
    assert set(CONFIG_NAMES) == {"tiny", "base", "v1", "v2", "v2Pro", "v2ProPlus"}
    assert _trainable(SynthesizerTrn(TINY)) < 2_000_000
    assert _trainable(MultiPeriodDiscriminator(TINY)) < 50_000


def test_deepcopy_gives_an_independent_identical_model() -> None:
    torch.manual_seed(0)
    g, d = SynthesizerTrn(TINY).eval(), MultiPeriodDiscriminator(TINY)
    step = fixed_randomness(random_s2_batch(TINY, [6, 4], [5, 3]), TINY)
    g2, d2 = copy.deepcopy(g), copy.deepcopy(d)
    kwargs = dict(slice_starts=step.slice_starts, posterior_noise=step.posterior_noise)
    with torch.no_grad():
        out, out2 = g(step.batch, **kwargs), g2(step.batch, **kwargs)
        assert torch.equal(out.wave_hat, out2.wave_hat)
        assert torch.equal(d(out.wave_hat)[0][1], d2(out.wave_hat)[0][1])
        next(g2.dec.parameters()).add_(1.0)
    assert not torch.equal(next(g.dec.parameters()), next(g2.dec.parameters()))


def test_per_sample_losses_do_not_depend_on_the_rest_of_the_batch() -> None:
    """The DP contract: a sample's losses are the same padded among others or alone.

    float64 model; the tolerance is float32's because shared.audio computes spectra in float32.
    """
    torch.manual_seed(0)
    config = s2_config("tiny", p_dropout=0.0, style_dropout=0.0)
    g, d = SynthesizerTrn(config).double(), MultiPeriodDiscriminator(config).double()
    batch = random_s2_batch(config, [7, 5, 3], [6, 2, 4], seed=3, dtype=torch.float64, extra_padding=2)
    step = fixed_randomness(batch, config, seed=4, dtype=torch.float64)
    with torch.no_grad(), frozen(d):
        out = g(batch, slice_starts=step.slice_starts, posterior_noise=step.posterior_noise)
        together = generator_losses(d, batch, out, config)
        d_together = discriminator_losses(d, batch, out, config)
        for i in range(len(batch)):
            alone = unpadded(batch, i)
            out_i = g(alone, slice_starts=step.slice_starts[i : i + 1], posterior_noise=step.posterior_noise[i : i + 1])
            losses_i = generator_losses(d, alone, out_i, config)
            for name, value in losses_i.items():
                torch.testing.assert_close(value[0], together[name][i], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(
                discriminator_losses(d, alone, out_i, config)[0], d_together[i], rtol=1e-6, atol=1e-6
            )


def test_physical_batches_reproduce_the_logical_batch() -> None:
    """Randomness drawn once per logical batch; any split recomputes the same per-sample losses."""
    torch.manual_seed(0)
    config = s2_config("tiny", p_dropout=0.0, style_dropout=0.0)
    g, d = SynthesizerTrn(config).double(), MultiPeriodDiscriminator(config).double()
    batch = random_s2_batch(config, [4, 9, 6, 7], [3, 5, 4, 6], seed=5, dtype=torch.float64)
    starts, noise = draw_randomness(batch.spec_lengths, config, torch.Generator().manual_seed(1))
    with torch.no_grad(), frozen(d):
        whole = generator_losses(d, batch, g(batch, slice_starts=starts, posterior_noise=noise), config)
        for rows in (torch.tensor([0, 2]), torch.tensor([1, 3])):
            part = batch.select(rows)
            out = g(part, slice_starts=starts[rows], posterior_noise=noise[rows.tolist()])
            torch.testing.assert_close(
                generator_losses(d, part, out, config)["total"], whole["total"][rows], rtol=1e-6, atol=1e-6
            )


def test_slice_starts_are_per_sample_reproducible_and_in_range() -> None:
    lengths = torch.tensor([40, 9, 8, 3])
    a = draw_slice_starts(lengths, 8, torch.Generator().manual_seed(5))
    b = draw_slice_starts(lengths, 8, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert bool(((a >= 0) & (a <= (lengths - 8).clamp(min=0))).all())
    many = draw_slice_starts(lengths.repeat(500), 8, torch.Generator().manual_seed(6)).view(500, 4)
    assert set(many[:, 0].tolist()) == set(range(33)) and set(many[:, 1].tolist()) == {0, 1}

    torch.manual_seed(0)
    g = SynthesizerTrn(TINY).eval()
    batch = random_s2_batch(TINY, [20, 6], [5, 5])
    with torch.no_grad():
        x = g(batch, generator=torch.Generator().manual_seed(7))
        y = g(batch, generator=torch.Generator().manual_seed(7))
        z = g(batch, slice_starts=x.slice_starts, posterior_noise=torch.zeros(2, TINY.inter_channels, 40))
    assert torch.equal(x.wave_hat, y.wave_hat) and torch.equal(x.slice_starts, z.slice_starts)
    assert x.wave_hat.shape == (2, 1, TINY.segment_frames * HOP_LENGTH)


def test_codebook_stays_frozen_while_a_gan_pair_trains_and_mel_loss_falls() -> None:
    torch.manual_seed(0)
    g, d = SynthesizerTrn(TINY), MultiPeriodDiscriminator(TINY)
    apply_subset(g, SubsetSpec(kind="full"))
    codebook = {k: v.clone() for k, v in g.quantizer.state_dict().items()}
    step = fixed_randomness(random_s2_batch(TINY, [6, 5], [4, 3], seed=1), TINY, seed=2)
    opt_g = torch.optim.AdamW(g.param_groups(2e-3), betas=(0.8, 0.99), eps=1e-9)
    opt_d = torch.optim.AdamW(d.parameters(), 2e-3, betas=(0.8, 0.99), eps=1e-9)
    g.train()
    mel = []
    for _ in range(12):
        assert not g.quantizer.training
        out = g(step.batch, slice_starts=step.slice_starts, posterior_noise=step.posterior_noise)
        opt_d.zero_grad()
        discriminator_losses(d, step.batch, out, TINY).sum().backward()
        opt_d.step()
        d_grads = [p.grad.clone() for p in d.parameters()]
        opt_g.zero_grad()
        with frozen(d):
            losses = generator_losses(d, step.batch, out, TINY)
            losses["total"].sum().backward()
        assert all(torch.equal(p.grad, g0) for p, g0 in zip(d.parameters(), d_grads, strict=True))
        assert all(p.requires_grad for p in d.parameters())
        opt_g.step()
        mel.append(losses["mel"].mean().item())
    assert mel[-1] < 0.75 * mel[0], mel
    assert g.ssl_proj.weight.grad is None
    for name, value in g.quantizer.state_dict().items():
        assert torch.equal(value, codebook[name]), name
    assert g.quantizer.inited.item() == 1


def test_param_groups_put_the_text_side_at_the_low_learning_rate() -> None:
    g = SynthesizerTrn(TINY)
    apply_subset(g, SubsetSpec(kind="full"))
    base, text = g.param_groups(1e-4)
    assert text["lr"] == pytest.approx(0.4e-4) and base["lr"] == 1e-4
    text_ids = {id(p) for p in text["params"]}
    for prefix in ("enc_p.text_embedding", "enc_p.encoder_text", "enc_p.mrte"):
        assert all(id(p) in text_ids for p in g.get_submodule(prefix).parameters())
    assert len(base["params"]) + len(text["params"]) == sum(1 for p in g.parameters() if p.requires_grad)


def test_ssl_path_matches_the_code_path_and_returns_a_commitment_loss() -> None:
    torch.manual_seed(0)
    g = SynthesizerTrn(TINY).eval()
    batch = random_s2_batch(TINY, [6, 4], [5, 3])
    ssl = torch.randn(2, TINY.ssl_dim, 12)
    codes = g.extract_latent(ssl)
    assert codes.shape == (2, 6) and codes.dtype == torch.long
    batch.semantic_ids = codes
    step = fixed_randomness(batch, TINY)
    kwargs = dict(slice_starts=step.slice_starts, posterior_noise=step.posterior_noise)
    with torch.no_grad():
        from_codes = g(batch, **kwargs)
        from_ssl = g(batch, ssl_features=ssl, **kwargs)
    torch.testing.assert_close(from_ssl.wave_hat, from_codes.wave_hat)
    assert torch.equal(from_codes.commitment, torch.zeros(2))
    assert bool((from_ssl.commitment > 0).all())
    # the straight-through estimator sends the commitment and content gradients into ssl_proj
    g.ssl_proj.requires_grad_(True)
    out = g(batch, ssl_features=ssl, **kwargs)
    (out.commitment.sum() + out.m_p.sum()).backward()
    assert g.ssl_proj.weight.grad is not None and g.ssl_proj.weight.grad.abs().sum() > 0


def test_pro_models_require_the_speaker_embedding() -> None:
    config = s2_config("tiny", sv_dim=64, mrte_hidden=16)
    g = SynthesizerTrn(config)
    batch = random_s2_batch(config, [4], [3])
    batch.sv_embedding = None
    with pytest.raises(DataError, match="speaker-verification embedding"):
        g(batch)


def test_inconsistent_configs_are_refused() -> None:
    with pytest.raises(ConfigError, match="gin_channels"):
        SynthesizerTrn(s2_config("tiny", gin_channels=16))
    with pytest.raises(ConfigError, match="not divisible by 3 heads"):
        SynthesizerTrn(s2_config("tiny", n_heads=3))


def test_mismatched_spec_and_semantic_lengths_are_refused() -> None:
    g = SynthesizerTrn(TINY)
    batch = random_s2_batch(TINY, [4], [3])
    batch.semantic_ids = batch.semantic_ids[:, :3]
    with pytest.raises(DataError, match="2 x semantic tokens"):
        g(batch)


@pytest.mark.parametrize("speed", [1.0, 1.25])
def test_decode_speaks_a_finite_waveform_of_the_expected_length(speed: float) -> None:
    torch.manual_seed(0)
    g = SynthesizerTrn(TINY).eval()
    codes = torch.randint(0, 1024, (1, 10))
    phonemes = torch.randint(1, 700, (1, 7))
    refer = random_s2_batch(TINY, [9], [1]).spec
    wave = g.decode(codes, phonemes, refer, noise_scale=0.5, speed=speed, generator=torch.Generator().manual_seed(0))
    frames = 20 if speed == 1.0 else int(20 / speed) + 1
    assert wave.shape == (1, 1, frames * HOP_LENGTH)
    assert bool(torch.isfinite(wave).all()) and wave.abs().max() <= 1.0 and wave.std() > 0


def test_bf16_autocast_forward_and_losses_run_on_cpu() -> None:
    torch.manual_seed(0)
    g, d = SynthesizerTrn(TINY), MultiPeriodDiscriminator(TINY)
    step = fixed_randomness(random_s2_batch(TINY, [6, 5], [4, 3]), TINY)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = g(step.batch, slice_starts=step.slice_starts, posterior_noise=step.posterior_noise)
        d_loss = discriminator_losses(d, step.batch, out, TINY)
        with frozen(d):
            g_loss = generator_losses(d, step.batch, out, TINY)["total"]
    assert out.wave_hat.dtype == torch.bfloat16
    assert bool(torch.isfinite(d_loss).all() and torch.isfinite(g_loss).all())
    (d_loss.sum() + g_loss.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in g.dec.parameters() if p.grad is not None)
