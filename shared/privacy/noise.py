"""Gaussian noise from a cryptographically secure, keyed stream (ChaCha20).

torch's generators (Mersenne Twister on the CPU, Philox on CUDA) are fast but not secure: their
state can be recovered from their outputs. DP noise must be unpredictable to anyone without the
device's secret, and it must also be reproducible from that secret, so a release redone after a
crash is the release already charged. :class:`SecureGaussian` gives both: its noise is a function
of a 32-byte key (derived per release from the device's secret key, :mod:`client.releases`) and a
draw counter, through the ChaCha20 keystream (``cryptography``), turned into normal deviates by
the Box-Muller transform on 53-bit uniforms in float64 and cast to the parameter's dtype.

Cost: ``bench/secure_noise.py`` (16 keystream bytes and one Box-Muller pair per two values).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedvox.shared.errors import ConfigError

KEY_BYTES = 32


class SecureGaussian:
    """Normal deviates from ChaCha20 under ``key``: draw ``i`` uses nonce ``i`` (never reused)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ConfigError(f"a secure noise key has {KEY_BYTES} bytes, got {len(key)}")
        self._key = key
        self.draws = 0

    def normal(
        self, shape: torch.Size | tuple[int, ...], std: float, *, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """A tensor of ``N(0, std^2)`` values."""
        count = math.prod(shape)
        pairs = (count + 1) // 2
        nonce = self.draws.to_bytes(16, "little")
        self.draws += 1
        stream = Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()
        words = np.frombuffer(stream.update(bytes(16 * pairs)), dtype=np.uint64)
        uniform = torch.from_numpy((words >> np.uint64(11)).astype(np.float64)) * 2.0**-53  # in [0, 1)
        u1, u2 = 1.0 - uniform[:pairs], uniform[pairs:]  # u1 in (0, 1]: log is finite
        radius = torch.sqrt(-2.0 * torch.log(u1))
        angle = (2.0 * math.pi) * u2
        values = torch.cat((radius * torch.cos(angle), radius * torch.sin(angle)))[:count]
        return values.mul_(std).to(device=device, dtype=dtype).view(shape)


__all__ = ["KEY_BYTES", "SecureGaussian"]
