"""Gaussian noise from a secret keyed stream (ChaCha20), released on a grid, safe from float attacks.

Two things make textbook noise code unsafe for DP, and :class:`SecureGaussian` addresses both:

- **Predictable randomness.** torch's generators (Mersenne Twister, Philox) are not secure: their
  state can be recovered from their outputs. Here the noise is a function of a 32-byte key
  (derived per release from the device's secret key, :mod:`client.releases`) and a draw counter,
  through the ChaCha20 keystream (``cryptography``); each draw has its own nonce, so no two draws
  share keystream. The same key redoes the same release after a crash.
- **Floating-point artefacts** (Mironov 2012 for Laplace; Jin et al. 2022 and Haney et al. 2022
  for Box-Muller and other Gaussian samplers). ``x + noise`` computed in floating point has a set
  of possible results that depends on ``x`` (which floats are reachable, and how often), so one
  output can rule out a neighbouring input whatever the noise scale.
  :meth:`SecureGaussian.privatise` instead releases exactly ``g * round((x + std * Z) / g)``
  where ``Z`` is the *ideal* real-valued Box-Muller deviate of the real uniforms whose first
  53 bits the keystream gives: rounding the ideal mechanism's output to a fixed grid is
  post-processing, so the Gaussian mechanism's guarantee holds unchanged, without any epsilon or
  delta adjustment. It is computed by interval refinement (Haney et al. 2022): float64 gives an
  interval certain to contain ``(x + std * Z) / g`` (bounds widened by :data:`MARGIN`, far above
  the few-ulp error of libm and IEEE arithmetic); where it holds one grid point, that is the
  answer; the rare coordinates whose interval straddles a rounding boundary are redone with
  mpmath's interval arithmetic on more keystream bits of the same uniforms until it does not.

The grid ``g`` is a power of two :data:`GRID_BITS` binary orders below ``std`` (a public value),
so every output is a grid point whatever ``x``, exact in float64 and in float32 up to
``2^(24 - GRID_BITS) * std``. What is not covered (docs/privacy.md, "Floating point"): the
sensitivity of ``x`` itself (the float32 clipped sum), and the time the computation takes.

Where it runs: the keystream is made on the CPU; the float64 arithmetic runs in numpy for a
tensor on the CPU and in torch on the tensor's own device otherwise (CUDA's float64 ``log1p``,
``sqrt``, ``sin`` and ``cos`` err by at most 2 ulps, within :data:`MARGIN`), so an accelerator's
sums never make a round trip through the host. Both give the same grid points (tested on the
CPU; ``bench/gpu.sh`` checks a GPU's against the CPU's). Cost: ``bench/secure_noise.py``.
"""

from __future__ import annotations

import math
from typing import Any

import mpmath
import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from mpmath import iv

from fedvox.shared.errors import ConfigError, PrivacyError

Array = Any
"""A numpy array (the arithmetic on the CPU) or a torch tensor (on an accelerator)."""
KEY_BYTES = 32
GRID_BITS = 16
"""The output grid is ``2^(floor(log2 std) - GRID_BITS)``: finer than any training can notice."""
MARGIN = 2.0**-44
"""Relative widening of the float64 bounds: libm's log, sqrt, cos, sin and IEEE arithmetic err by
a few ulps (2^-52 each), so this covers their errors over a hundred times."""
UNIFORM_BITS = 53
_TRIG_SLACK = 2.0**-44
"""cos and sin are 1-Lipschitz: over U2's interval (width 2 pi 2^-53) and the computed angle's
rounding they move by less than 2^-48, and libm errs by an ulp more."""
_EXACT_HALF = 2.0**50  # below it, adding 0.5 to a grid index in float64 is exact
_CHUNK = 1 << 15  # Box-Muller pairs per vectorised block on the CPU: they stay in cache
_DEVICE_CHUNK = 1 << 20  # on an accelerator: about 100 MB of float64 temporaries at a time
_NUMPY_DEVICES = frozenset({"cpu"})
"""Where the arithmetic runs in numpy (faster there than torch); elsewhere in torch, on the
tensor's own device, with only the keystream made on the CPU."""
_BLOCK = 64  # ChaCha20's block, in bytes
_ZEROS = memoryview(bytes(8 * _CHUNK))  # the plaintext whose encryption is the keystream
_REFINE_BITS = 64  # keystream bits added to each uniform per refinement
_MAX_REFINEMENTS = 64  # each one is needed with probability about 2^-50: never reached


