"""Privacy accounting for Poisson-subsampled Gaussian mechanisms (DP-SGD and DP-FedAvg).

Every release fedvox makes is a Poisson-subsampled Gaussian applied ``steps`` times: a client's
DP-SGD round (sample rate = expected batch / utterances) and a server's DP-FedAvg round (sample
rate = expected cohort / speakers, one step per round). A history of such mechanisms composes to
one (epsilon, delta) guarantee, computed here with Opacus's accountants:

- ``"prv"`` (default; Gopi et al. 2021): numerical composition of privacy-loss random variables,
  returning the *upper* end of its error band, so it is a guarantee. It agrees with Google's PLD
  accountant to within 0.02 and is ~8% below RDP (measured: docs/privacy.md). Its cost grows with
  the number of *distinct* (noise_multiplier, sample_rate) pairs, which is why histories are
  compacted before they are accounted; the RDP curves that size its grid are memoised per pair
  (a client's next epsilon under the same plan: 0.4 s -> 0.05 s of CPU on a 2-core host).
- ``"rdp"``: Renyi DP (Mironov 2017), 10-20x faster but a looser bound.

The GAN rule for s2: a generator and a discriminator privatised on the *same* Poisson batch are
one subsampled Gaussian per step with ``sigma_eff = (sigma_G^-2 + sigma_D^-2)^-1/2``
(:func:`shared_batch_noise_multiplier`; the proof is in docs/privacy.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.metadata
import logging
import math
import numbers
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedvox.shared.errors import BudgetExceededError, ConfigError, PrivacyError
from fedvox.shared.privacy.epsilon_store import EpsilonStore, question

log = logging.getLogger(__name__)

ACCOUNTANTS = ("prv", "rdp")
DEFAULT_ACCOUNTANT = "prv"
MAX_NOISE_MULTIPLIER = 1e4
"""Calibration gives up above this: the target is below what the accountant can certify."""
STORE_AFTER_S = 0.05
"""Evaluations slower than this are kept in the process's :class:`EpsilonStore`, if it has one."""
_store: EpsilonStore | None = None


def remember_epsilons(store: EpsilonStore | None) -> None:
    """Keep this process's slow accountant answers in ``store`` (a device's own file), and read
    them from it, so that the next message's process does not evaluate them again; ``None`` stops."""
    global _store
    _store = store


