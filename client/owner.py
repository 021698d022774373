"""The device owner's privacy decisions: the budget and delta a client identity is held to.

They are the owner's, set on the device (``prepare``, ``enroll``, the owner's node config) and
kept in the ledger (:meth:`Ledger.set_owner_budget`), never taken from a server's plan. A plan is
only *checked* against them (:func:`check_plan`): one that asks for more is refused with the
reason, and nothing is trained or charged.
"""

from __future__ import annotations

from fedvox.shared.errors import BudgetExceededError, ConfigError
from fedvox.shared.privacy.ledger import DEFAULT_BUDGET_EPSILON, Ledger, OwnerBudget, default_delta
from fedvox.shared.runconfig import RunConfig


def owner_budget(
    ledger: Ledger,
    client_id: str,
    num_examples: int | None = None,
    *,
    epsilon: float | None = None,
    delta: float | None = None,
) -> OwnerBudget:
    """The owner's budget for ``client_id``: the ledger's, changed where the owner gives a value.

    A client with none yet gets ``epsilon`` (default :data:`DEFAULT_BUDGET_EPSILON`) at ``delta``
    (default :func:`default_delta` of its ``num_examples`` training utterances, needed only
    then), recorded now.
    Raises :class:`PrivacyError` if ``delta`` would change a delta its releases are accounted at.
    """
    current = ledger.owner_budget(client_id)
    if current is None and delta is None and num_examples is None:
        raise ConfigError("a first owner budget needs its delta, or the number of training utterances to choose one")
    wanted = OwnerBudget(
        client_id,
        epsilon if epsilon is not None else (current.epsilon if current else DEFAULT_BUDGET_EPSILON),
        delta if delta is not None else (current.delta if current else default_delta(num_examples or 0)),
    )
    if current is not None and (current.epsilon, current.delta) == (wanted.epsilon, wanted.delta):
        return current
    return ledger.set_owner_budget(wanted)


def check_plan(owner: OwnerBudget, config: RunConfig) -> None:
    """Refuse a plan that asks a device for more epsilon than its owner allows."""
    asked = max(config.client_budget_epsilon, config.dp.target_epsilon)
    if asked > owner.epsilon:
        key = (
            "dp.target-epsilon" if config.dp.target_epsilon > config.client_budget_epsilon else "client-budget-epsilon"
        )
        raise BudgetExceededError(
            f"the plan asks this device for an utterance-level epsilon of {asked:g} ({key}); its owner allows "
            f"{owner.epsilon:g}. The operator must lower {key}, or the owner raise the budget on the device"
        )


__all__ = ["check_plan", "owner_budget"]