class SecureGaussian:
    """Gaussian noise under ``key``: draw ``i`` uses its own ChaCha20 nonce (module docstring)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ConfigError(f"a secure noise key has {KEY_BYTES} bytes, got {len(key)}")
        self._key = key
        self.draws = 0

    def privatise(self, x: torch.Tensor, std: float) -> torch.Tensor:
        """``x + N(0, std^2 I)`` rounded to the grid of ``std``, exactly as for ideal noise; the
        result has ``x``'s shape, dtype and device."""
        if not (std > 0 and math.isfinite(std)):
            raise ConfigError(f"the noise standard deviation must be finite and > 0, got {std}")
        draw = self.draws
        self.draws += 1
        source = x.detach().reshape(-1)
        count = source.numel()
        if count == 0:
            return x.detach().clone()
        host = source.device.type in _NUMPY_DEVICES
        chunk = _CHUNK if host else _DEVICE_CHUNK
        pairs = (count + 1) // 2
        grid = grid_width(std)
        out = torch.empty(count, dtype=x.dtype, device=source.device)
        # Pair i's U1 is keystream word i, its U2 word pairs + i: two readers of the one stream.
        streams = [_Keystream(self._key, _draw_nonce(draw), offset, min(pairs, chunk)) for offset in (0, 8 * pairs)]
        unsure: dict[int, tuple[int, int]] = {}
        for begin in range(0, pairs, chunk):
            end = min(begin + chunk, pairs)
            first, second = (stream.uniforms(end - begin) for stream in streams)
            u1s, u2s = (
                words.astype(np.float64) if host else _to_device(words, source.device) for words in (first, second)
            )
            radius, trig, reach = _box_muller_bounds(u1s, u2s, std, grid)
            for offset, angle in ((begin, trig[0]), (pairs + begin, trig[1])):
                size = min(end - begin, count - offset)  # the last sine half may be one short
                values = source[offset : offset + size].to(torch.float64)
                points, doubt = _round(
                    values.numpy() if host else values, radius[:size], angle[:size], reach[:size], std, grid
                )
                out[offset : offset + size] = (torch.from_numpy(points) if host else points).mul_(grid)  # k * 2^e
                for i in (np.flatnonzero(doubt) if host else torch.nonzero(doubt).flatten()).tolist():
                    unsure[begin + i] = int(first[i]), int(second[i])
        for pair, (u1, u2) in sorted(unsure.items()):
            members = [pair] + ([pair + pairs] if pair + pairs < count else [])
            sums = source[members].to(device="cpu", dtype=torch.float64).numpy()
            resolved = _refine(self._key, draw, pair, u1, u2, sums, std)
            for member, value, point in zip(members, sums, resolved, strict=True):
                if math.isfinite(value):  # a non-finite sum stays as it is: the optimizer skips that step
                    out[member] = point * grid
        return out.view(x.shape)


def grid_width(std: float) -> float:
    """The grid a release of noise ``std`` is rounded to (a function of public values only)."""
    return 2.0 ** (math.floor(math.log2(std)) - GRID_BITS)


def _box_muller_bounds(first: Array, second: Array, std: float, grid: float) -> tuple[Array, Array, Array]:
    """For real uniforms whose first 53 bits are ``first``/``second`` (as float64, overwritten:
    numpy arrays on the CPU, tensors on an accelerator): ``R = sqrt(-2 ln(1 - U1))`` at U1's
    lowest value, ``cos``/``sin`` of the angle ``2 pi U2`` (within :data:`_TRIG_SLACK`), so
    ``Z = R * (cos, sin)``, and the pair's share of the error bound on ``(x + std Z) / grid`` in
    grid cells, whatever ``x`` (:func:`_round` adds ``x``'s)."""
    xp = _namespace(first)
    scale = 2.0**-UNIFORM_BITS
    u_low = first
    u_low *= scale  # exact: integers below 2^53 times a power of two
    with np.errstate(divide="ignore", invalid="ignore"):
        radius = xp.sqrt(-2.0 * xp.log1p(-u_low))  # R grows with U1
        # R' = 1 / ((1 - U1) R) is largest at an end of U1's interval: bound R's rise over it.
        rise = scale / ((1.0 - u_low - scale) * radius)  # inf where U1 may reach 1 or R is 0: refined
        # Z's distance from R * trig: the rise times |trig| <= 1, the angle's slack times R.
        spread = rise * (1.0 + 2.0 * _TRIG_SLACK) + (radius + rise) * _TRIG_SLACK
        reach = (std / grid) * (spread + MARGIN * (radius * (1.0 + _TRIG_SLACK) + spread + 1.0))
    angle = second
    angle += 0.5
    angle *= 2.0 * math.pi * scale
    if xp is torch:
        return radius, torch.stack((torch.cos(angle), torch.sin(angle))), reach
    trig = np.empty((2, angle.size))  # torch's SLEEF kernels: within an ulp, 3x numpy's speed
    torch.cos(torch.from_numpy(angle), out=torch.from_numpy(trig[0]))
    torch.sin(torch.from_numpy(angle), out=torch.from_numpy(trig[1]))
    return radius, trig, reach


