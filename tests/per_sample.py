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
