"""What travels between server and clients: the trainable subset, and how it is checked.

Only the trainable subset of a model crosses the network, as a Flower ``ArrayRecord``.

- **Down** (server to clients): the global subset's values in the run's ``wire-precision``,
  fp16 or fp32 (Flower converts through numpy, which has no bf16).
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
log it and carry on with the other clients.
"""

from __future__ import annotations

import io
import math
import warnings
import zlib
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedvox.shared.errors import ConfigError, UpdateRejected
from fedvox.shared.runconfig import UPDATE_ENCODINGS

WIRE_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "fp32": torch.float32}
LEVELS = {"int8": 127, "int4": 7}
"""Quantised delta encodings and their largest level: values ``-L..L``, symmetric so that zero is
exact (int8: one byte a value; int4: two values a byte, each stored as ``value + 8``)."""
DELTA_STYPES = {f"fedvox.{encoding}-delta": encoding for encoding in LEVELS}
"""``Array.stype`` of a quantised delta: fp32 scales (little-endian), then the packed values."""
DEFLATED = "+deflate"
"""Suffix of ``Array.stype`` when those bytes are deflated (zlib)."""
_NUMPY = "numpy.ndarray"


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
    """Unpack an ``ArrayRecord`` of values into a state dict, floating tensors cast to ``dtype``."""
    state = record.to_torch_state_dict()
    return {name: (t.to(dtype) if t.is_floating_point() else t) for name, t in state.items()}


# ---------------------------------------------------------------------- a client's update
def encode_update(
    trained: Mapping[str, torch.Tensor],
    received: Mapping[str, torch.Tensor],
    encoding: str,
    generator: torch.Generator,
) -> ArrayRecord:
    """A client's update for the wire: ``trained`` in ``encoding``, relative to ``received``.

    ``received`` is the global subset as the device decoded it (read-only views are fine: it is
    only read, one tensor at a time); ``generator`` drives the stochastic rounding and must be
    the device's own randomness (never the server's, which could then predict the rounding).
    """
    if encoding in WIRE_DTYPES:
        return to_record(trained, encoding)
    if encoding not in LEVELS:
        raise ConfigError(f"unknown update encoding {encoding!r}; use one of {', '.join(UPDATE_ENCODINGS)}")
    arrays = {}
    for name, value in trained.items():
        if not value.is_floating_point():
            raise ConfigError(f"{name} is {value.dtype}: only floating tensors train, so only they travel")
        delta = value.detach().to("cpu", torch.float32) - received[name].float()
        arrays[name] = delta_array(delta, encoding, generator)
    return ArrayRecord(arrays)


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


def delta_array(delta: torch.Tensor, encoding: str, generator: torch.Generator, deflate: bool = True) -> Array:
    """One tensor's delta as a quantised ``Array`` (:func:`quantize`), deflated if that is smaller."""
    scales, values = quantize(delta, LEVELS[encoding], generator)
    packed = values.numpy().tobytes() if encoding == "int8" else _pack_int4(values)
    payload = scales.numpy().astype("<f4").tobytes() + packed
    stype = f"fedvox.{encoding}-delta"
    if deflate and len(deflated := zlib.compress(payload)) < len(payload):
        stype, payload = stype + DEFLATED, deflated
    return Array(dtype=encoding, shape=tuple(delta.shape), stype=stype, data=payload)


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
    """An update as the server reads it, in place.

    ``update[name]`` is the tensor's trained values, a read-only view of the received fp16/fp32
    bytes, or, for a quantised update (``relative``), its fp32 delta against what was sent, decoded
    on each access (one tensor at a time: a reader never holds a decoded update whole).
    """

    def __init__(self, arrays: Mapping[str, Array], encoding: str) -> None:
        self._arrays = arrays
        self.encoding = encoding
        self.relative = encoding in LEVELS

    def __getitem__(self, name: str) -> torch.Tensor:
        array = self._arrays[name]
        return _decode_delta(array, self.encoding) if self.relative else _view(array)

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)


def read_update(record: ArrayRecord) -> ReceivedUpdate:
    """The record as a :class:`ReceivedUpdate`, without copying the bytes that arrived.

    Flower's ``Array.numpy`` copies each payload into a new array; a server that screens and
    sums N updates only reads them, so it views the ``.npy`` bytes in place (never write to the
    result). Its ``encoding`` is what the arrays say they are (``int8``, ``int4``, ``fp16``, ``fp32``,
    or another numpy dtype the screen then refuses). Raises :class:`UpdateRejected`
    (``encoding``) for arrays in no encoding fedvox sends, or in two at once.
    """
    kinds = {_encoding(array) for array in record.values()}
    if len(kinds) > 1:
        raise UpdateRejected(f"encoding: the update mixes encodings ({', '.join(sorted(kinds))})")
    return ReceivedUpdate(dict(record.items()), kinds.pop() if kinds else "fp32")


def _encoding(array: Array) -> str:
    if (encoding := DELTA_STYPES.get(array.stype.removesuffix(DEFLATED))) is not None:
        return encoding
    if array.stype != _NUMPY:
        raise UpdateRejected(f"encoding: arrays of type {array.stype!r} are not a fedvox update")
    return {"float16": "fp16", "float32": "fp32"}.get(array.dtype, array.dtype)


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _view(array: Array) -> torch.Tensor:
    try:
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
    except (TypeError, ValueError) as exc:
        raise UpdateRejected(f"dtype: the update cannot be decoded ({exc})") from exc
    return _tensor(values)


def _decode_delta(array: Array, encoding: str) -> torch.Tensor:
    shape = tuple(array.shape)
    rows, columns, per_row = _slices(shape)
    scales = rows if per_row else columns
    count = math.prod(shape)
    size = 4 * scales + (count if encoding == "int8" else (count + 1) // 2)
    data = array.data
    if array.stype.endswith(DEFLATED):
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
