"""Accountants, calibration and the shared-batch (GAN) rule, checked against closed forms,
published values and Google's dp-accounting."""

from __future__ import annotations

import ctypes
import gc
import math
import os
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from opacus.accountants import PRVAccountant, RDPAccountant
from scipy import stats

from fedvox.shared.errors import BudgetExceededError, ConfigError, PrivacyError
from fedvox.shared.privacy.accounting import (
    Mechanism,
    calibrate_noise_multiplier,
    compact,
    epsilon,
    shared_batch_noise_multiplier,
)
from tests.privacy_ledgers import gaussian_epsilon

DELTA = 1e-5


def google(history: list[tuple[float, float, int]], delta: float) -> tuple[float, float]:
    """(PLD, RDP) epsilon of a history with dp-accounting."""
    event = dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n
            )
            for s, q, n in history
        ]
    )
    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    rdp = rdp_privacy_accountant.RdpAccountant()
    return pld.compose(event).get_epsilon(delta), rdp.compose(event).get_epsilon(delta)


# ---------------------------------------------------------------------- known values
@pytest.mark.parametrize("sigma,steps", [(2.0, 1), (4.0, 9)])
def test_unsampled_gaussian_matches_closed_form(sigma, steps):
    # q = 1: k Gaussians with noise sigma compose exactly to one with sigma / sqrt(k).
    exact = gaussian_epsilon(sigma / math.sqrt(steps), DELTA)
    prv = epsilon([Mechanism(sigma, 1.0, steps)], DELTA, "prv")
    rdp = epsilon([Mechanism(sigma, 1.0, steps)], DELTA, "rdp")
    assert exact <= prv <= exact + 0.021  # PRV returns its upper estimate (eps_error 0.01)
    assert rdp >= exact
    assert rdp < exact * 1.15


def test_published_opacus_values():
    # opacus-dp.md section 1.4: sigma=1, q=0.01, 1000 steps, delta=1e-5 -> PRV 1.838, RDP 2.101.
    history = [Mechanism(1.0, 0.01, 1000)]
    assert epsilon(history, DELTA, "prv") == pytest.approx(1.838, abs=2e-3)
    assert epsilon(history, DELTA, "rdp") == pytest.approx(2.101, abs=2e-3)


def test_cross_accountant_agreement_on_heterogeneous_history():
    rng = np.random.default_rng(3)
    history = [
        (float(rng.uniform(0.8, 3.0)), float(rng.uniform(0.005, 0.2)), int(rng.integers(5, 120))) for _ in range(4)
    ]
    mechanisms = [Mechanism(*h) for h in history]
    pld, rdp_google = google(history, DELTA)
    prv = epsilon(mechanisms, DELTA, "prv")
    rdp = epsilon(mechanisms, DELTA, "rdp")
    assert pld <= prv <= pld + 0.02  # both numerical, PRV reports its upper end
    assert rdp == pytest.approx(rdp_google, rel=1e-3)  # same RDP curves; conversions differ slightly
    assert rdp > prv


def test_memoised_rdp_is_opacus_rdp_accountant():
    history = [(1.3, 0.02, 70), (0.9, 0.3, 5), (2.0, 1.0, 3)]
    reference = RDPAccountant()
    reference.history = history
    assert epsilon([Mechanism(*h) for h in history], DELTA, "rdp") == reference.get_epsilon(DELTA)


def test_prv_is_opacus_prv_accountant():
    # fedvox's PRV transforms with numpy.fft instead of scipy.fft (no plan cache): same epsilons,
    # bit for bit, through both of Opacus's compositions (self-composition and convolution).
    history = [(0.9, 0.3, 5), (1.3, 0.02, 70)]  # compact()'s order: convolution order shows in the last bits
    reference = PRVAccountant()
    reference.history = history
    assert epsilon([Mechanism(*h) for h in history], DELTA, "prv") == reference.get_epsilon(DELTA)


def test_prv_with_memoised_domain_curves_is_opacus_prv_accountant():
    # PRV sizes its grid with RDP curves, which fedvox memoises per (sigma, q): a client's epsilon
    # after each round of one plan (the curve known from the round before) and a calibration's
    # search must give Opacus's floats, bit for bit, and leave Opacus's own classes unpatched.
    from opacus.accountants.analysis.prv import domain

    rounds = [[(1.1234, 4 / 9, 5 * r)] for r in (1, 2, 3, 6)]
    histories = [*rounds, [(0.8, 0.1, 40), (1.557, 4 / 9, 25)]]  # in compact()'s order
    for history in histories:
        reference = PRVAccountant()
        reference.history = history
        assert epsilon([Mechanism(*h) for h in history], DELTA, "prv") == reference.get_epsilon(DELTA)
    assert domain.RDPAccountant is RDPAccountant


