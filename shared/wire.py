"""What travels between server and clients: the trainable subset, and how it is checked.

Only the trainable subset of a model crosses the network, packed as **one** array in a Flower
``ArrayRecord`` (protocol 3). Flower sends every array as its own objects, one HTTPS request
each across three hops, so a subset of 24 tensors cost ~50 requests a message; one packed array
costs two. The array's ``dtype`` names the encoding, its ``stype`` is :data:`PACKED`, and its
bytes are a little-endian ``uint32`` manifest length, the manifest (JSON: each tensor's name,
shape, byte length and whether it is deflated, in order) and the tensors' bytes back to back.
The manifest holds what the per-tensor arrays of protocol 2 said in their own fields (names,
shapes, lengths, deflated or not): nothing new leaves a device.

- **Down** (server to clients): the global subset's values in the run's ``wire-precision``,
  fp16 or fp32, little-endian.
- **Up** (a client's update), in the run's ``update-encoding``: ``fp16``/``fp32`` send the
  trained values; ``int4`` (the default) and ``int8`` send only the *delta* against the global subset the
  device received, quantised with one fp32 absmax scale per slice along the tensor's shorter
  side (for LoRA factors: one per rank component, A's rows and B's columns) by **unbiased
  stochastic rounding** (``E[decoded] = delta``) to 255 or 15 levels (int4: two values a
  byte), each tensor deflated when that makes it smaller. An update is noised by DP-SGD before
  it is encoded, so the rounding is post-processing: it costs no privacy (docs/privacy.md).

Before the server aggregates an update it reads it in place (:func:`read_update`: no copy of
the received bytes; a quantised tensor is decoded to fp32 one tensor at a time) and checks it
against the subset it sent: same keys, same shapes, a floating dtype, finite values, and an
L2 norm of the *difference* within a bound. A failed check names the reason so the server can
log it and carry on with the other clients. The server's own records (its global model,
checkpoints, Flower's aggregation) stay plain one-array-per-tensor records
(:func:`to_record`, :func:`from_record`).
"""

from __future__ import annotations

import json
import math
import warnings
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedvox.shared.errors import ConfigError, UpdateRejected
from fedvox.shared.protocol import PROTOCOL_VERSION
from fedvox.shared.runconfig import UPDATE_ENCODINGS

WIRE_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "fp32": torch.float32}
LEVELS = {"int8": 127, "int4": 7}
"""Quantised delta encodings and their largest level: values ``-L..L``, symmetric so that zero is
exact (int8: one byte a value; int4: two values a byte, each stored as ``value + 8``)."""
PACKED = "fedvox.packed"
"""``Array.stype`` of a packed subset (its ``dtype`` is the encoding: fp16, fp32, int8 or int4)."""
_NUMPY_DTYPES: dict[str, np.dtype[Any]] = {"fp16": np.dtype("<f2"), "fp32": np.dtype("<f4")}
_HEADER = 4


def wire_dtype(name: str) -> torch.dtype:
    """The torch dtype for a wire precision name (``fp16`` or ``fp32``)."""
    try:
        return WIRE_DTYPES[name]
    except KeyError:
        raise ConfigError(
            f"unknown wire precision {name!r}; use 'fp16' or 'fp32' (bf16 cannot travel in Flower)"
        ) from None


def to_record(state: Mapping[str, torch.Tensor], precision: str = "fp32") -> ArrayRecord:
    """A plain Flower record, one array per tensor (the server's own state; never sent), floating
    tensors cast to ``precision``."""
    dtype = wire_dtype(precision)
    packed = {
        name: (t.detach().to("cpu", dtype) if t.is_floating_point() else t.detach().cpu()).contiguous()
        for name, t in state.items()
    }
    return ArrayRecord(packed)


