"""Per-sample gradient checks: Opacus (hooks) against per-example autograd.

DP-SGD is only as private as its per-sample gradients are exact: each row of ``grad_sample`` must
be the gradient of that sample's loss alone. These helpers compute both and compare them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from opacus import GradSampleModule

LossFn = Callable[[torch.nn.Module, object], torch.Tensor]
"""``loss_fn(model, batch) -> per-sample losses [B]``."""


def opacus_per_sample_grads(
    model: torch.nn.Module, loss_fn: LossFn, batch, gsm_class: type[GradSampleModule] = GradSampleModule
) -> dict[str, torch.Tensor]:
    """``{name: grad_sample [B, *shape]}`` for every trainable parameter, from Opacus hooks."""
    gsm = gsm_class(model, batch_first=True, loss_reduction="sum", strict=True)
    try:
        gsm.zero_grad(set_to_none=True)
        loss_fn(gsm, batch).sum().backward()
        grads = {}
        for name, param in gsm._module.named_parameters():
            if not param.requires_grad:
                continue
            if getattr(param, "grad_sample", None) is None:
                raise AssertionError(f"Opacus computed no per-sample gradient for {name}")
            grads[name] = param.grad_sample.detach().clone()
        return grads
    finally:
        gsm._close()


def reference_per_sample_grads(model: torch.nn.Module, loss_fn: LossFn, batch) -> dict[str, torch.Tensor]:
    """``{name: [B, *shape]}`` by back-propagating each sample's loss on its own."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for i in range(len(batch)):
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch.select(torch.tensor([i]))).sum().backward()
        for name, param in params.items():
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            rows[name].append(grad.detach().clone())
    model.zero_grad(set_to_none=True)
    return {name: torch.stack(values) for name, values in rows.items()}


def assert_per_sample_grads_match(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batch,
    rtol: float,
    atol_scale: float = 1e-3,
    gsm_class: type[GradSampleModule] = GradSampleModule,
) -> int:
    """Assert Opacus's per-sample gradients equal per-example autograd; returns tensors checked.

    The error of each tensor is measured relative to the largest per-sample gradient norm of that
    tensor (``atol_scale`` floors the scale for tensors whose gradient is ~0, e.g. the k-bias whose
    true gradient vanishes by softmax shift invariance).
    """
    expected = reference_per_sample_grads(model, loss_fn, batch)
    actual = opacus_per_sample_grads(model, loss_fn, batch, gsm_class)
    assert actual.keys() == expected.keys(), set(actual) ^ set(expected)
    for name, ref in expected.items():
        got = actual[name]
        assert got.shape == ref.shape, (name, got.shape, ref.shape)
        scale = max(ref.flatten(1).norm(dim=1).max().item(), atol_scale)
        err = (got - ref).flatten(1).norm(dim=1).max().item() / scale
        assert err <= rtol, f"{name}: relative per-sample gradient error {err:.2e} > {rtol:.0e}"
    return len(expected)


def assert_clipped_sums_match(model: torch.nn.Module, loss_fn: LossFn, batch, rtol: float) -> dict[str, int]:
    """Assert the DP engine's per-sample norms and clipped sums equal per-example autograd's.

    The engine (``make_private``: explicit per-sample gradients and book-keeping records) runs
    one noiseless step's clipping on ``batch`` with the clip norm at the median per-sample norm,
    so some samples are clipped and some are not; its ``sum_i min(1, C / ||g_i||) g_i`` must equal
    the one formed from per-example gradients, for every trainable tensor. Returns how many
    tensors went through each path (``{"explicit": n, "book": m}``).
    """
    from fedvox.client.dp.engine import make_private

    expected = reference_per_sample_grads(model, loss_fn, batch)
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in expected.values()]).sum(0).sqrt()
    clip = float(norms.median())
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    private = make_private(
        model,
        torch.optim.SGD(list(params.values()), lr=0.0),
        noise_multiplier=0.0,
        clip_norm=clip,
        expected_batch_size=1.0,
        noise_generator=torch.Generator().manual_seed(0),
    )
    try:
        private.module.backward(loss_fn(private.module, batch).sum())
        paths = {
            "explicit": sum(1 for p in params.values() if p.grad_sample is not None),
            "book": sum(1 for p in params.values() if getattr(p, "book", None) is not None),
        }
        assert private.optimizer.pre_step()
        engine_norms = torch.cat(private.optimizer.take_stats().norms)
        torch.testing.assert_close(engine_norms, norms.to(engine_norms.dtype), rtol=rtol, atol=0.0)
        for name, ref in expected.items():
            want = torch.einsum("b,b...->...", factors.to(ref.dtype), ref)
            got = params[name].grad
            scale = max(float(ref.flatten(1).norm(dim=1).max()), 1e-3)
            err = float((got - want).norm()) / scale
            assert err <= rtol, f"{name}: relative clipped-sum error {err:.2e} > {rtol:.0e}"
    finally:
        private.optimizer.zero_grad(set_to_none=True)  # per-sample state and records too: the model is reused
        private.close()
    return paths
