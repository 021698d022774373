"""Secure DP noise: no keystream shared between draws, and a release that is exactly the ideal
(real-valued) Gaussian mechanism's output rounded to a public grid, so no floating-point artefact
of ``x + noise`` can tell neighbouring inputs apart (Mironov 2012; Jin et al. 2022)."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch

from fedvox.shared.privacy import noise
from fedvox.shared.privacy.noise import UNIFORM_BITS, SecureGaussian, grid_width

KEY = bytes(range(32))


@pytest.fixture(params=["numpy", "torch"])
def arithmetic(request, monkeypatch):
    """Each release test runs both ways: numpy (the CPU) and torch (an accelerator; here on the CPU)."""
    if request.param == "torch":
        monkeypatch.setattr(noise, "_NUMPY_DEVICES", frozenset())
        monkeypatch.setattr(noise, "_DEVICE_CHUNK", noise._CHUNK)  # the chunk edges tested below
    return request.param


def ideal_grid_index(x: float, std: float, draw: int, index: int, count: int) -> int:
    """``round((x + std * Z) / g)`` for the real Box-Muller deviate of the keystream's uniforms,
    with 53 + 4 * 64 of their bits at 400-bit precision (a tie at that depth has probability 2^-300)."""
    pairs = (count + 1) // 2
    pair = index % pairs
    words = np.frombuffer(noise._keystream(KEY, noise._draw_nonce(draw), 16 * pairs), dtype=np.uint64)
    u1, u2 = int(words[pair]) >> 11, int(words[pairs + pair]) >> 11
    for level in range(4):
        more = np.frombuffer(noise._keystream(KEY, noise._refine_nonce(draw, pair, level), 16), dtype=np.uint64)
        u1, u2 = (u1 << 64) | int(more[0]), (u2 << 64) | int(more[1])
    with mpmath.workprec(400):
        bits = UNIFORM_BITS + 4 * 64
        radius = mpmath.sqrt(-2 * mpmath.log(1 - mpmath.mpf(u1) / 2**bits))
        angle = 2 * mpmath.pi * mpmath.mpf(u2) / 2**bits
        z = radius * (mpmath.cos(angle) if index < pairs else mpmath.sin(angle))
        return int(mpmath.floor((mpmath.mpf(x) + std * z) / grid_width(std) + mpmath.mpf(0.5)))


def test_consecutive_draws_share_no_keystream():
    secure = SecureGaussian(KEY)
    zeros = torch.zeros(4096, dtype=torch.float64)
    first, second = secure.privatise(zeros, 1.0), secure.privatise(zeros, 1.0)
    # A nonce holding only the block counter made draw 1 draw 0's keystream one block (8 words) on.
    assert int((second[:2000] == first[8:2008]).sum()) < 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_release_is_the_ideal_gaussian_rounded_to_the_public_grid(dtype, arithmetic):
    std, count = 0.75, 301
    x = (torch.randn(count, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    out = SecureGaussian(KEY).privatise(x, std)
    assert out.dtype == dtype and out.shape == x.shape
    grid = grid_width(std)
    indices = out.double() / grid
    assert torch.equal(indices, indices.round())  # on the grid whatever x: no x-dependent support
    for i in range(count):
        assert int(indices[i]) == ideal_grid_index(float(x[i]), std, 0, i, count), i


def test_the_keystream_read_in_chunks_from_any_offset_is_the_one_stream():
    whole = np.frombuffer(noise._keystream(KEY, noise._draw_nonce(3), 8 * 5000), dtype=np.uint64) >> 11
    for offset in (0, 8, 8 * 7, 8 * 8, 8 * 2501):  # within and across ChaCha20's 64-byte blocks
        reader = noise._Keystream(KEY, noise._draw_nonce(3), offset, 999)
        words = np.concatenate([reader.uniforms(n) for n in (1, 100, 999)])
        assert np.array_equal(words, whole[offset // 8 : offset // 8 + 1100]), offset
    many = 2 * noise._CHUNK + 5  # more than one read of the plaintext's zeros
    long = np.frombuffer(noise._keystream(KEY, noise._draw_nonce(4), 8 * many), dtype=np.uint64) >> 11
    assert np.array_equal(noise._Keystream(KEY, noise._draw_nonce(4), 0, many).uniforms(many), long)


def test_a_release_across_chunks_is_the_ideal_gaussian_at_every_chunk_edge(arithmetic):
    std, count = 0.5, 4 * noise._CHUNK + 3  # odd: the last pair has no sine half
    x = torch.randn(count, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = SecureGaussian(KEY).privatise(x, std)
    pairs, chunk = (count + 1) // 2, noise._CHUNK
    for i in (0, chunk - 1, chunk, 2 * chunk, pairs - 1, pairs, pairs + chunk - 1, pairs + chunk, count - 1):
        assert round(float(out[i]) / grid_width(std)) == ideal_grid_index(float(x[i]), std, 0, i, count), i


def test_values_near_a_rounding_boundary_are_refined_to_the_ideal_answer(monkeypatch, arithmetic):
    std, count = 1.0, 64
    grid = grid_width(std)
    x = torch.tensor([_boundary_x(i, count, std) for i in range(count)], dtype=torch.float64)
    x[count - 1] = math.inf  # pair 31's other half: refined with it, and left as it is
    refined: list[int] = []
    real_refine = noise._refine
    monkeypatch.setattr(noise, "_refine", lambda *args: refined.append(args[2]) or real_refine(*args))
    out = SecureGaussian(KEY).privatise(x, std)
    assert len(set(refined)) == (count + 1) // 2  # float64 could not decide any pair: all refined
    for i in range(count - 1):
        assert round(float(out[i]) / grid) == ideal_grid_index(float(x[i]), std, 0, i, count), i
    assert math.isinf(float(out[count - 1]))


def _boundary_x(i: int, count: int, std: float) -> float:
    """A float64 x with x + std * Z within an ulp of x (2^-37 grid cells) of a rounding boundary."""
    pairs = (count + 1) // 2
    pair = i % pairs
    words = np.frombuffer(noise._keystream(KEY, noise._draw_nonce(0), 16 * pairs), dtype=np.uint64)
    u1, u2 = int(words[pair]) >> 11, int(words[pairs + pair]) >> 11
    more = np.frombuffer(noise._keystream(KEY, noise._refine_nonce(0, pair, 0), 16), dtype=np.uint64)
    u1, u2 = (u1 << 64) | int(more[0]), (u2 << 64) | int(more[1])
    with mpmath.workprec(200):
        bits = UNIFORM_BITS + 64
        radius = mpmath.sqrt(-2 * mpmath.log(1 - mpmath.mpf(u1) / 2**bits))
        angle = 2 * mpmath.pi * mpmath.mpf(u2) / 2**bits
        z = std * radius * (mpmath.cos(angle) if i < pairs else mpmath.sin(angle))
        return float(mpmath.mpf(7.5) * grid_width(std) - z)  # the boundary between cells 7 and 8


def test_non_finite_sums_stay_non_finite_and_the_std_must_be_positive(arithmetic):
    out = SecureGaussian(KEY).privatise(torch.tensor([1.0, math.inf, math.nan]), 1.0)
    assert math.isfinite(float(out[0])) and math.isinf(float(out[1])) and math.isnan(float(out[2]))
    with pytest.raises(Exception, match="standard deviation"):
        SecureGaussian(KEY).privatise(torch.zeros(2), 0.0)