def from_record(record: ArrayRecord, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Unpack a plain ``ArrayRecord`` into a state dict, floating tensors cast to ``dtype``."""
    state = record.to_torch_state_dict()
    return {name: (t.to(dtype) if t.is_floating_point() else t) for name, t in state.items()}


# ---------------------------------------------------------------------- packing
@dataclass(frozen=True)
class Segment:
    """One tensor's bytes in a packed subset."""

    shape: tuple[int, ...]
    data: memoryview
    deflated: bool = False


def pack(segments: Mapping[str, tuple[tuple[int, ...], bytes, bool]], encoding: str) -> ArrayRecord:
    """One-array record of ``{name: (shape, bytes, deflated)}`` in ``encoding``."""
    manifest = json.dumps(
        {"tensors": [[name, list(shape), len(data), deflated] for name, (shape, data, deflated) in segments.items()]},
        separators=(",", ":"),
    ).encode()
    body = b"".join([len(manifest).to_bytes(_HEADER, "little"), manifest, *(s[1] for s in segments.values())])
    return ArrayRecord({"subset": Array(dtype=encoding, shape=(len(body),), stype=PACKED, data=body)})


def to_wire(state: Mapping[str, torch.Tensor], precision: str = "fp32") -> ArrayRecord:
    """The global subset for the wire: its values in ``precision``, packed as one array.

    Tensors go in name order, so the same subset is the same bytes whatever the order of
    ``state`` (a device's reply cache knows a question again by its bytes: client.releases)."""
    dtype = wire_dtype(precision)
    segments = {}
    for name, value in sorted(state.items()):
        if not value.is_floating_point():
            raise ConfigError(f"{name} is {value.dtype}: only floating tensors train, so only they travel")
        data = value.detach().to("cpu", dtype).contiguous().numpy().astype(_NUMPY_DTYPES[precision], copy=False)
        segments[name] = (tuple(value.shape), data.tobytes(), False)
    return pack(segments, precision)


def from_wire(record: ArrayRecord, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A received subset of values (:func:`to_wire`) as a state dict of new ``dtype`` tensors."""
    received = read_update(record)
    if received.relative:
        raise UpdateRejected(f"encoding: expected values, got {received.encoding} deltas")
    return {name: received[name].to(dtype, copy=True) for name in received}


# ---------------------------------------------------------------------- a client's update
def encode_update(
    trained: Mapping[str, torch.Tensor],
    received: Mapping[str, torch.Tensor],
    encoding: str,
    generator: torch.Generator,
    deflate: bool = True,
) -> ArrayRecord:
    """A client's update for the wire: ``trained`` in ``encoding``, relative to ``received``.

    ``received`` is the global subset as the device decoded it (read-only views are fine: it is
    only read, one tensor at a time); ``generator`` drives the stochastic rounding and must be
    the device's own randomness (never the server's, which could then predict the rounding).
    ``deflate=False`` keeps every tensor raw (sizes that do not depend on the values).
    """
    if encoding in WIRE_DTYPES:
        return to_wire(trained, encoding)
    if encoding not in LEVELS:
        raise ConfigError(f"unknown update encoding {encoding!r}; use one of {', '.join(UPDATE_ENCODINGS)}")
    segments = {}
    for name, value in sorted(trained.items()):
        if not value.is_floating_point():
            raise ConfigError(f"{name} is {value.dtype}: only floating tensors train, so only they travel")
        delta = value.detach().to("cpu", torch.float32) - received[name].float()
        segments[name] = (tuple(delta.shape), *delta_bytes(delta, encoding, generator, deflate))
    return pack(segments, encoding)


def quantize(delta: torch.Tensor, levels: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scales, values)``: ``delta ~ values * scales`` per slice, ``values`` in ``-levels..levels``.

    Each slice's scale is its absmax / ``levels``, and ``x / scale`` is rounded down or up with
    the probabilities that make the expectation exact (``floor(x / scale + u)``, ``u ~ U[0, 1)``),
    so the error is zero-mean, below one step, and independent across elements and devices.
    """
    rows, columns, per_row = _slices(tuple(delta.shape))
    matrix = delta.reshape(rows, columns)
    scales = matrix.abs().amax(dim=1 if per_row else 0, keepdim=True) / levels
    inverse = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
    noise = torch.rand(matrix.shape, generator=generator, dtype=torch.float32)
    values = torch.floor(matrix * inverse + noise).clamp_(-levels, levels).to(torch.int8)
    return scales.reshape(-1), values.reshape(delta.shape)


def dequantize(scales: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The fp32 delta ``values * scales`` (one new tensor)."""
    rows, columns, per_row = _slices(tuple(values.shape))
    scale = scales.reshape(rows, 1) if per_row else scales.reshape(1, columns)
    return values.reshape(rows, columns).to(torch.float32).mul_(scale).reshape(values.shape)


def _slices(shape: tuple[int, ...]) -> tuple[int, int, bool]:
    """The tensor as a ``rows x columns`` matrix, and whether its scales are per row: one scale
    per slice along the shorter side (per rank component of a LoRA factor), one for a vector."""
    if len(shape) <= 1:
        return 1, math.prod(shape), True
    rows, columns = shape[0], math.prod(shape[1:])
    return rows, columns, rows <= columns


def delta_bytes(
    delta: torch.Tensor, encoding: str, generator: torch.Generator, deflate: bool = True
) -> tuple[bytes, bool]:
    """One tensor's delta quantised (:func:`quantize`): fp32 scales then the packed values,
    deflated if ``deflate`` and that is smaller; and whether it was."""
    scales, values = quantize(delta, LEVELS[encoding], generator)
    packed = values.numpy().tobytes() if encoding == "int8" else _pack_int4(values)
    payload = scales.numpy().astype("<f4").tobytes() + packed
    if deflate and len(deflated := zlib.compress(payload)) < len(payload):
        return deflated, True
    return payload, False


def _pack_int4(values: torch.Tensor) -> bytes:
    nibbles = (values.reshape(-1).to(torch.int16) + 8).to(torch.uint8)  # -7..7 as 1..15
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    pairs = nibbles.reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).numpy().tobytes()


def _unpack_int4(packed: torch.Tensor, count: int) -> torch.Tensor:
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:count]
    return nibbles.to(torch.int8) - 8


class ReceivedUpdate(Mapping[str, torch.Tensor]):
    """A packed subset as its receiver reads it, in place.

    ``update[name]`` is the tensor's values, a read-only view of the received fp16/fp32 bytes,
    or, for a quantised update (``relative``), its fp32 delta against what was sent, decoded on
    each access (one tensor at a time: a reader never holds a decoded update whole).
    """

    def __init__(self, segments: Mapping[str, Segment], encoding: str) -> None:
        self._segments = segments
        self.encoding = encoding
        self.relative = encoding in LEVELS

    def __getitem__(self, name: str) -> torch.Tensor:
        segment = self._segments[name]
        return _decode_delta(segment, self.encoding) if self.relative else _view(segment, self.encoding)

    def __iter__(self) -> Iterator[str]:
        return iter(self._segments)

    def __len__(self) -> int:
        return len(self._segments)

    @property
    def deflated_tensors(self) -> int:
        """How many of its tensors arrived deflated."""
        return sum(segment.deflated for segment in self._segments.values())


def read_update(record: ArrayRecord) -> ReceivedUpdate:
    """A packed record (:func:`pack`) as a :class:`ReceivedUpdate`, without copying its bytes.

    Its ``encoding`` is the array's ``dtype`` (``int8``, ``int4``, ``fp16``, ``fp32``). Raises
    :class:`UpdateRejected` (``encoding``) for anything else: a record of another protocol
    (e.g. one array per tensor, fedvox protocol 2), an unknown encoding, or a manifest that
    does not describe the bytes exactly.
    """
    arrays = list(record.values())
    if len(arrays) != 1 or arrays[0].stype != PACKED:
        kinds = ", ".join(sorted({a.stype for a in arrays})) or "none"
        raise UpdateRejected(
            f"encoding: expected one {PACKED} array (fedvox protocol {PROTOCOL_VERSION}), got {len(arrays)} "
            f"of type {kinds}: run the same fedvox release on the server and its clients"
        )
    array = arrays[0]
    encoding = array.dtype
    if encoding not in _NUMPY_DTYPES and encoding not in LEVELS:
        raise UpdateRejected(f"encoding: {encoding!r} is not an encoding fedvox sends")
    return ReceivedUpdate(_manifest(memoryview(array.data)), encoding)


def _manifest(data: memoryview) -> dict[str, Segment]:
    """The segments a packed array's manifest describes; they must tile its bytes exactly."""
    try:
        if len(data) < _HEADER:
            raise ValueError("no manifest")
        size = int.from_bytes(data[:_HEADER], "little")
        if _HEADER + size > len(data):
            raise ValueError("the manifest runs past the array")
        entries = json.loads(bytes(data[_HEADER : _HEADER + size]))["tensors"]
        segments, offset = {}, _HEADER + size
        for name, shape, length, deflated in entries:
            if not isinstance(name, str) or name in segments:
                raise ValueError("tensor names must be distinct strings")
            if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
                raise ValueError(f"{name}: bad shape {shape!r}")
            if not isinstance(length, int) or length < 0 or offset + length > len(data):
                raise ValueError(f"{name}: bad length {length!r}")
            segments[name] = Segment(tuple(shape), data[offset : offset + length], bool(deflated))
            offset += length
        if offset != len(data):
            raise ValueError(f"{len(data) - offset} bytes follow the last tensor")
    except (ValueError, TypeError, KeyError) as exc:  # json's errors are ValueErrors
        raise UpdateRejected(f"encoding: the packed subset's manifest is malformed ({exc})") from None
    return segments


def _view(segment: Segment, encoding: str) -> torch.Tensor:
    dtype = _NUMPY_DTYPES[encoding]
    count = math.prod(segment.shape)
    if segment.deflated or len(segment.data) != count * dtype.itemsize:
        raise UpdateRejected(
            f"encoding: an {encoding} tensor of shape {segment.shape} needs {count * dtype.itemsize} raw bytes, "
            f"got {len(segment.data)}{' deflated' if segment.deflated else ''}"
        )
    return _tensor(np.frombuffer(segment.data, dtype=dtype, count=count).reshape(segment.shape))


def _decode_delta(segment: Segment, encoding: str) -> torch.Tensor:
    shape = segment.shape
    rows, columns, per_row = _slices(shape)
    scales = rows if per_row else columns
    count = math.prod(shape)
    size = 4 * scales + (count if encoding == "int8" else (count + 1) // 2)
    data: bytes | memoryview = segment.data
    if segment.deflated:
        inflater = zlib.decompressobj()
        try:
            data = inflater.decompress(data, size + 1)  # never inflates past what the shape allows
        except zlib.error as exc:
            raise UpdateRejected(f"encoding: a deflated {encoding} tensor does not inflate ({exc})") from None
        if not inflater.eof or inflater.unused_data:  # cut short (checksum unchecked) or trailing bytes
            raise UpdateRejected(f"encoding: a deflated {encoding} tensor is not one whole deflate stream")
    if len(data) != size:
        raise UpdateRejected(f"encoding: an {encoding} tensor of shape {shape} needs {size} bytes, got {len(data)}")
    scale = _tensor(np.frombuffer(data, dtype="<f4", count=scales))
    if encoding == "int8":
        values = _tensor(np.frombuffer(data, dtype=np.int8, offset=4 * scales))
    else:
        values = _unpack_int4(_tensor(np.frombuffer(data, dtype=np.uint8, offset=4 * scales)), count)
    return dequantize(scale, values.reshape(shape))


def _tensor(values: np.ndarray) -> torch.Tensor:
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

    ``update`` holds trained values, or deltas when it is a relative :class:`ReceivedUpdate`
    (then the norm is the decoded delta's: what the server will average). One pass over the
    update for its distance to ``reference`` (fp32, as the mean sums it); a non-finite value
    makes that distance non-finite, so finiteness is only checked then.
    Raises :class:`UpdateRejected` whose message starts with a reason code
    (``keys``, ``shape``, ``dtype``, ``nonfinite``, ``norm``).
    """
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        raise UpdateRejected(
            f"keys: update does not match the global subset (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    relative = isinstance(update, ReceivedUpdate) and update.relative
    squares = []
    for name, ref in reference.items():
        got = update[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise UpdateRejected(f"shape: {name} is {tuple(got.shape)}, expected {tuple(ref.shape)}")
        if got.is_floating_point() != ref.is_floating_point() or got.dtype == torch.bfloat16:
            raise UpdateRejected(f"dtype: {name} is {got.dtype}, expected fp16/fp32 like {ref.dtype}")
        squares.append(float(torch.linalg.vector_norm(got if relative else torch.sub(got, ref))) ** 2)
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