@dataclass(frozen=True)
class Mechanism:
    """A Poisson-subsampled Gaussian applied ``steps`` times.

    Each step includes every record independently with probability ``sample_rate``, clips each
    record's contribution to a fixed norm C and adds N(0, (noise_multiplier * C)^2) noise to the
    sum. The clip norm does not enter the privacy guarantee, only this ratio does.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ConfigError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier}")
        if not 0 <= self.sample_rate <= 1:
            raise ConfigError(f"sample_rate must be in [0, 1], got {self.sample_rate}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral) or self.steps < 0:
            raise ConfigError(f"steps must be an integer >= 0, got {self.steps!r}")
        object.__setattr__(self, "steps", int(self.steps))  # numpy integers hash and print alike

    @property
    def touches_data(self) -> bool:
        """Whether any record can influence the output (otherwise it costs nothing)."""
        return self.steps > 0 and self.sample_rate > 0


def shared_batch_noise_multiplier(noise_multipliers: Sequence[float]) -> float:
    """Effective noise multiplier of several Gaussian releases made on one Poisson batch per step.

    Each release i adds N(0, (sigma_i C_i)^2) to a sum of per-record contributions clipped to C_i,
    so in noise units one record shifts release i by at most 1/sigma_i. The joint release is a
    Gaussian whose whitened shift has norm sqrt(sum sigma_i^-2): exactly one Gaussian with
    sigma_eff = (sum sigma_i^-2)^-1/2, also under adaptive composition (Dong, Roth, Su 2022), and
    since one Poisson draw decides whether a record is in *all* of them, the subsampled pair is
    exactly the subsampled Gaussian with sigma_eff. Composing the releases as if they were
    sampled independently under-counts (tests/test_privacy_accounting.py measures by how much).
    """
    if not noise_multipliers:
        raise ConfigError("shared_batch_noise_multiplier needs at least one noise multiplier")
    for sigma in noise_multipliers:
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ConfigError(f"noise multipliers must be finite and >= 0, got {sigma}")
    if any(sigma == 0 for sigma in noise_multipliers):
        return 0.0
    return sum(sigma**-2 for sigma in noise_multipliers) ** -0.5


def compact(history: Iterable[Mechanism]) -> tuple[tuple[float, float, int], ...]:
    """``(noise_multiplier, sample_rate, steps)`` with equal mechanisms merged, no-ops dropped.

    Composition is commutative, so a history of many rounds at the same noise and sample rate
    costs the accountant one entry, not one per round.
    """
    steps: dict[tuple[float, float], int] = {}
    for mechanism in history:
        if mechanism.touches_data:
            key = (float(mechanism.noise_multiplier), float(mechanism.sample_rate))
            steps[key] = steps.get(key, 0) + mechanism.steps
    return tuple(sorted((sigma, q, n) for (sigma, q), n in steps.items()))


def epsilon(history: Iterable[Mechanism], delta: float, accountant: str = DEFAULT_ACCOUNTANT) -> float:
    """Cumulative epsilon of ``history`` at ``delta``; ``inf`` when any step adds no noise."""
    _check_delta(delta)
    _check_accountant(accountant)
    entries = compact(history)
    if not entries:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in entries):
        return math.inf
    return _epsilon(entries, float(delta), accountant)


@functools.lru_cache(maxsize=512)
def _epsilon(entries: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    # Cached: a budget check before a round and the ledger row after it ask the same question;
    # the store keeps the answer for the device's next process, which asks it again.
    store = _store
    key = question(entries, delta, accountant, accountant_version()) if store is not None else ""
    if store is not None and (known := store.get(key)) is not None:
        return known
    began = time.perf_counter()
    value = _evaluate(entries, delta, accountant)
    if store is not None and math.isfinite(value) and time.perf_counter() - began > STORE_AFTER_S:
        store.put(key, value)
    return value


def _evaluate(entries: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    try:
        with warnings.catch_warnings():
            # RDP at tiny epsilon: "optimal order is the largest alpha" only says the bound is loose.
            warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
            # PRV at sample_rate 1 evaluates log(1 - q) = -inf on purpose.
            warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"opacus\.accountants")
            value = _rdp_epsilon(entries, delta) if accountant == "rdp" else _opacus_epsilon(entries, delta, accountant)
    except (ArithmeticError, RuntimeError, ValueError) as exc:
        # Opacus's PRV discretisation overflows only far beyond any useful epsilon (e.g.
        # sigma=0.6, q=1, 1000 steps: RDP says 1640). No finite guarantee is then certified.
        log.warning("%s accountant cannot bound epsilon for %s (%s); recording inf", accountant, entries, exc)
        return math.inf
    return value if math.isfinite(value) else math.inf


def _opacus_epsilon(entries: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    # Opacus (and torch under it) load on first use, so tools that only read ledgers start fast.
    import scipy.fft
    from opacus.accountants import create_accountant

    engine = create_accountant(accountant)
    engine.history = list(entries)
    with scipy.fft.set_backend(_PlanFreeFFT, only=True), _memoised_prv_domain():
        value = float(engine.get_epsilon(delta))
    _return_free_heap()
    return value


_domain_lock = threading.Lock()


@contextlib.contextmanager
def _memoised_prv_domain() -> Iterator[None]:
    """Let Opacus's PRV accountant size its grid with memoised RDP curves, bit for bit.

    PRV bounds its discretisation domain with RDP (``compute_safe_domain_size``: the history's
    curve, then each mechanism's one-step curve), and Opacus computes each curve afresh over its
    orders in pure Python: most of a PRV evaluation's 0.4 s of CPU here. A client asks a new
    epsilon after every round with the same (sigma, q), so the curve is the same every time;
    :func:`_rdp_curve` keeps it. The lock keeps threads from unpatching each other (accounting
    in one process is sequential in practice).
    """
    from opacus.accountants.analysis.prv import domain

    with _domain_lock:
        original = domain.RDPAccountant
        domain.RDPAccountant = _memoised_rdp_class()
        try:
            yield
        finally:
            domain.RDPAccountant = original


@functools.cache
def _memoised_rdp_class() -> type:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    class MemoisedRDP(RDPAccountant):
        """Opacus's RDPAccountant with each (sigma, q) curve from :func:`_rdp_curve`: the same
        arrays times the same steps, summed in the same order, so the same floats."""

        def get_privacy_spent(self, *, delta: float, alphas: Any = None) -> tuple[float, float]:
            if not self.history or alphas is not None:
                return super().get_privacy_spent(delta=delta, alphas=alphas)
            rdp = sum([_rdp_curve(sigma, q) * steps for sigma, q, steps in self.history])
            eps, best_alpha = rdp_analysis.get_privacy_spent(orders=self.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
            return float(eps), float(best_alpha)

    return MemoisedRDP


def _return_free_heap() -> None:
    """Give the PRV grid's freed arrays back to the system (glibc; elsewhere nothing to do).

    The arrays (tens of MiB at a few hundred steps) are freed into glibc's heap, which returns only
    what lies free at its top: a training process kept up to the largest accounting's worth
    between releases, more as its ledger grew (docs/performance.md). ``malloc_trim`` returns every
    free page (a few milliseconds, against the accounting's hundreds).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


class _PlanFreeFFT:
    """A ``scipy.fft`` backend that transforms with ``numpy.fft``, which keeps no plans.

    ``scipy.fft`` keeps the plans (twiddle factors) of its 16 most recent transform lengths for
    the life of the process. The PRV accountant composes on a grid whose length grows with the
    steps accounted (about 1400 points per step, 0.7 M at 500), so a training process that
    re-accounts its ledger at every release kept plans for lengths it never uses again (180 MiB
    by 500 steps): the resident memory of ``fedvox-client train`` grew with every segment
    (docs/performance.md). numpy's pocketfft plans per call; the epsilons are bit-identical.
    """

    __ua_domain__ = "numpy.scipy.fft"

    @staticmethod
    def __ua_function__(method: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        transform = getattr(np.fft, method.__name__, None)
        # Both libraries take (x, n or s, axis or axes, norm) first; the rest are scipy's hints.
        if transform is None or len(args) > 4 or kwargs.get("plan") is not None:
            return NotImplemented
        hints = ("overwrite_x", "workers", "plan")
        return transform(*args, **{key: value for key, value in kwargs.items() if key not in hints})


def _rdp_epsilon(entries: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """Opacus's RDPAccountant.get_epsilon, with each mechanism's RDP curve memoised.

    RDP composes by adding curves, and a curve scales with steps, so re-accounting a growing
    ledger, or searching over steps, costs nothing for mechanisms already seen (one curve takes
    0.02-0.3 s on 2 CPU cores). Bit-identical to the accountant (tested).
    """
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    curve = sum(steps * _rdp_curve(sigma, q) for sigma, q, steps in entries)
    value, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=curve, delta=delta)
    return float(value)


@functools.lru_cache(maxsize=4096)
def _rdp_curve(sigma: float, q: float) -> np.ndarray:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    curve = np.asarray(
        rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    )
    curve.flags.writeable = False
    return curve


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    *,
    sample_rate: float,
    steps: int,
    history: Sequence[Mechanism] = (),
    accountant: str = DEFAULT_ACCOUNTANT,
    epsilon_tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (within ``epsilon_tolerance``) that keeps ``history`` plus the
    planned ``steps`` at ``sample_rate`` within ``target_epsilon``.

    Round k of a client calibrates what is left: pass the client's history (from its ledger)
    and the budget as target. Raises :class:`BudgetExceededError` if the history alone already
    reaches the target, and :class:`PrivacyError` if no noise level reaches it (the target is
    below the accountant's resolution).
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigError(f"the target epsilon must be a finite number > 0, got {target_epsilon}")
    history = tuple(history)
    planned = Mechanism(1.0, sample_rate, steps)
    if not planned.touches_data:
        return 0.0
    spent = epsilon(history, delta, accountant)
    if spent >= target_epsilon:
        raise BudgetExceededError(
            f"the history already spends epsilon={spent:.3f} at delta={delta:g} ({accountant}), "
            f"at or above the target {target_epsilon:g}: no noise level leaves room for "
            f"{steps} more steps; stop training this client or raise the target epsilon (and the "
            "budget, if the target would pass it)"
        )

    def reached(sigma: float) -> float:
        return epsilon((*history, Mechanism(sigma, sample_rate, steps)), delta, accountant)

    # Bracket in log-space: eps(lo) > target >= eps(hi); epsilon falls monotonically in sigma.
    hi = 1.0
    while reached(hi) > target_epsilon:
        hi *= 2
        if hi > MAX_NOISE_MULTIPLIER:
            raise PrivacyError(
                f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} keeps epsilon within "
                f"{target_epsilon:g} at delta={delta:g} with the {accountant} accountant "
                f"(history spends {spent:.4f}); raise the target or use fewer steps"
            )
    lo = hi / 2
    while reached(lo) <= target_epsilon:
        if lo < 1e-6:
            return lo  # the target is so loose that practically any noise meets it
        hi, lo = lo, lo / 2

    aim = max(target_epsilon - epsilon_tolerance / 2, target_epsilon / 2)

    def gap(log_sigma: float) -> float:
        return math.log(reached(math.exp(log_sigma))) - math.log(aim)

    if gap(math.log(hi)) < 0 and gap(math.log(lo)) > 0:
        from scipy.optimize import brentq  # ~1 s to import; only calibration needs it

        sigma = math.exp(brentq(gap, math.log(lo), math.log(hi), xtol=1e-5))
    else:
        sigma = hi
    # brentq lands within tolerance of the root, on either side: step up until the target holds.
    while reached(sigma) > target_epsilon:
        sigma *= 1 + 1e-4
    return sigma


@functools.cache
def accountant_version() -> str:
    """The library that computed the ledger's epsilons, for reproducibility."""
    return f"opacus {importlib.metadata.version('opacus')}"


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"unknown accountant {accountant!r}; use one of {', '.join(ACCOUNTANTS)}")


__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ACCOUNTANT",
    "Mechanism",
    "accountant_version",
    "calibrate_noise_multiplier",
    "compact",
    "epsilon",
    "shared_batch_noise_multiplier",
]
