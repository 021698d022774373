"""DP trainer releases: budget refusal, ledger rows, profile independence, s2 GAN pair."""

from __future__ import annotations

import io

import pytest
import torch

from fedvox.client.data.datasets import S1Dataset, S2Dataset
from fedvox.client.dp.trainer import PrivacyPlan, RoundPlan, Trainer
from fedvox.client.stages.s1 import S1Task
from fedvox.client.stages.s2 import S2Task
from fedvox.shared.errors import BudgetExceededError
from fedvox.shared.models.factory import build_model
from fedvox.shared.models.s1 import SelfAttention
from fedvox.shared.models.subsets import SubsetSpec
from fedvox.shared.privacy.accounting import Mechanism, epsilon, shared_batch_noise_multiplier
from fedvox.shared.privacy.ledger import Ledger
from tests.prepared import prepared_cache

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return prepared_cache(tmp_path_factory.mktemp("trainer"))


def _s1_trainer(cache, ledger_dir, *, physical=8, subset="lora", privacy=None, seed=0):
    model = build_model("s1", "tiny", SubsetSpec(kind=subset, lora_rank=4), seed=0)
    for module in model.modules():  # dropout off: the profile-equivalence check compares updates
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(module, SelfAttention):
            module.dropout = 0.0
    task = S1Task(model, S1Dataset(cache), CPU)
    return Trainer(
        task,
        Ledger(ledger_dir),
        "client-a",
        privacy or PrivacyPlan(noise_multiplier=1.0, budget_epsilon=50.0),
        physical_batch=physical,
        noise_seed=seed,
        sample_seed=seed,
    )


def test_s1_release_trains_and_charges_the_ledger(cache, tmp_path):
    trainer = _s1_trainer(cache, tmp_path)
    plan = RoundPlan(steps=3, logical_batch=6, learning_rate=1e-2)
    result = trainer.train(plan, run_id="run", round=1)
    q = 6 / len(trainer.task.dataset)
    assert result.sample_rate == pytest.approx(q)
    assert result.row.epsilon == pytest.approx(epsilon([Mechanism(1.0, q, 3)], 1e-5))
    assert result.row.steps == 3 and result.row.client_id == "client-a"
    assert result.metrics["loss_per_token"] > 0 and result.metrics["examples_seen"] > 0
    assert set(result.state) == {n for n, p in trainer.task.model.named_parameters() if p.requires_grad}
    second = trainer.train(plan, run_id="run", round=2)
    assert second.row.epsilon > result.row.epsilon
    trainer.close()


def test_a_trainer_restored_from_its_state_dict_makes_the_release_the_uninterrupted_one_makes(cache, tmp_path):
    plan = RoundPlan(steps=2, logical_batch=6, learning_rate=1e-2)
    straight = _s1_trainer(cache, tmp_path / "straight", seed=5)
    straight.train(plan, run_id="r", round=1)
    saved = io.BytesIO()
    torch.save(straight.state_dict(), saved)  # what a segment checkpoint holds
    straight.reseed(noise_seed=7, sample_seed=8)  # each release draws from its own seeds, as local training does
    expected = straight.train(plan, run_id="r", round=2)

    resumed = _s1_trainer(cache, tmp_path / "resumed", seed=99)  # a fresh trainer: the state must bring the rest
    saved.seek(0)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    assert resumed.steps_done == 2
    resumed.reseed(noise_seed=7, sample_seed=8)
    got = resumed.train(plan, run_id="r", round=2)
    for name, value in expected.state.items():
        assert torch.equal(got.state[name], value), name
    straight.close()
    resumed.close()


def test_two_profiles_give_the_same_update(cache, tmp_path):
    plan = RoundPlan(steps=2, logical_batch=8, learning_rate=1e-2)
    big = _s1_trainer(cache, tmp_path / "a", physical=16, subset="full")
    small = _s1_trainer(cache, tmp_path / "b", physical=2, subset="full")
    a = big.train(plan, run_id="r", round=1).state
    b = small.train(plan, run_id="r", round=1).state
    initial = build_model("s1", "tiny", SubsetSpec(kind="full"), seed=0).state_dict()
    assert any(not torch.allclose(a[k], initial[k], atol=1e-4) for k in a), "training must move weights"
    # Padding differs between the two splits, so per-sample gradients agree to float precision
    # only; Adam's first steps divide by tiny second moments, so compare relative update sizes.
    for key in a:
        update_a, update_b = a[key] - initial[key], b[key] - initial[key]
        assert (update_a - update_b).norm() <= 1e-3 * update_a.norm() + 1e-7, key


