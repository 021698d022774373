"""The one-run canary audit on tiny s1: DP off is caught, DP on stays under the accountant, and a
DP optimizer that forgets its noise fails the audit."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from fedvox.client.audit_cli import app, main, route
from fedvox.client.canary.guesses import GUESS_FRACTIONS, one_run_bound
from fedvox.client.canary.report import render, to_json
from fedvox.client.canary.run import BLACK_BOX, VIOLATION, WHITE_BOX, run_canary_audit
from fedvox.client.canary.spec import CanaryAuditSpec
from fedvox.client.canary.whitebox import CanaryDPOptimizer, WhiteBoxCanaries, free_coordinates
from fedvox.client.dp.engine import make_private, run_logical_step
from fedvox.client.dp.optimizer import FedvoxDPOptimizer
from fedvox.shared.errors import ConfigError, PrivacyError
from fedvox.shared.privacy.accounting import Mechanism, epsilon
from fedvox.shared.privacy.audit import one_run_epsilon_lower_bound
from tests.prepared import prepared_cache

AUDIT = dict(white_box=1000, sample_rate=0.2, steps=40)
"""An IN canary goes unsampled in 40 steps with probability 0.8^40 = 1e-4."""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return prepared_cache(tmp_path_factory.mktemp("canary"))


@pytest.fixture(scope="module")
def dp_off(cache):
    return run_canary_audit(cache, CanaryAuditSpec(noise_multiplier=0.0, **AUDIT), seed=1)


@pytest.fixture(scope="module")
def dp_on(cache):
    return run_canary_audit(cache, CanaryAuditSpec(noise_multiplier=1.0, **AUDIT), seed=1)


def _forget_noise(monkeypatch):
    """The bug the audit must catch: the production DP optimizer is told its noise but adds none."""
    add_noise = FedvoxDPOptimizer.add_noise

    def without_noise(self):
        sigma, self.noise_multiplier = self.noise_multiplier, 0.0
        try:
            add_noise(self)
        finally:
            self.noise_multiplier = sigma

    monkeypatch.setattr(FedvoxDPOptimizer, "add_noise", without_noise)


# ---------------------------------------------------------------------- whole audits
def test_without_noise_white_box_canaries_reach_the_cap(dp_off):
    (white,) = dp_off.results
    assert white.kind == WHITE_BOX and dp_off.epsilon == math.inf and dp_off.ok
    # No noise: an OUT canary's released gradient is exactly 0; an IN one counts its samplings.
    assert torch.all(white.scores[~white.member] == 0)
    assert torch.all(white.scores[white.member] >= 1)
    assert white.bound.best.correct == white.bound.best.guesses
    assert white.bound.epsilon == pytest.approx(white.bound.cap) and white.bound.epsilon > 5


def test_with_noise_the_bound_stays_under_the_accountant(dp_on, dp_off):
    (white,) = dp_on.results
    accounted = epsilon([Mechanism(1.0, 0.2, 40)], 1e-5)
    assert dp_on.epsilon == pytest.approx(accounted)
    assert dp_on.epsilon_pld == pytest.approx(accounted, abs=0.05)
    assert dp_on.ok and dp_on.findings == []
    assert 0 < white.bound.epsilon <= dp_on.theoretical_epsilon
    assert white.bound.epsilon < dp_off.results[0].bound.epsilon - 2
    assert dp_on.training_examples == dp_on.data_examples + white.included
    assert white.mean_score_in > white.mean_score_out


def test_a_dp_optimizer_that_forgets_its_noise_fails_the_audit(cache, monkeypatch):
    _forget_noise(monkeypatch)
    audit = run_canary_audit(cache, CanaryAuditSpec(noise_multiplier=2.0, **AUDIT), seed=2)
    (white,) = audit.results
    assert audit.epsilon == pytest.approx(epsilon([Mechanism(2.0, 0.2, 40)], 1e-5))
    assert white.bound.epsilon > audit.theoretical_epsilon
    assert [f.kind for f in audit.findings] == [VIOLATION] and not audit.ok


def test_black_box_canaries_lose_more_loss_when_in(cache):
    audit = run_canary_audit(
        cache, CanaryAuditSpec(white_box=0, black_box=48, noise_multiplier=0.0, sample_rate=0.2, steps=30), seed=1
    )
    (black,) = audit.results
    assert black.kind == BLACK_BOX and black.canaries == 48
    assert audit.training_examples == audit.data_examples + black.included
    assert black.mean_score_in > black.mean_score_out + 1.0
    assert 0 < black.bound.epsilon <= black.bound.cap


def test_both_kinds_share_the_audit_error_so_one_run_in_20_fails_at_95_percent(cache):
    """The audit fails if either bound is above epsilon: each kind's bound is at 97.5%, not 95%."""
    spec = CanaryAuditSpec(white_box=40, black_box=8, noise_multiplier=1.0, sample_rate=0.2, steps=3)
    audit = run_canary_audit(cache, spec, seed=1)
    assert [r.kind for r in audit.results] == [WHITE_BOX, BLACK_BOX]
    assert all(math.isclose(r.bound.confidence, 1 - 0.05 / 2) for r in audit.results)
    (alone,) = run_canary_audit(
        cache, CanaryAuditSpec(white_box=40, black_box=0, noise_multiplier=1.0, sample_rate=0.2, steps=3), seed=1
    ).results
    assert math.isclose(alone.bound.confidence, 0.95)