def _anonymous_resident_mib() -> float:
    resident, file_backed = (int(field) for field in Path("/proc/self/statm").read_text().split()[1:3])
    return (resident - file_backed) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set from /proc (Linux)")
def test_prv_accounting_holds_no_memory_after_it_returns():
    # scipy.fft kept the plans of the PRV grid's lengths (~1400 points per step accounted, ~9 MiB of
    # plan per 100 steps), and glibc's heap the grid's freed arrays: a training process
    # re-accounting its ledger at each release grew by 10-20 MiB per release at 100-200 steps
    # (issue 18). Three such releases must leave nothing resident.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # what earlier tests left free in the heap
    except (OSError, AttributeError):
        pytest.skip("glibc only: elsewhere the allocator decides what stays resident")
    epsilon([Mechanism(1.0, 0.2, 10)], DELTA, "prv")  # imports and first-use allocations
    gc.collect()
    before = _anonymous_resident_mib()
    for steps in (160, 180, 200):
        epsilon([Mechanism(1.0, 0.2, steps)], DELTA, "prv")
    gc.collect()
    assert _anonymous_resident_mib() - before < 12  # before: 51 MiB held by scipy.fft's plans


def test_history_order_and_splitting_do_not_matter():
    a, b = Mechanism(1.1, 0.02, 30), Mechanism(0.9, 0.05, 20)
    split = [Mechanism(1.1, 0.02, 10), b, Mechanism(1.1, 0.02, 20)]
    assert compact([a, b]) == compact(split) == compact([b, a])
    assert epsilon([a, b], DELTA) == epsilon(split, DELTA)


# ---------------------------------------------------------------------- degenerate cases
@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_degenerate_mechanisms(accountant):
    assert epsilon([], DELTA, accountant) == 0.0
    assert epsilon([Mechanism(0.0, 0.1, 10)], DELTA, accountant) == math.inf  # no noise
    assert epsilon([Mechanism(0.0, 0.0, 10), Mechanism(0.0, 0.3, 0)], DELTA, accountant) == 0.0  # touches nothing
    base = [Mechanism(1.0, 0.05, 50)]
    assert epsilon([*base, Mechanism(1.0, 0.0, 500)], DELTA, accountant) == epsilon(base, DELTA, accountant)
    assert math.isfinite(epsilon([Mechanism(1.0, 1.0, 10)], DELTA, accountant))  # full batch


@pytest.mark.parametrize(
    "args",
    [
        (-1.0, 0.1, 1),
        (math.nan, 0.1, 1),
        (math.inf, 0.1, 1),
        (1.0, 1.5, 1),
        (1.0, -0.1, 1),
        (1.0, 0.1, -1),
        (1.0, 0.1, 2.5),
        (1.0, 0.1, True),
    ],
)
def test_invalid_mechanisms_are_refused(args):
    with pytest.raises(ConfigError):
        Mechanism(*args)


def test_invalid_delta_and_accountant_are_refused():
    for delta in (0.0, 1.0, -1e-5):
        with pytest.raises(ConfigError, match="delta"):
            epsilon([Mechanism(1.0, 0.1, 1)], delta)
    with pytest.raises(ConfigError, match="gdp"):
        epsilon([Mechanism(1.0, 0.1, 1)], DELTA, "gdp")


# ---------------------------------------------------------------------- calibration
@pytest.mark.parametrize("accountant,target,expected", [("prv", 8.0, 1.05), ("rdp", 8.0, 1.11), ("prv", 1.0, 4.92)])
def test_calibration_reproduces_published_noise(accountant, target, expected):
    # opacus-dp.md section 1.4: N=200 utterances, batch 16, 20 epochs = 250 steps at q=0.08.
    sigma = calibrate_noise_multiplier(target, DELTA, sample_rate=0.08, steps=250, accountant=accountant)
    assert sigma == pytest.approx(expected, abs=0.02)  # the table rounds; both searches stop within 0.01 in epsilon
    reached = epsilon([Mechanism(sigma, 0.08, 250)], DELTA, accountant)
    assert target - 0.01 <= reached <= target


def test_calibration_spends_only_what_is_left():
    history = [Mechanism(1.0, 0.05, 40), Mechanism(1.3, 0.05, 40)]
    spent = epsilon(history, DELTA)
    sigma = calibrate_noise_multiplier(spent + 1.0, DELTA, sample_rate=0.05, steps=40, history=history)
    reached = epsilon([*history, Mechanism(sigma, 0.05, 40)], DELTA)
    assert spent + 0.99 <= reached <= spent + 1.0
    # the same target without the history needs less noise: the past is charged
    assert calibrate_noise_multiplier(spent + 1.0, DELTA, sample_rate=0.05, steps=40) < sigma