def test_budget_refuses_before_training_and_charges_nothing(cache, tmp_path):
    trainer = _s1_trainer(cache, tmp_path, privacy=PrivacyPlan(noise_multiplier=0.5, budget_epsilon=1.0))
    before = {k: v.clone() for k, v in trainer.task.model.state_dict().items()}
    with pytest.raises(BudgetExceededError, match="budget"):
        trainer.train(RoundPlan(steps=50, logical_batch=8, learning_rate=1e-2), run_id="r", round=1)
    assert trainer.ledger.rows() == []
    assert all(torch.equal(before[k], v) for k, v in trainer.task.model.state_dict().items())


def test_target_epsilon_calibrates_the_noise_over_the_planned_rounds(cache, tmp_path):
    privacy = PrivacyPlan(noise_multiplier=None, target_epsilon=3.0, budget_epsilon=3.0, accountant="rdp")
    trainer = _s1_trainer(cache, tmp_path, privacy=privacy)
    plan = RoundPlan(steps=2, logical_batch=4, learning_rate=1e-2, planned_steps=6)
    for round_ in (1, 2, 3):
        row = trainer.train(
            RoundPlan(**{**plan.__dict__, "planned_steps": 6 - 2 * (round_ - 1)}), run_id="r", round=round_
        ).row
    assert 2.9 <= row.epsilon <= 3.0


def _s2_trainer(pair, cache, ledger_dir) -> Trainer:
    return Trainer(
        S2Task(pair, S2Dataset(cache), CPU),
        Ledger(ledger_dir),
        "client-s2",
        PrivacyPlan(noise_multiplier=1.0, budget_epsilon=100.0),
        physical_batch=4,
        noise_seed=1,
        sample_seed=1,
    )


def test_s2_pair_is_one_shared_batch_release(cache, tmp_path):
    trainer = _s2_trainer(build_model("s2", "tiny", SubsetSpec(kind="lora", lora_rank=2), seed=0), cache, tmp_path)
    result = trainer.train(RoundPlan(steps=2, logical_batch=4, learning_rate=1e-3), run_id="r", round=1)
    assert result.row.mechanism == "poisson_gaussian_shared_batch"
    sigmas = [p.optimizer.noise_multiplier for p in trainer.private.values()]
    assert shared_batch_noise_multiplier(sigmas) == pytest.approx(1.0)
    assert result.metrics["g_mel"] > 0 and result.metrics["d_loss"] > 0
    assert any(k.startswith("discriminator.") for k in result.state)
    assert any(k.startswith("generator.") and "lora" in k for k in result.state)
    trainer.close()


def test_s2_without_adversary_is_one_release_of_the_decoder_adapters(cache, tmp_path):
    subset = SubsetSpec(kind="lora", lora_rank=2, lora_groups=("decoder",), adversary=False)
    pair = build_model("s2", "tiny", subset, seed=0)
    discriminator = {k: v.clone() for k, v in pair.discriminator.state_dict().items()}
    trainer = _s2_trainer(pair, cache, tmp_path)
    result = trainer.train(RoundPlan(steps=2, logical_batch=4, learning_rate=1e-3), run_id="r", round=1)
    q = 4 / len(trainer.task.dataset)
    assert list(trainer.private) == ["generator"]
    assert result.row.epsilon == pytest.approx(epsilon([Mechanism(1.0, q, 2)], 1e-5))  # sigma 1, not 1/sqrt(2)
    assert result.metrics["g_mel"] > 0 and "d_loss" not in result.metrics
    assert result.state and all(k.startswith("generator.dec.") and "lora" in k for k in result.state)
    assert all(torch.equal(v, discriminator[k]) for k, v in pair.discriminator.state_dict().items())
    trainer.close()


def test_fedprox_term_pulls_towards_the_starting_weights(cache, tmp_path):
    def distance(mu):
        trainer = _s1_trainer(cache, tmp_path / f"mu{mu}", subset="full")
        start = {k: v.clone() for k, v in trainer.task.model.state_dict().items()}
        plan = RoundPlan(steps=4, logical_batch=8, learning_rate=1e-2, proximal_mu=mu)
        state = trainer.train(plan, run_id="r", round=1).state
        trainer.close()
        return sum(float((state[k] - start[k]).norm() ** 2) for k in state) ** 0.5

    assert distance(100.0) < 0.8 * distance(0.0)