def test_physical_batches_do_not_change_the_canary_scores(cache):
    """Chunks of canaries alone (no backward) must release exactly what one big chunk does."""
    spec = dict(white_box=200, noise_multiplier=1.0, sample_rate=0.3, steps=10)
    small = run_canary_audit(cache, CanaryAuditSpec(physical_batch=3, **spec), seed=5).results[0]
    large = run_canary_audit(cache, CanaryAuditSpec(physical_batch=256, **spec), seed=5).results[0]
    assert torch.equal(small.scores, large.scores)


# ---------------------------------------------------------------------- pieces
def test_guesses_sweep_pays_for_its_multiple_tests():
    m = 1000
    member = torch.rand(m, generator=torch.Generator().manual_seed(0)) < 0.5
    perfect = one_run_bound(member.double(), member, delta=1e-5, generator=torch.Generator().manual_seed(1))
    assert len(perfect.sweep) == len(GUESS_FRACTIONS)
    assert all(g.correct == g.guesses for g in perfect.sweep)
    assert max(g.guesses for g in perfect.sweep) == 900
    beta = 0.05 / len(GUESS_FRACTIONS)
    assert perfect.epsilon == pytest.approx(one_run_epsilon_lower_bound(900, 900, canaries=m, beta=beta, delta=1e-5))
    assert perfect.epsilon == perfect.cap
    assert perfect.epsilon < one_run_epsilon_lower_bound(900, 900, canaries=m, beta=0.05, delta=1e-5)

    noise = torch.randn(m, generator=torch.Generator().manual_seed(2))
    assert one_run_bound(noise, member, delta=1e-5).epsilon < 0.5
    # Equal scores carry no information: ties are broken at random, never in the guesser's favour.
    assert one_run_bound(torch.zeros(m), member, delta=1e-5, generator=torch.Generator().manual_seed(3)).epsilon < 0.5


def _embedding_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Linear(8, 1))


def test_white_box_optimizer_injects_exactly_clip_norm_before_the_noise():
    model = _embedding_model()
    table = model[0].weight
    rows, cols = free_coordinates(10, 4, used_ids={1, 2, 3}, count=6, generator=torch.Generator().manual_seed(0))
    assert set(rows.tolist()).isdisjoint({0, 1, 2, 3})
    member = torch.tensor([True, True, False, True, False, True])
    canaries = WhiteBoxCanaries(table, rows, cols, member, noise_multiplier=0.0, sample_rate=0.5)
    private = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=0.0,
        clip_norm=0.5,
        expected_batch_size=2.0,
        noise_generator=torch.Generator().manual_seed(0),
        optimizer_class=functools.partial(CanaryDPOptimizer, canaries=canaries),
    )
    data = torch.tensor([[1, 2], [2, 3], [3, 1]])

    def accumulate(chunk):  # data rows 0..2, then the 4 IN canaries as examples 3..6
        canaries.sample(chunk[chunk >= 3] - 3)
        rows_ = chunk[chunk < 3]
        if len(rows_):
            private.module(data[rows_]).sum().backward()
        return {}

    for indices in (torch.tensor([0, 3, 5]), torch.tensor([4, 5, 6]), torch.tensor([1, 2, 6])):
        # physical batch 1: chunks of canaries alone run no backward at all
        run_logical_step(indices, 1, accumulate, [private.optimizer])
    # IN canaries 0, 1, 3, 5 are examples 3, 4, 5, 6: picked (0, 3), (1, 3, 5), (5)
    sampled = torch.tensor([1, 1, 0, 2, 0, 2])
    assert torch.equal(canaries.times_sampled, sampled)
    assert torch.equal(canaries.scores, sampled.double())  # no noise: score = times sampled, in clip norms
    assert canaries.steps == 3


