"""How a training process takes its host: torch's threads, and an allocator that keeps freed
memory for the next step.

A training step allocates and frees the same large temporaries every step: the logits and their
gradient, and under DP-SGD the per-sample gradients and the noise. glibc's malloc serves blocks
above its mmap threshold with fresh pages and hands free memory at the heap's top back to the
kernel above its trim threshold; both thresholds adapt only after large frees. On s1 tiny's DP
step that still cost 950-2,350 page faults per step, about 4 ms of a 64 ms step (2-core AVX-512
host, one thread); the non-private step, whose blocks recur at the same sizes, had none.
:func:`keep_freed_memory` fixes the thresholds from the start, the mmap threshold at glibc's
adaptive maximum and the trim threshold at :data:`TRIM_THRESHOLD` (the effect PyTorch's CPU
tuning guide gets by preloading jemalloc or tcmalloc). The peak resident set stays where it was
(891 MB with it against 887 MB without, over the same steps); a user's own ``MALLOC_*`` or
``GLIBC_TUNABLES`` settings are left alone.
"""

from __future__ import annotations

import ctypes
import logging
import os

import torch

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""glibc's ``mallopt`` parameter numbers."""
MMAP_THRESHOLD = 32 * 2**20
"""glibc's largest adaptive mmap threshold on 64-bit hosts: blocks below it come from the heap."""
TRIM_THRESHOLD = 128 * 2**20
"""Free memory at the heap's top kept for reuse (glibc's adaptive one is twice the mmap threshold)."""
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def mallopt(parameter: int, value: int) -> bool:
    """glibc's ``mallopt(parameter, value)``; False where the C library is not glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(parameter, value))
    except (OSError, AttributeError):
        return False


def keep_freed_memory() -> bool:
    """Fix glibc's thresholds so a training loop reuses its freed blocks (see the module);
    False where it is not glibc or the user set the allocator up."""
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def prepare_training_process(threads: int | None) -> None:
    """Give torch ``threads`` threads (``None``: torch's default) and keep freed memory for reuse:
    the set-up of every process that trains (a ClientApp, a local run, the simulation's
    baselines, pretraining)."""
    if threads is not None:
        torch.set_num_threads(threads)
    if not keep_freed_memory():
        log.debug("allocator left as it is (not glibc, or MALLOC_* / GLIBC_TUNABLES set)")


__all__ = ["keep_freed_memory", "mallopt", "prepare_training_process"]
