"""What travels between server and clients: the trainable subset, and how it is checked.

Only the trainable subset of a model crosses the network, as a Flower ``ArrayRecord`` in fp16
or fp32 (Flower converts through numpy, which has no bf16). Before the server aggregates an
update it checks it against the global subset it sent: same keys, same shapes, a floating
dtype, finite values, and an L2 norm of the *difference* within a bound. A failed check names
the reason so the server can log it and carry on with the other clients.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

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


def read_update(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The record's arrays as read-only tensors over the bytes that arrived, without copying.

    Flower's ``Array.numpy`` copies each payload into a new array; a server that screens and
    sums N updates only reads them, so it views the ``.npy`` bytes in place (never write to the
    result). Raises :class:`UpdateRejected` (``dtype``) for a payload that is not a plain array.
    """
    try:
        return {name: _view(array) for name, array in record.items()}
    except (TypeError, ValueError) as exc:
        raise UpdateRejected(f"dtype: the update cannot be decoded ({exc})") from exc


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _view(array: Array) -> torch.Tensor:
    stream = io.BytesIO(array.data)
    version = np.lib.format.read_magic(stream)
    header = _NPY_HEADERS.get(version)
    if header is None:
        raise ValueError(f".npy format version {version} is not one np.save writes for plain arrays")
    shape, fortran_order, dtype = header(stream)
    if fortran_order or dtype.hasobject:
        raise ValueError(f"unsupported array layout ({dtype}, fortran order {fortran_order})")
    count = math.prod(shape)
    values = np.frombuffer(array.data, dtype=dtype, count=count, offset=stream.tell()).reshape(shape)
    with warnings.catch_warnings():  # read-only on purpose: nothing writes to a received update
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(values)


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

    One pass over the update for its distance to ``reference`` (fp32, as the mean sums it); a
    non-finite value makes that distance non-finite, so finiteness is only checked then.
    Raises :class:`UpdateRejected` whose message starts with a reason code
    (``keys``, ``shape``, ``dtype``, ``nonfinite``, ``norm``).
    """
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        raise UpdateRejected(
            f"keys: update does not match the global subset (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for name, ref in reference.items():
        got = update[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise UpdateRejected(f"shape: {name} is {tuple(got.shape)}, expected {tuple(ref.shape)}")
        if got.is_floating_point() != ref.is_floating_point() or got.dtype == torch.bfloat16:
            raise UpdateRejected(f"dtype: {name} is {got.dtype}, expected fp16/fp32 like {ref.dtype}")
    squares = [float(torch.linalg.vector_norm(torch.sub(update[name], ref))) ** 2 for name, ref in reference.items()]
    norm = math.sqrt(math.fsum(squares))
    if not math.isfinite(norm):
        for name in reference:
            if update[name].is_floating_point() and not bool(torch.isfinite(update[name]).all()):
                raise UpdateRejected(f"nonfinite: {name} contains NaN or inf")
    if max_update_norm is not None and norm > max_update_norm:
        raise UpdateRejected(f"norm: update norm {norm:.4g} exceeds the bound {max_update_norm:.4g}")
    return norm


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of tensor payload in a record (what one direction of a round costs)."""
    return int(record.count_bytes())
