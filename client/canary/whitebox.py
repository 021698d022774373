"""White-box gradient canaries: Dirac gradients put into the DP step and read back from it.

Canary ``i`` owns one coordinate of the phoneme embedding table: a (row, column) whose row is a
phoneme id that no training example contains. An embedding row gets gradient only where its id
is looked up, so no data gradient ever reaches that coordinate. Each step, every IN canary that
the Poisson draw picked adds exactly ``clip_norm`` there, before the noise: the worst-case record
DP-SGD's accounting must cover (a clipped gradient of full norm, on a direction nothing else
uses). The injection checks that the clipped data gradient is exactly zero on every canary
coordinate, so a wrong coordinate choice fails loudly instead of blurring the audit.

Score: the released noisy gradient along the canary's coordinate at every step, before the
division by the expected batch size and before AdamW. DP-SGD's accounting covers every iterate,
so an auditor who sees them all is inside the threat model, and the bound must still hold. In
units of ``clip_norm`` one step releases ``x = b + N(0, sigma^2)``, ``b ~ Bernoulli(q)`` for an
IN canary and ``b = 0`` for an OUT one, independently across steps; the log-likelihood ratio of
IN against OUT is ``log(1 - q + q exp((x - 1/2) / sigma^2))``, and the score is its sum over the
steps: by Neyman-Pearson the most powerful test of one canary's membership. It uses the
*claimed* noise and sample rate, as an auditor would. Without noise ``x`` is the number of times
the canary was sampled, and the score is the sum of ``x``. Parameter changes are not used: AdamW
divides every coordinate by its own running second moment, which blurs exactly this signal.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from fedvox.client.dp.optimizer import FedvoxDPOptimizer
from fedvox.shared.errors import ConfigError, PrivacyError

PADDING_ID = 0
"""s1 batches left-pad phonemes with id 0, so its row is looked up by every padded batch."""


def free_coordinates(
    vocab_size: int, dim: int, used_ids: Iterable[int], count: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` distinct (row, column) pairs of a ``[vocab_size, dim]`` table, on unused rows."""
    used = set(used_ids) | {PADDING_ID}
    rows = torch.tensor([r for r in range(vocab_size) if r not in used], dtype=torch.long)
    capacity = len(rows) * dim
    if count > capacity:
        raise ConfigError(
            f"{count} white-box canaries need {count} free coordinates, but only {len(rows)} phoneme "
            f"ids of {vocab_size} are unused ({capacity} coordinates); use fewer canaries"
        )
    picked = torch.randperm(capacity, generator=generator)[:count]
    return rows[picked // dim], picked % dim


class WhiteBoxCanaries:
    """Canaries on ``parameter[rows, cols]``; ``member[i]`` says whether canary ``i`` is IN.

    IN canaries are examples of the training set like any other (the Poisson draw picks them at
    the same rate); :meth:`sample` hears which were picked, :meth:`inject` adds their gradients,
    :meth:`observe` scores the released values.
    """

    def __init__(
        self,
        parameter: torch.nn.Parameter,
        rows: torch.Tensor,
        cols: torch.Tensor,
        member: torch.Tensor,
        *,
        noise_multiplier: float,
        sample_rate: float,
    ) -> None:
        if not (len(rows) == len(cols) == len(member)):
            raise ConfigError("white-box canaries need one row, column and membership each")
        self.parameter = parameter
        self.rows = rows.to(parameter.device)
        self.cols = cols.to(parameter.device)
        self.member = member.bool()
        self.in_ids = self.member.nonzero(as_tuple=True)[0]
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.scores = torch.zeros(len(member), dtype=torch.float64)
        self.times_sampled = torch.zeros(len(member), dtype=torch.long)
        self.steps = 0
        self._picked: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.member)

    @property
    def included(self) -> int:
        return len(self.in_ids)

    def sample(self, positions: torch.Tensor) -> None:
        """The Poisson draw picked the IN canaries at ``positions`` (0..included-1) this step."""
        self._picked.append(self.in_ids[positions.cpu()])

    def inject(self, summed_grad: torch.Tensor, clip_norm: float) -> None:
        """Add ``clip_norm`` on the coordinate of every canary picked this step (before noise)."""
        picked = torch.cat(self._picked) if self._picked else torch.zeros(0, dtype=torch.long)
        self._picked.clear()
        if bool((summed_grad[self.rows, self.cols] != 0).any()):
            raise PrivacyError(
                "a data gradient reached a white-box canary coordinate; canary rows must be phoneme "
                "ids that no training example contains (this is a bug in the canary audit)"
            )
        where = picked.to(summed_grad.device)
        summed_grad.index_put_(
            (self.rows[where], self.cols[where]),
            torch.full((len(picked),), clip_norm, dtype=summed_grad.dtype, device=summed_grad.device),
            accumulate=True,
        )
        self.times_sampled[picked] += 1

    def observe(self, released: torch.Tensor, clip_norm: float) -> None:
        """Score the noisy gradient the step released along every canary's coordinate."""
        x = released[self.rows, self.cols].detach().double().cpu() / clip_norm
        self.scores += step_log_likelihood_ratio(x, self.noise_multiplier, self.sample_rate)
        self.steps += 1


def step_log_likelihood_ratio(x: torch.Tensor, noise_multiplier: float, sample_rate: float) -> torch.Tensor:
    """``log(1 - q + q exp((x - 1/2) / sigma^2))`` per value; ``x`` itself when sigma is 0."""
    if noise_multiplier == 0:
        return x
    log_out = math.log1p(-sample_rate) if sample_rate < 1 else -math.inf
    return torch.logaddexp(torch.full_like(x, log_out), math.log(sample_rate) + (x - 0.5) / noise_multiplier**2)


class CanaryDPOptimizer(FedvoxDPOptimizer):
    """Fedvox's DP optimizer with white-box canaries added to the clipped sum before the noise."""

    def __init__(self, *args, canaries: WhiteBoxCanaries, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not any(p is canaries.parameter for p in self.params):
            raise ConfigError("the white-box canary parameter is not trained by this optimizer")
        self.canaries = canaries

    def pre_step(self, closure=None):
        # A physical batch holding only white-box canaries ran no backward: it adds no data
        # gradient. Before the last physical batch there is nothing to do; on the last one Opacus
        # needs that spelled out as an empty batch of per-sample gradients to reach the noise.
        if not self.has_samples():
            if self._check_skip_next_step(pop_next=False):
                self._check_skip_next_step()
                self._is_last_step_skipped = True
                return False
            for p in self.params:
                p.grad_sample = p.new_zeros((0, *p.shape))
        return super().pre_step(closure)

    def add_noise(self) -> None:
        parameter = self.canaries.parameter
        self.canaries.inject(parameter.summed_grad, self.max_grad_norm)
        super().add_noise()
        self.canaries.observe(parameter.grad, self.max_grad_norm)