def _round(values: Array, radius: Array, trig: Array, reach: Array, std: float, grid: float) -> tuple[Array, Array]:
    """Grid indices of ``x + std * Z``, and where float64 cannot be sure of them (to refine)."""
    xp = _namespace(values)
    with np.errstate(invalid="ignore", over="ignore"):
        shifted = values + std * (radius * trig)
        shifted *= 1.0 / grid  # exact: a power of two
        shifted += 0.5
        points = xp.floor(shifted)
        within = shifted - points  # where y lies between two rounding boundaries, in [0, 1): exact
        margin = xp.abs(values)
        margin *= MARGIN / grid
        margin += reach
        # Correctly rounded + and - are monotone: these comparisons hold for the exact values too.
        sure = within - margin > 0.0
        sure &= within + margin < 1.0
        sure &= xp.abs(shifted) < _EXACT_HALF
    return points, ~sure & xp.isfinite(values)  # a non-finite sum stays so: the optimizer skips that step


def _namespace(array: Array) -> Any:
    """numpy for numpy arrays, torch for tensors: the functions used here are named alike in both."""
    return np if isinstance(array, np.ndarray) else torch


def _to_device(words: np.ndarray, device: torch.device) -> torch.Tensor:
    """53-bit integers as float64 on ``device`` (exact: below 2^53)."""
    return torch.from_numpy(words.view(np.int64)).to(device).double()


def _refine(key: bytes, draw: int, pair: int, first: int, second: int, values: np.ndarray, std: float) -> list[float]:
    """Grid indices of one Box-Muller pair's coordinates, by interval arithmetic on ever more bits
    of its uniforms (from the pair's own keystream), until each interval holds one index."""
    grid = mpmath.mpf(grid_width(std))
    u1, u2, bits = first, second, UNIFORM_BITS
    saved = iv.prec
    try:
        for level in range(_MAX_REFINEMENTS):
            more = np.frombuffer(_keystream(key, _refine_nonce(draw, pair, level), 16), dtype=np.uint64)
            u1, u2, bits = (u1 << _REFINE_BITS) | int(more[0]), (u2 << _REFINE_BITS) | int(more[1]), bits + _REFINE_BITS
            iv.prec = bits + 64
            span1 = iv.mpf([u1, u1 + 1]) / iv.mpf(2) ** bits
            span2 = iv.mpf([u2, u2 + 1]) / iv.mpf(2) ** bits
            radius = iv.sqrt(-2 * iv.log(1 - span1))
            angle = 2 * iv.pi * span2
            found = []
            for value, trig in zip(values, (iv.cos(angle), iv.sin(angle)), strict=False):
                if not math.isfinite(value):  # the pair's other value; the caller keeps it as it is
                    found.append(math.nan)
                    continue
                y = (iv.mpf(float(value)) + iv.mpf(std) * radius * trig) / grid + iv.mpf(0.5)
                low, high = mpmath.floor(y.a), mpmath.floor(y.b)
                if low != high or not mpmath.isfinite(low):
                    break
                found.append(float(low))
            else:
                return found
    finally:
        iv.prec = saved
    raise PrivacyError(f"secure noise: draw {draw}, pair {pair} did not resolve after {_MAX_REFINEMENTS} refinements")


def _keystream(key: bytes, nonce: bytes, size: int) -> bytes:
    return Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(bytes(size))


class _Keystream:
    """The ChaCha20 keystream of ``nonce`` from byte ``offset`` on, read as 53-bit uniforms into one
    reused buffer of ``capacity`` words: fresh pages for a whole draw's keystream cost more than
    the cipher itself."""

    def __init__(self, key: bytes, nonce: bytes, offset: int, capacity: int) -> None:
        block, skip = divmod(offset, _BLOCK)
        counter = int.from_bytes(nonce[:4], "little") + block  # cryptography's nonce: counter first
        start = counter.to_bytes(4, "little") + nonce[4:]
        self._cipher = Cipher(algorithms.ChaCha20(key, start), mode=None).encryptor()
        self._buffer = bytearray(8 * capacity)
        self._cipher.update_into(_ZEROS[:skip], self._buffer)

    def uniforms(self, count: int) -> np.ndarray:
        """The next ``count`` keystream words' first 53 bits (``count`` at most the capacity)."""
        view = memoryview(self._buffer)
        for start in range(0, 8 * count, len(_ZEROS)):
            size = min(len(_ZEROS), 8 * count - start)
            self._cipher.update_into(_ZEROS[:size], view[start : start + size])
        return np.frombuffer(self._buffer, dtype=np.uint64, count=count) >> np.uint64(64 - UNIFORM_BITS)


def _draw_nonce(draw: int) -> bytes:
    """``cryptography``'s 16-byte ChaCha20 nonce is a 4-byte block counter then the 12-byte nonce:
    every draw starts at block 0 of a nonce of its own (a counter-only nonce would make draw
    ``i + 1`` draw ``i``'s stream shifted by one block)."""
    return bytes(4) + b"\x00" + draw.to_bytes(11, "little")


def _refine_nonce(draw: int, pair: int, level: int) -> bytes:
    return bytes(4) + b"\x01" + draw.to_bytes(4, "little") + pair.to_bytes(5, "little") + level.to_bytes(2, "little")


__all__ = ["GRID_BITS", "KEY_BYTES", "MARGIN", "SecureGaussian", "grid_width"]
