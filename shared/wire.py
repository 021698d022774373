"""What travels between server and clients: the trainable subset, and how it is checked.

Only the trainable subset of a model crosses the network, as a Flower ``ArrayRecord`` in fp16
or fp32 (Flower converts through numpy, which has no bf16). Before the server aggregates an
update it checks it against the global subset it sent: same keys, same shapes, a floating
dtype, finite values, and an L2 norm of the *difference* within a bound. A failed check names
the reason so the server can log it and carry on with the other clients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord

from fedvox.shared.errors import ConfigError, UpdateRejected

WIRE_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "fp32": torch.float32}


def wire_dtype(name: str) -> torch.dtype:
    """The torch dtype for a wire precision name (``fp16`` or ``fp32``)."""
    try:
        return WIRE_DTYPES[name]
    except KeyError:
        raise ConfigError(
            f"unknown wire precision {name!r}; use 'fp16' or 'fp32' (bf16 cannot travel in Flower)"
        ) from None


def to_record(state: Mapping[str, torch.Tensor], precision: str = "fp32") -> ArrayRecord:
    """Pack a trainable state dict for the wire, casting floating tensors to ``precision``."""
    dtype = wire_dtype(precision)
    packed = {
        name: (t.detach().to("cpu", dtype) if t.is_floating_point() else t.detach().cpu()).contiguous()
        for name, t in state.items()
    }
    return ArrayRecord(packed)


def from_record(record: ArrayRecord, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Unpack an ``ArrayRecord`` into a state dict, floating tensors cast to ``dtype``."""
    state = record.to_torch_state_dict()
    return {name: (t.to(dtype) if t.is_floating_point() else t) for name, t in state.items()}


def update_norm(reference: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of ``update - reference`` over all tensors, accumulated in float64."""
    total = 0.0
    for name, ref in reference.items():
        diff = update[name].double() - ref.double()
        total += float(diff.pow(2).sum())
    return math.sqrt(total)


def validate_update(
    reference: Mapping[str, torch.Tensor],
    update: Mapping[str, torch.Tensor],
    max_update_norm: float | None = None,
) -> float:
    """Check ``update`` against the global ``reference`` it was trained from; return its norm.

    Raises :class:`UpdateRejected` whose message starts with a reason code
    (``keys``, ``shape``, ``dtype``, ``nonfinite``, ``norm``).
    """
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        raise UpdateRejected(
            f"keys: update does not match the global subset (missing {missing[:3]}, "
            f"unexpected {extra[:3]})"
        )
    for name, ref in reference.items():
        got = update[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise UpdateRejected(f"shape: {name} is {tuple(got.shape)}, expected {tuple(ref.shape)}")
        if got.is_floating_point() != ref.is_floating_point() or got.dtype == torch.bfloat16:
            raise UpdateRejected(f"dtype: {name} is {got.dtype}, expected fp16/fp32 like {ref.dtype}")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise UpdateRejected(f"nonfinite: {name} contains NaN or inf")
    norm = update_norm(reference, update)
    if max_update_norm is not None and norm > max_update_norm:
        raise UpdateRejected(f"norm: update norm {norm:.4g} exceeds the bound {max_update_norm:.4g}")
    return norm


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of tensor payload in a record (what one direction of a round costs)."""
    return int(record.count_bytes())
