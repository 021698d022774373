"""Opacus's DP optimizer, extended for mixed precision, robustness and monitoring.

:class:`FedvoxDPOptimizer` keeps Opacus's DP-SGD step (per-sample clipping to ``max_grad_norm``,
one Gaussian noise draw of std ``noise_multiplier * max_grad_norm`` per logical batch) and adds
what fedvox needs around the clipping:

* **fp16 loss scaling done right.** With a plain ``GradScaler`` Opacus clips the *scaled*
  per-sample gradients and the update comes out ``scale`` times too large. Here per-sample
  gradients are divided by the (static, data-independent) loss scale before they are clipped.
* **Non-finite samples.** A sample whose gradient has a NaN/inf contributes zero instead of
  poisoning the batch. That is a function of the sample alone, so the sensitivity stays
  ``max_grad_norm`` and the guarantee holds; the count is reported.
* **Statistics** of the pre-clip per-sample norms (quantiles, clipped fraction). They stay on
  the device: they are computed from private data without noise.
* **Empty Poisson batches** still release noise (skipping them would reveal that the batch was
  empty).
* **Secure noise.** With ``secure_noise`` set (deployment), the noise comes from a ChaCha20
  stream under a per-release secret key (:class:`fedvox.shared.privacy.noise.SecureGaussian`)
  instead of torch's generator, which stays for seeded tests and experiments, and the noisy sum
  is released on a grid exactly as ideal real-valued noise would give it (no floating-point
  attack on the addition).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed

from fedvox.client.dp.book_keeping import SMALL_TENSOR_NUMEL, Record
from fedvox.shared.privacy.noise import SecureGaussian

NORM_QUANTILES = (0.1, 0.5, 0.9, 0.99)


@dataclass
class ClipStats:
    """Per-sample gradient statistics of one logical batch (local monitoring only)."""

    samples: int = 0
    nonfinite_samples: int = 0
    clipped_samples: int = 0
    norms: list[torch.Tensor] = field(default_factory=list)

    def quantiles(self) -> dict[str, float]:
        if not self.norms:
            return {}
        norms = torch.cat(self.norms).float()
        values = torch.quantile(norms, torch.tensor(NORM_QUANTILES, dtype=norms.dtype))
        return {f"grad_norm_q{int(q * 100)}": float(v) for q, v in zip(NORM_QUANTILES, values, strict=True)}

    @property
    def clipped_fraction(self) -> float:
        finite = self.samples - self.nonfinite_samples
        return self.clipped_samples / finite if finite else 0.0


class FedvoxDPOptimizer(DPOptimizer):
    """``DPOptimizer`` with per-sample unscaling, non-finite guarding and clip statistics.

    Use ``loss_reduction="sum"`` models (per-sample losses summed) and ``loss_reduction="mean"``
    here: the noisy sum of clipped per-sample gradients is divided by the *expected* logical
    batch size, exactly as in DP-SGD with Poisson sampling.
    """

    def __init__(self, *args, loss_scale: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loss_scale = float(loss_scale)
        self.stats = ClipStats()
        self.skipped_nonfinite_steps = 0
        self.reset_hooks: list[Callable[[], None]] = []
        """Called by :meth:`reset_logical_batch` (e.g. to clear the per-sample hooks' state)."""
        self.secure_noise: SecureGaussian | None = None
        """The release's secure noise source; ``None``: Opacus's draw from ``generator``."""
        self._update_buffers: list[torch.Tensor] = []
        """Tensors holding every ``p.grad`` after :meth:`add_noise` (its flat noise buffers, or
        the gradients themselves), which the scaling and the finite check run over."""

    def per_sample_state(self) -> tuple[list[tuple[Any, torch.Tensor]], list[Record]]:
        """This physical batch's per-sample state: ``(param, [B, numel] gradients)`` of parameters
        with explicit per-sample gradients, and the book-keeping records of the others."""
        explicit, records, seen = [], [], set()
        for p in self.params:
            record = getattr(p, "book", None)
            if record is None:
                explicit.append((p, self._get_flat_grad_sample(p)))
                continue
            if p.grad_sample is not None:
                raise ValueError(
                    "book-kept per-sample gradients of several backward passes: step the optimizer "
                    "after each physical batch (run_logical_step does)"
                )
            if id(record) not in seen:
                seen.add(id(record))
                records.append(record)
        return explicit, records

    def has_samples(self) -> bool:
        """Whether a backward pass left per-sample state since the last step."""
        return any(
            getattr(p, "grad_sample", None) is not None or getattr(p, "book", None) is not None for p in self.params
        )

    def pre_step(self, closure=None) -> bool:
        """Opacus's pre-step, without its check through ``grad_samples`` (which book-kept
        parameters do not have)."""
        if not self.params:
            return True
        self.clip_and_accumulate()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self.add_noise()
        self.scale_grad()
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def clip_and_accumulate(self) -> None:
        explicit, records = self.per_sample_state()
        if explicit:
            batch, device = len(explicit[0][1]), explicit[0][1].device
        else:
            batch, device = len(records[0].samples[0]), records[0].samples[0].device
        for p, _ in explicit:
            _check_processed_flag(p.grad_sample)
        small, large = _flat_buckets(explicit, batch)
        bad = None
        if batch == 0:
            clip_factor = torch.zeros(0, device=device)
        else:
            # One pass per tensor accumulated in fp32 or wider, no full-size temporaries (bf16 ones included).
            dtype = torch.float32
            for t in [g for _, g in explicit] + [r.samples[0] for r in records]:
                dtype = torch.promote_types(dtype, t.dtype)
            rows = [torch.linalg.vector_norm(g.reshape(batch, -1), dim=1, dtype=dtype) for _, g in large]
            rows += [torch.linalg.vector_norm(bucket.flat, dim=1, dtype=dtype) for bucket in small]
            parts = [torch.stack(rows, dim=1).pow(2).sum(1)] if rows else []
            parts += [record.norms_sq().to(dtype) for record in records]
            squares = torch.stack(parts).sum(0) if parts else torch.zeros(batch, device=device, dtype=dtype)
            norms = squares.sqrt() / self.loss_scale
            finite = torch.isfinite(norms)
            clip_factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            clip_factor = torch.where(finite, clip_factor, torch.zeros_like(clip_factor))
            self.stats.samples += batch
            self.stats.nonfinite_samples += int((~finite).sum())
            self.stats.clipped_samples += int((finite & (norms > self.max_grad_norm)).sum())
            self.stats.norms.append(norms[finite].detach().cpu())
            clip_factor = clip_factor / self.loss_scale
            if not bool(finite.all()):
                bad = ~finite

        for p, g in large:
            self._accumulate(p, _clipped_sum(g.to(p.dtype).reshape(batch, p.numel()), clip_factor, bad).view_as(p))
        for bucket in small:
            summed = _clipped_sum(bucket.flat, clip_factor, bad)
            for p, grad in zip(bucket.params, summed.split([p.numel() for p in bucket.params]), strict=True):
                self._accumulate(p, grad.view_as(p))
        for p, _ in explicit:
            _mark_as_processed(p.grad_sample)
        keep = None if bad is None else ~bad
        for record in records:
            for p, grad in zip(record.params, record.clipped_sums(clip_factor, keep), strict=True):
                self._accumulate(p, grad.to(p.dtype))

    @staticmethod
    def _accumulate(p: Any, grad: torch.Tensor) -> None:
        p.summed_grad = grad if p.summed_grad is None else p.summed_grad.add_(grad)

    @property
    def accumulated_iterations(self) -> int:
        """Backward passes since the last step (a book-kept parameter holds exactly one)."""
        for p in self.params:
            if isinstance(p.grad_sample, list):
                return len(p.grad_sample)
        return 1

    def add_noise(self) -> None:
        """Gaussian noise of std ``noise_multiplier * max_grad_norm`` on every clipped sum.

        The noise of all parameters of one dtype and device is one draw into one flat buffer,
        and each ``p.grad`` a view of it: the same independent Gaussian coordinates as Opacus's
        draw per tensor (in another order of the stream), without the calls per tensor, which
        cost more than the draw itself on s2's 303 tensors. From torch's generator the clipped
        sums are added by one ``_foreach_add_``; the secure source (deployment) privatises their
        concatenation in one call.
        """
        params = self.params
        if self.secure_mode:
            super().add_noise()
            self._update_buffers = [p.grad for p in params]
            return
        std = self.noise_multiplier * self.max_grad_norm
        for p in params:
            _check_processed_flag(p.summed_grad)
        if std == 0:
            for p in params:
                p.grad = p.summed_grad.clone().view_as(p)
            self._update_buffers = [p.grad for p in params]
        else:
            groups: dict[tuple[torch.dtype, torch.device], list[Any]] = {}
            for p in params:
                groups.setdefault((p.summed_grad.dtype, p.summed_grad.device), []).append(p)
            self._update_buffers = []
            for (dtype, device), members in groups.items():
                sizes = [p.numel() for p in members]
                if self.secure_noise is None:
                    flat = torch.empty(sum(sizes), dtype=dtype, device=device).normal_(0, std, generator=self.generator)
                    grads = [noise.view_as(p) for p, noise in zip(members, flat.split(sizes), strict=True)]
                    torch._foreach_add_(grads, [p.summed_grad for p in members])
                else:
                    flat = self.secure_noise.privatise(torch.cat([p.summed_grad.reshape(-1) for p in members]), std)
                    grads = [noisy.view_as(p) for p, noisy in zip(members, flat.split(sizes), strict=True)]
                for p, grad in zip(members, grads, strict=True):
                    p.grad = grad
                self._update_buffers.append(flat)
        for p in params:
            _mark_as_processed(p.summed_grad)

    def scale_grad(self) -> None:
        """Opacus's division by the expected batch size, with the accumulation count read once:
        Opacus re-reads it (a pass over every parameter) for each parameter, O(P^2) in Python,
        which cost more than the noise on a 400-tensor model; one call over the noisy update's
        buffers (one per dtype after a flat noise draw)."""
        if self.loss_reduction == "mean":
            torch._foreach_div_(self._update_buffers, self.expected_batch_size * self.accumulated_iterations)

    def step(self, closure=None):
        """Clip/accumulate; on the last physical batch add noise and apply the update.

        A noisy update that is not finite (which finite clipped sums plus Gaussian noise cannot
        produce unless something upstream is broken) is never applied; it is counted instead.
        Skipping it is post-processing of the release, so privacy is unaffected.
        """
        if closure is not None:
            with torch.enable_grad():
                closure()
        if not self.pre_step():
            return None
        # NaN and inf survive a norm, so one fused reduction per buffer tells whether the update is finite.
        if not bool(torch.stack(torch._foreach_norm(self._update_buffers)).isfinite().all()):
            self.skipped_nonfinite_steps += 1
            return None
        return self.original_optimizer.step()

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Opacus's (per-sample state always dropped, the clipped sums kept across a skipped
        step), and the book-keeping records, in one pass over the parameters."""
        keep_sums = self._is_last_step_skipped
        self._update_buffers = []  # a flat buffer stays alive only through the grads that view it
        for p in self.params:
            p.grad_sample, p.book = None, None
            if not keep_sums:
                p.summed_grad = None
        self.original_optimizer.zero_grad(set_to_none)

    def step_without_samples(self) -> None:
        """Release noise for an empty logical batch (every parameter's clipped sum is zero)."""
        for p in self.params:
            p.grad_sample, p.book = None, None
            p.summed_grad = torch.zeros_like(p)
        self.add_noise()
        if self.loss_reduction == "mean":
            for p in self.params:
                p.grad /= self.expected_batch_size
        if self.step_hook:
            self.step_hook(self)
        self.original_optimizer.step()
        self._is_last_step_skipped = False

    def reset_logical_batch(self) -> None:
        """Drop everything accumulated for the current logical batch (e.g. after an OOM)."""
        self._step_skip_queue.clear()
        self._is_last_step_skipped = False
        self._update_buffers = []
        for p in self.params:
            p.grad_sample, p.book = None, None
            p.summed_grad = None
            p.grad = None
        self.stats = ClipStats()
        for hook in self.reset_hooks:
            hook()

    def take_stats(self) -> ClipStats:
        """Return and reset the statistics gathered since the last call."""
        stats, self.stats = self.stats, ClipStats()
        return stats


@dataclass
class _FlatBucket:
    params: list[Any]
    flat: torch.Tensor
    """``[B, sum of numels]``: the params' per-sample gradients side by side, in their dtype."""


def _flat_buckets(
    explicit: list[tuple[Any, torch.Tensor]], batch: int
) -> tuple[list[_FlatBucket], list[tuple[Any, torch.Tensor]]]:
    """Split explicit per-sample gradients into flat buckets of small tensors (by the parameters'
    dtype and device, gradients in a lower precision converted as they are copied in: bf16
    autocast leaves most of s1's) and the larger ones, which stay as they are."""
    groups: dict[tuple[torch.dtype, torch.device], list[tuple[Any, torch.Tensor]]] = {}
    large = []
    for p, g in explicit:
        if p.numel() <= SMALL_TENSOR_NUMEL and torch.promote_types(g.dtype, p.dtype) == p.dtype:
            groups.setdefault((p.dtype, g.device), []).append((p, g))
        else:
            large.append((p, g))
    buckets = []
    for members in groups.values():
        if len(members) == 1:
            large.extend(members)
            continue
        flat = torch.cat([g.reshape(batch, p.numel()).to(p.dtype) for p, g in members], dim=1)
        buckets.append(_FlatBucket([p for p, _ in members], flat))
    return buckets, large


def _clipped_sum(g: torch.Tensor, clip_factor: torch.Tensor, bad: torch.Tensor | None) -> torch.Tensor:
    """``sum_i clip_factor[i] * g[i]`` of ``[B, n]`` gradients as one matrix-vector product in
    ``g``'s dtype; rows of non-finite samples are zeroed first (0 * inf is NaN)."""
    if bad is not None:
        g = torch.where(bad.unsqueeze(1), torch.zeros_like(g), g)
    return torch.mv(g.t(), clip_factor.to(device=g.device, dtype=g.dtype))