def test_white_box_canary_on_a_data_row_is_refused():
    model = _embedding_model()
    member = torch.tensor([True, False])
    canaries = WhiteBoxCanaries(
        model[0].weight, torch.tensor([1, 2]), torch.tensor([0, 0]), member, noise_multiplier=1.0, sample_rate=0.5
    )
    private = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=1.0,
        clip_norm=1.0,
        expected_batch_size=1.0,
        noise_generator=torch.Generator().manual_seed(0),
        optimizer_class=functools.partial(CanaryDPOptimizer, canaries=canaries),
    )
    private.module(torch.tensor([[1, 3]])).sum().backward()
    with pytest.raises(PrivacyError, match="canary coordinate"):
        private.optimizer.step()


def test_noisy_released_values_have_the_claimed_spread():
    """With noise, OUT canaries' released values are N(0, sigma^2) in clip norms (what the score assumes).

    Four independent runs of 32 canaries: the spread of 128 scores is known to about 6 %, so the
    band below holds for any seed (one run's 32 scores left about one seed in seven outside it).
    """
    scores = []
    for seed in range(4):
        model = _embedding_model()
        m = 32  # every coordinate of the 8 unused rows
        rows, cols = free_coordinates(10, 4, used_ids={1}, count=m, generator=torch.Generator().manual_seed(0))
        canaries = WhiteBoxCanaries(
            model[0].weight, rows, cols, torch.zeros(m, dtype=torch.bool), noise_multiplier=0.0, sample_rate=0.5
        )
        private = make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.0),
            noise_multiplier=0.7,
            clip_norm=3.0,
            expected_batch_size=1.0,
            noise_generator=torch.Generator().manual_seed(seed),
            optimizer_class=functools.partial(CanaryDPOptimizer, canaries=canaries),
        )
        for _ in range(50):
            private.module(torch.tensor([[1, 1]])).sum().backward()
            private.optimizer.step()
            private.optimizer.zero_grad(set_to_none=True)
        scores.append(canaries.scores)
    # noise_multiplier 0 in the canaries makes the score the plain sum: 50 draws of N(0, 0.7^2) each
    per_step_std = (torch.cat(scores) / math.sqrt(50)).std()
    assert 0.55 < float(per_step_std) < 0.85


def test_spec_refuses_bad_settings():
    for bad in (
        dict(white_box=0, black_box=0),
        dict(white_box=1),
        dict(noise_multiplier=-1.0),
        dict(sample_rate=0.0),
        dict(steps=0),
        dict(confidence=1.0),
        dict(accountant="moments"),
        dict(device="tpu?"),
    ):
        with pytest.raises(ConfigError):
            CanaryAuditSpec(**bad)
    with pytest.raises(ConfigError, match="free coordinates"):
        free_coordinates(10, 4, used_ids=range(9), count=5, generator=torch.Generator())


# ---------------------------------------------------------------------- command line
def invoke(*args: str):
    return CliRunner().invoke(app, route(["canary", *args]))


def test_cli_json_and_exit_status(cache, monkeypatch):
    args = ("--white-box", "300", "--sample-rate", "0.3", "--steps", "20", "--seed", "4")
    result = invoke(str(cache), *args, "--noise-multiplier", "3", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["seed"] == 4 and report["findings"] == []
    (white,) = report["canaries"]
    assert white["kind"] == WHITE_BOX and white["canaries"] == 300
    assert white["epsilon_lower_bound"] <= report["theoretical_epsilon"] <= report["epsilon"]
    assert len(white["sweep"]) == len(GUESS_FRACTIONS)

    _forget_noise(monkeypatch)
    result = invoke(str(cache), *args, "--noise-multiplier", "3")
    assert result.exit_code == 1, result.output
    out = " ".join(result.stdout.split())
    assert "VIOLATION" in out and "audit FAILED" in out


def test_cli_refuses_a_missing_cache_with_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["canary", str(tmp_path / "nowhere"), "--steps", "1"])
    assert exit_.value.code == 2
    assert "fedvox-client prepare" in " ".join(capsys.readouterr().err.split())


def test_table_shows_bound_beside_accountant(dp_on, dp_off):
    for audit, expect in ((dp_on, "audit passed"), (dp_off, "DP is off")):
        console = Console(record=True, width=200)
        render(audit, console)
        text = " ".join(console.export_text().split())
        for word in ("white-box", "ε lower bound", "certified ε", "cap", expect, "no training that lets them"):
            assert word in text
    assert to_json(dp_off)["epsilon"] == "inf"