def test_calibration_refuses_exhausted_or_unreachable_targets():
    history = [Mechanism(0.8, 0.1, 100)]
    with pytest.raises(BudgetExceededError, match="already spends"):
        calibrate_noise_multiplier(1.0, DELTA, sample_rate=0.1, steps=10, history=history)
    with pytest.raises(PrivacyError, match="no noise multiplier"):
        calibrate_noise_multiplier(1e-3, DELTA, sample_rate=0.1, steps=10, accountant="rdp")  # below RDP's floor
    assert calibrate_noise_multiplier(1.0, DELTA, sample_rate=0.0, steps=10) == 0.0  # touches no data


# ---------------------------------------------------------------------- the GAN rule (s2)
def test_shared_batch_noise_multiplier():
    assert shared_batch_noise_multiplier([1.5, 2.0]) == pytest.approx(1.2)
    assert shared_batch_noise_multiplier([3.0]) == 3.0
    assert shared_batch_noise_multiplier([2.0, 2.0, 2.0, 2.0]) == pytest.approx(1.0)
    assert shared_batch_noise_multiplier([1.0, 0.0]) == 0.0
    with pytest.raises(ConfigError):
        shared_batch_noise_multiplier([])


def _hockey_stick_2d(q: float, sigmas: tuple[float, float], eps: float) -> tuple[float, float]:
    """delta(eps) of the joint (G, D) release on one Poisson batch, by 2-D quadrature.

    Whitened, a record shifts the pair by mu = (1/sigma_G, 1/sigma_D); with it in the data the
    output is (1-q) N(0, I) + q N(mu, I), without it N(0, I). Returns both directions.
    """
    x = np.linspace(-9.0, 11.0, 1601)
    dx = x[1] - x[0]
    X, Y = np.meshgrid(x, x, indexing="ij")
    without = stats.norm.pdf(X) * stats.norm.pdf(Y)
    within = (1 - q) * without + q * stats.norm.pdf(X - 1 / sigmas[0]) * stats.norm.pdf(Y - 1 / sigmas[1])
    e = math.exp(eps)
    return (
        float(np.maximum(within - e * without, 0).sum() * dx * dx),
        float(np.maximum(without - e * within, 0).sum() * dx * dx),
    )


def _hockey_stick_1d(q: float, sigma: float, eps: float) -> tuple[float, float]:
    x = np.linspace(-12.0, 14.0, 400001)
    dx = x[1] - x[0]
    without = stats.norm.pdf(x)
    within = (1 - q) * without + q * stats.norm.pdf(x - 1 / sigma)
    e = math.exp(eps)
    return (
        float(np.maximum(within - e * without, 0).sum() * dx),
        float(np.maximum(without - e * within, 0).sum() * dx),
    )


@pytest.mark.parametrize("eps", [0.0, 0.05, 0.3])
def test_shared_batch_pair_is_exactly_one_gaussian(eps):
    q, sigmas = 0.1, (1.5, 2.0)
    joint = _hockey_stick_2d(q, sigmas, eps)
    single = _hockey_stick_1d(q, shared_batch_noise_multiplier(sigmas), eps)
    assert joint[0] == pytest.approx(single[0], rel=1e-4, abs=1e-9)
    assert joint[1] == pytest.approx(single[1], rel=1e-4, abs=1e-9)


def test_shared_batch_rule_matches_dp_accounting_and_beats_naive_composition():
    q, steps, sigmas = 0.1, 50, (1.5, 2.0)
    sigma_eff = shared_batch_noise_multiplier(sigmas)
    # dp-accounting's RDP accountant applies its own effective-noise rule to a Poisson-sampled
    # composition of Gaussians (Mironov et al. 2019, section 3): the same number.
    joint = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            q, dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(s) for s in sigmas])
        ),
        steps,
    )
    google_rdp = rdp_privacy_accountant.RdpAccountant().compose(joint).get_epsilon(DELTA)
    assert google_rdp == pytest.approx(google([(sigma_eff, q, steps)], DELTA)[1], rel=1e-12)
    assert epsilon([Mechanism(sigma_eff, q, steps)], DELTA, "rdp") == pytest.approx(google_rdp, rel=1e-3)
    # Accounting G and D as two independently sampled mechanisms under-counts a shared batch.
    shared = epsilon([Mechanism(sigma_eff, q, steps)], DELTA, "prv")
    naive = epsilon([Mechanism(sigmas[0], q, steps), Mechanism(sigmas[1], q, steps)], DELTA, "prv")
    assert naive < shared - 0.3
    # Without subsampling the two views coincide: Gaussians compose exactly.
    full = epsilon([Mechanism(sigma_eff, 1.0, 5)], DELTA, "rdp")
    both = epsilon([Mechanism(sigmas[0], 1.0, 5), Mechanism(sigmas[1], 1.0, 5)], DELTA, "rdp")
    assert full == pytest.approx(both, rel=1e-6)
