"""DP-SGD engine: physical batching, fp16 unscaling, non-finite samples, OOM fallback."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedvox.client.dp.engine import make_private, poisson_sample, run_logical_step
from fedvox.client.dp.optimizer import FedvoxDPOptimizer, _flat_buckets
from fedvox.shared.privacy.noise import SecureGaussian

N, D_IN, D_OUT = 24, 6, 3


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, 16), torch.nn.Tanh(), torch.nn.Linear(16, D_OUT))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, D_IN, generator=g), torch.randn(N, D_OUT, generator=g)


def _train_one_step(
    physical: int, *, clip=0.5, noise=1.0, loss_scale=1.0, autocast=None, poison=None, drop=None, oom_above=None
):
    """One logical step on a fixed Poisson draw; returns the parameters after the update."""
    model = _model()
    x, y = _data()
    if poison is not None:
        x = x.clone()
        x[poison] = float("nan")
    private = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=noise,
        clip_norm=clip,
        expected_batch_size=N * 0.5,
        noise_generator=torch.Generator().manual_seed(7),
        loss_scale=loss_scale,
    )
    indices = poisson_sample(N, 0.5, torch.Generator().manual_seed(3))
    if drop is not None:
        indices = indices[indices != drop]

    def accumulate(idx):
        if oom_above is not None and len(idx) > oom_above:
            raise torch.OutOfMemoryError("simulated")
        ctx = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            per_sample = (private.module(x[idx]).float() - y[idx]).pow(2).sum(dim=1)
        (per_sample.sum() * loss_scale).backward()
        return {"loss": float(per_sample.detach().nan_to_num().sum())}

    outcome = run_logical_step(indices, physical, accumulate, [private.optimizer])
    params = [p.detach().clone() for p in model.parameters()]
    private.close()
    return params, outcome, private.optimizer


def _private_sgd(model: torch.nn.Module, noise_multiplier: float = 1.0):
    """``model`` made private with SGD (lr 0.1), clip 1 and an expected batch of 4."""
    return make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=noise_multiplier,
        clip_norm=1.0,
        expected_batch_size=4,
        noise_generator=torch.Generator().manual_seed(0),
    )


def _close(a, b, rtol):
    return all(torch.allclose(p, q, rtol=rtol, atol=rtol) for p, q in zip(a, b, strict=True))


def test_physical_batch_size_does_not_change_the_update():
    full, outcome_full, _ = _train_one_step(physical=64)
    split, outcome_split, _ = _train_one_step(physical=2)
    assert outcome_full.batch_size == outcome_split.batch_size > 4
    assert _close(full, split, 1e-5)
    before = [p.detach() for p in _model().parameters()]
    assert not _close(full, before, 1e-3), "the step must actually change the model"


def test_fp16_loss_scaling_is_undone_before_clipping():
    reference, _, _ = _train_one_step(physical=4, clip=1e6, noise=0.0)
    scaled, _, _ = _train_one_step(physical=4, clip=1e6, noise=0.0, loss_scale=1024.0, autocast=torch.float16)
    assert _close(reference, scaled, 2e-3)


def test_plain_gradscaler_with_opacus_scales_the_update():
    """The silent failure we guard against: stock Opacus + GradScaler updates `scale` times too far."""
    scale = 1024.0
    results = []
    for use_scaler in (False, True):
        model = _model()
        x, y = _data()
        start = [p.detach().clone() for p in model.parameters()]
        module = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        stock = DPOptimizer(
            torch.optim.SGD(model.parameters(), lr=1e-4),
            noise_multiplier=0.0,
            max_grad_norm=1e6,
            expected_batch_size=N,
            loss_reduction="mean",
        )
        scaler = torch.amp.GradScaler("cpu", init_scale=scale, enabled=use_scaler)
        loss = (module(x) - y).pow(2).sum()
        scaler.scale(loss).backward()
        scaler.step(stock)
        results.append([p.detach() - s for p, s in zip(model.parameters(), start, strict=True)])
        module._close()
    ratio = results[1][0].norm() / results[0][0].norm()
    assert ratio == pytest.approx(scale, rel=1e-3)


def test_nonfinite_sample_contributes_exactly_nothing():
    indices = poisson_sample(N, 0.5, torch.Generator().manual_seed(3))
    victim = int(indices[1])
    poisoned, _, _ = _train_one_step(physical=4, poison=victim)
    without_victim, _, _ = _train_one_step(physical=4, drop=victim)
    assert all(torch.isfinite(p).all() for p in poisoned)
    assert _close(poisoned, without_victim, 1e-6)


def test_nonfinite_samples_are_reported_in_stats():
    model = _model()
    x, y = _data()
    x[0] = float("inf")
    private = _private_sgd(model)
    idx = torch.arange(4)

    def accumulate(i):
        (private.module(x[i]) - y[i]).pow(2).sum().backward()
        return {}

    run_logical_step(idx, 4, accumulate, [private.optimizer])
    stats = private.optimizer.take_stats()
    assert stats.samples == 4 and stats.nonfinite_samples == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    private.close()


def test_out_of_memory_retries_with_a_smaller_physical_batch():
    direct, _, _ = _train_one_step(physical=2)
    retried, outcome, _ = _train_one_step(physical=16, oom_above=2)
    assert outcome.oom_retries >= 1 and outcome.physical_batch_size <= 2
    assert _close(direct, retried, 1e-5)


def test_empty_poisson_batch_still_releases_noise():
    model = _model()
    before = copy.deepcopy(model)
    private = _private_sgd(model)
    outcome = run_logical_step(torch.empty(0, dtype=torch.long), 4, lambda i: {}, [private.optimizer])
    assert outcome.batch_size == 0
    moved = [not torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters(), strict=True)]
    assert all(moved)
    private.close()


def test_secure_noise_privatises_all_clipped_sums_of_a_dtype_in_one_draw():
    """Each parameter's update is its slice of one ``SecureGaussian`` release over the
    concatenated sums (zeros here: an empty batch), divided by the expected batch size."""
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    private = _private_sgd(model, noise_multiplier=1.5)
    key = bytes(range(32))
    private.optimizer.secure_noise = SecureGaussian(key)
    run_logical_step(torch.empty(0, dtype=torch.long), 4, lambda i: {}, [private.optimizer])
    sizes = [p.numel() for p in model.parameters()]
    expected = SecureGaussian(key).privatise(torch.zeros(sum(sizes)), 1.5).split(sizes)
    for p, old, noise in zip(model.parameters(), before, expected, strict=True):
        assert torch.equal(p.detach(), old.add(noise.view_as(p) / 4, alpha=-0.1))
    private.close()


def test_lower_precision_per_sample_gradients_are_clipped_in_the_parameters_precision():
    """bf16 per-sample gradients of float32 parameters (bf16 autocast) join the flat buffer
    converted: the clipped sums are float32 and equal the float32 arithmetic on the bf16 values."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in ((4, 3), (5,), (2, 2))]
    optimizer = FedvoxDPOptimizer(
        torch.optim.SGD(params, lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=3
    )
    samples = [torch.randn(3, *p.shape).bfloat16() * 2 for p in params]
    for p, g in zip(params, samples, strict=True):
        p.grad_sample = g
    buckets, large = _flat_buckets(list(zip(params, samples, strict=True)), batch=3)
    assert not large and len(buckets) == 1 and buckets[0].flat.dtype == torch.float32  # one buffer, converted
    optimizer.clip_and_accumulate()
    flat = torch.cat([g.float().flatten(1) for g in samples], dim=1)
    factors = (1.0 / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)
    for p, g in zip(params, samples, strict=True):
        assert p.summed_grad.dtype == torch.float32
        torch.testing.assert_close(p.summed_grad, torch.einsum("b,b...->...", factors, g.float()))
